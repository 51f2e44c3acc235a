"""lora-efficiency: measure which LoRA rank, target modules and quantization give the best quality per GB and hour."""

__version__ = "0.1.0"
