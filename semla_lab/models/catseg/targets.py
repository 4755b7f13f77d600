"""The official SemLA LoRA targets on CAT-Seg, and seeded random adapters on them.

SemLA (`catseg/cat_seg/config.py`, `add_lora_config`) lists 214 module names, written for CAT-Seg (L): in both
CLIP towers `mlp.c_fc`, `mlp.c_proj` and `attn.{q,k,v}_proj` of every block (24 image, 12 text), and in the
aggregator's two layers the Swin blocks' `attn.{q,k,v,proj}`, `mlp.fc1/fc2` and the class attention's
`attention.{q,k,v}`, `MLP.0/2`. CAT-Seg never calls `attn.{q,k,v}_proj` as modules (clip.py), so those 108
targets are inert; on CAT-Seg (B) the names of image blocks 12-23 match nothing (154 targets exist).
"""
from __future__ import annotations

import torch
from torch import nn

_CLIP = "sem_seg_head.predictor.clip_model"
_AGG = "sem_seg_head.predictor.transformer"


def _official_names() -> list[str]:
    """The 214 names in the official order."""
    vis = [f"{_CLIP}.visual.transformer.resblocks.{i}" for i in range(24)]
    txt = [f"{_CLIP}.transformer.resblocks.{i}" for i in range(12)]
    names = [f"{b}.mlp.{m}" for b in vis for m in ("c_fc", "c_proj")]
    names += [f"{b}.attn.{m}_proj" for b in vis for m in "qkv"]
    names += [f"{b}.attn.{m}_proj" for b in txt for m in "qkv"]
    names += [f"{b}.mlp.{m}" for b in txt for m in ("c_fc", "c_proj")]
    for i in range(2):
        layer = f"{_AGG}.layers.{i}"
        for blk in ("block_1", "block_2"):
            names += [f"{layer}.swin_block.{blk}.attn.{m}" for m in ("q", "k", "v", "proj")]
            names += [f"{layer}.swin_block.{blk}.mlp.{m}" for m in ("fc1", "fc2")]
        names += [f"{layer}.attention.attention.{m}" for m in "qkv"] + [f"{layer}.attention.MLP.{m}" for m in "02"]
    return names


OFFICIAL_LORA_TARGETS: tuple[str, ...] = tuple(_official_names())
INERT_SUFFIXES = ("attn.q_proj", "attn.k_proj", "attn.v_proj")


def lora_targets(model: nn.Module) -> list[str]:
    """The official targets that exist in `model` (a CATSeg), in the official order."""
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return [n for n in OFFICIAL_LORA_TARGETS if n in linears]


def acting_targets(targets: list[str]) -> list[str]:
    """The targets whose LoRA changes CAT-Seg's output (the rest are never called as modules)."""
    return [t for t in targets if not (t.startswith(_CLIP) and t.endswith(INERT_SUFFIXES))]


def random_lora_state(model: nn.Module, targets: list[str], r: int, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """A random LoRA adapter in peft's saved layout ({'base_model.model.<target>.lora_A.weight': (r, in),
    '...lora_B.weight': (out, r)}), both factors non-zero, drawn from `seed` in target order."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in targets:
        linear = model.get_submodule(name)
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, linear.in_features, generator=generator) * std
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(linear.out_features, r, generator=generator) * std
    return state


@torch.no_grad()
def called_targets(model: nn.Module, targets: list[str], images: torch.Tensor, classes: list[str]) -> list[str]:
    """The targets that one forward of `model` on `images` and `classes` actually calls (forward hooks), in the
    given order: a LoRA on any other target cannot change the output."""
    called = set()
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: called.add(n)) for n in targets]
    try:
        model(images, classes)
    finally:
        for h in hooks:
            h.remove()
    return [n for n in targets if n in called]
