"""lora-cli: fine-tune GPT-2-family models with LoRA."""

__version__ = "0.1.0"
