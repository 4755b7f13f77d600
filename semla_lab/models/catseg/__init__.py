"""CAT-Seg (Cho et al., CVPR 2024), the open-vocabulary segmenter SemLA adapts, in plain PyTorch.

config.py the architecture; clip.py its CLIP towers; aggregator.py the cost aggregator and decoder; model.py the
composed model; checkpoint.py reading the official checkpoints; inference.py the official test-time path;
targets.py the official SemLA LoRA targets.
"""
from .config import CATSegConfig
from .model import CATSeg, build_catseg

__all__ = ["CATSeg", "CATSegConfig", "build_catseg"]
