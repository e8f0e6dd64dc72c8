"""Vision encoder adapters behind one interface (`base.VisionEncoder`) and one registry."""

from models.encoders.base import EncoderOutput, EncoderRecipe, EncoderUnavailableError, FeatureInfo, VisionEncoder
from models.encoders.registry import encoder_names, encoder_recipes, get_encoder_class

__all__ = ["EncoderOutput", "EncoderRecipe", "EncoderUnavailableError", "FeatureInfo", "VisionEncoder",
           "encoder_names", "encoder_recipes", "get_encoder_class"]
