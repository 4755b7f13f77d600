"""Models: the CLIP embedding, the open-vocabulary segmenter and LoRA on its image tower."""
