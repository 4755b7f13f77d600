import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # no test may reach a model hub
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

from semla_lab.core.runtime import configure_threads

configure_threads()


@pytest.fixture(scope="session")
def tiny_clip_random():
    """The tiny CLIP architecture with seeded random weights (no artifacts needed)."""
    from semla_lab.models.clip import load_clip
    torch.manual_seed(0)
    return load_clip(pretrained="random", device="cpu")


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_clip_random):
    from semla_lab.models.segmenter import build_segmenter
    torch.manual_seed(0)
    return build_segmenter(tiny_clip_random.model).eval()
