"""CAT-Seg (Cho et al., CVPR 2024), the open-vocabulary segmenter SemLA adapts, in plain PyTorch.

config.py the architecture; clip.py its CLIP towers; aggregator.py the cost aggregator and decoder; model.py the
composed model; checkpoint.py reading the official checkpoints; inference.py the official test-time path;
targets.py the official SemLA LoRA targets; golden.py the comparison with the official code's outputs.
"""
from .checkpoint import CheckpointError, load_catseg, save_catseg_safetensors
from .config import CATSegConfig
from .golden import golden_differences, load_golden
from .inference import catseg_scores
from .model import CATSeg, build_catseg, stage_shapes
from .targets import (
           OFFICIAL_LORA_TARGETS,
           acting_targets,
           called_targets,
           lora_targets,
           random_lora_state,
)

__all__ = ["OFFICIAL_LORA_TARGETS", "CATSeg", "CATSegConfig", "CheckpointError", "acting_targets", "build_catseg",
           "called_targets", "catseg_scores", "golden_differences", "load_catseg", "load_golden", "lora_targets",
           "random_lora_state", "save_catseg_safetensors", "stage_shapes"]
