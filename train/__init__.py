"""Multi-stage fine-tuning driven by one YAML file: `accelerate launch -m train --config config/NAME.yaml`."""
