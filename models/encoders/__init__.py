"""Vision encoder adapters behind one interface (`base.VisionEncoder`) and one registry."""

from models.encoders.base import EncoderOutput, EncoderUnavailableError, FeatureInfo, VisionEncoder
from models.encoders.registry import encoder_names, get_encoder_class

__all__ = ["EncoderOutput", "EncoderUnavailableError", "FeatureInfo", "VisionEncoder",
           "encoder_names", "get_encoder_class"]
