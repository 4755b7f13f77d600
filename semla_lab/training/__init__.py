"""Training: the tiny CLIP, the base segmenter and LoRA adapters."""
