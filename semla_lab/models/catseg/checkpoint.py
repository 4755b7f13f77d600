"""Reading CAT-Seg checkpoints (the official detectron2 `model_final.pth`, or our safetensors) and writing the
pickle-free copy.

A detectron2 checkpoint is a pickle `{"model": state_dict, ...}`, read with `torch.load(weights_only=True)`:
a file that needs any code to unpickle is refused. Keys are the official ones; each attention keeps its q, k, v
weights as `attn.{q,k,v}_proj_weight` (and, in SemLA's copy of the code, the tied duplicates
`attn.{q,k,v}_proj.weight`; ours are those). The variant (B or L, full or reduced) is read from the shape of
the patch embedding; every other key must then be present with its shape, and no other key may be.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ...core.errors import MissingFileError, SemlaError
from ...core.io import atomic_write_bytes
from .config import CATSegConfig
from .model import CATSeg

PATCH_KEY = "sem_seg_head.predictor.clip_model.visual.conv1.weight"
_OFFICIAL_QKV = re.compile(r"(.*\.attn\.[qkv]_proj)_weight")


class CheckpointError(SemlaError, ValueError):
    """A file that is not a CAT-Seg checkpoint of a known variant; the message names the first offending key."""


def known_configs() -> list[CATSegConfig]:
    return [CATSegConfig.vit_b16(), CATSegConfig.vit_l14(), CATSegConfig.reduced("B"), CATSegConfig.reduced("L")]


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw state dict of a safetensors file or a weights-only torch pickle (detectron2's under "model")."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no checkpoint file {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  any failure to parse is the file's fault: truncated, text, code in a pickle
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a checkpoint that loads without running code ({first[:160]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors, or one under 'model')")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: key {key!r} is a {type(value).__name__}, not a tensor")
    return obj


def canonical_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> ours: `attn.q_proj_weight` becomes `attn.q_proj.weight`; a tied duplicate already
    under that name must equal it. Floating tensors become float32 (our model computes in float32)."""
    out = {}
    for key, value in state.items():
        m = _OFFICIAL_QKV.fullmatch(key)
        name = f"{m.group(1)}.weight" if m else key
        if name in out and not torch.equal(out[name], value):
            raise CheckpointError(f"key {key!r} differs from its tied duplicate {name!r}")
        out[name] = value.float() if value.is_floating_point() else value
    return out


def infer_config(state: dict[str, torch.Tensor]) -> CATSegConfig:
    """The known configuration whose patch embedding has this checkpoint's shape."""
    if PATCH_KEY not in state:
        raise CheckpointError(f"missing key {PATCH_KEY!r}: not a CAT-Seg checkpoint")
    shape = tuple(state[PATCH_KEY].shape)
    for cfg in known_configs():
        if shape == (cfg.vision_width, 3, cfg.patch_size, cfg.patch_size):
            return cfg
    raise CheckpointError(f"key {PATCH_KEY!r} has shape {shape}, which is no known CAT-Seg variant "
                          "(ViT-B/16: (768, 3, 16, 16), ViT-L/14: (1024, 3, 14, 14))")


def check_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], variant: str) -> None:
    """Raise on the first missing, unexpected or mis-shaped key."""
    for key, ref in expected.items():
        if key not in state:
            raise CheckpointError(f"missing key {key!r} for CAT-Seg ({variant})")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"key {key!r} has shape {tuple(state[key].shape)}, CAT-Seg ({variant}) "
                                  f"expects {tuple(ref.shape)}")
    for key in state:
        if key not in expected:
            raise CheckpointError(f"unexpected key {key!r} for CAT-Seg ({variant})")


def load_catseg(path: str | Path, semla_recipe: bool = False) -> CATSeg:
    """A CATSeg (eval mode, CPU, float32) with the weights of `path`. `semla_recipe`: SemLA's inference
    settings (class-aggregation pooling (1, 1), sliding window) instead of the checkpoint config's."""
    state = canonical_state(read_state(path))
    cfg = infer_config(state)
    variant = cfg.variant if cfg in known_configs()[:2] else f"{cfg.variant}, reduced"
    if semla_recipe:
        cfg = cfg.with_semla_recipe()
    with torch.device("meta"):
        model = CATSeg(cfg)
    check_keys(state, model.state_dict(), variant)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def official_state_dict(model_or_state: CATSeg | dict[str, torch.Tensor],
                        tied_duplicates: bool = True) -> dict[str, torch.Tensor]:
    """Our weights in the official key layout, the inverse of `canonical_state`: each `attn.{q,k,v}_proj.weight`
    as the official `attn.{q,k,v}_proj_weight`; with `tied_duplicates` also kept under its own name, as SemLA's
    copy of CAT-Seg holds it (without: the layout of the released CAT-Seg checkpoints)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*\.attn\.[qkv]_proj)\.weight", key)
        if m:
            out[f"{m.group(1)}_weight"] = value
        if not m or tied_duplicates:
            out[key] = value
    return out


def save_catseg_safetensors(model_or_state: CATSeg | dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a CATSeg's weights (our key names) as one safetensors file, atomically."""
    from safetensors.torch import save
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in state.items()}))
