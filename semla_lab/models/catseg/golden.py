"""Golden fixtures: outputs of the official CAT-Seg code on seeded random weights, and ours on the same weights.

A fixture (tests/golden/catseg_<variant>.json + .safetensors, written by tests/golden/make_catseg_golden.py)
holds the images, class names, the weight and adapter seeds, and the official model's logits without and with
two LoRA adapters fused per image (peft `add_weighted_adapter(cat)`). `golden_differences` rebuilds the same
weights here and returns the largest |logit difference| for both.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...core.fusion import FusedAdapters
from .config import CATSegConfig
from .inference import model_input
from .model import CATSeg, build_catseg
from .targets import lora_targets, random_lora_state


def load_golden(folder: str | Path, variant: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The fixture of `variant` ("B" or "L") in `folder`: (metadata, tensors)."""
    folder = Path(folder)
    meta = json.loads((folder / f"catseg_{variant}.json").read_text())
    return meta, load_file(str(folder / f"catseg_{variant}.safetensors"))


def golden_model(meta: dict) -> tuple[CATSeg, FusedAdapters]:
    """Our reduced CAT-Seg with the fixture's weights, and its two adapters installed for per-image fusion."""
    model = build_catseg(CATSegConfig.reduced(meta["variant"]), meta["seed"])
    targets = lora_targets(model)
    assert len(targets) == meta["targets"], f"{len(targets)} LoRA targets, the fixture has {meta['targets']}"
    adapters = {f"a{i}": (random_lora_state(model, targets, meta["rank"], seed), meta["alpha"] / meta["rank"])
                for i, seed in enumerate(meta["adapter_seeds"])}
    return model, FusedAdapters(model, adapters)


@torch.no_grad()
def golden_logits(model: CATSeg, tensors: dict[str, torch.Tensor], classes: list[str]) -> torch.Tensor:
    """The fixture's images (B, 3, H, W) RGB 0..255 -> our logits (B, T, 96, 96), as the fixture's were made."""
    return model(model_input(model, tensors["images"]), classes)


def golden_differences(meta: dict, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |logit difference| against the official outputs: 'base' (no adapters) and 'fused' (each image with
    its own weights over the two adapters)."""
    model, fused = golden_model(meta)
    base = golden_logits(model, tensors, meta["classes"])
    weights = torch.tensor(meta["adapter_weights"])
    with fused.select(torch.tensor([[0, 1]] * len(weights)), weights):
        out = golden_logits(model, tensors, meta["classes"])
    return {"base": float((base - tensors["logits"]).abs().max()),
            "fused": float((out - tensors["fused_logits"]).abs().max())}
