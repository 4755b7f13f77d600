"""CAT-Seg (Cho et al., CVPR 2024), the open-vocabulary segmenter SemLA adapts, in plain PyTorch.

config.py the architecture; clip.py its CLIP towers; aggregator.py the cost aggregator and decoder; model.py the
composed model; checkpoint.py reading the official checkpoints; inference.py the official test-time path;
targets.py the official SemLA LoRA targets.
"""
from .checkpoint import CheckpointError, load_catseg, save_catseg_safetensors
from .config import CATSegConfig
from .inference import catseg_scores
from .model import CATSeg, build_catseg
from .targets import (
           OFFICIAL_LORA_TARGETS,
           acting_targets,
           lora_targets,
           random_lora_state,
)

__all__ = ["OFFICIAL_LORA_TARGETS", "CATSeg", "CATSegConfig", "CheckpointError", "acting_targets", "build_catseg",
           "catseg_scores", "load_catseg", "lora_targets", "random_lora_state", "save_catseg_safetensors"]
