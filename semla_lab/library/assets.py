"""The shipped artifacts of the embedded default: where they live, loading them, and replacing them safely.

assets/tiny_clip.safetensors   the tiny CLIP (fp16), contrastively pretrained on mini-world captions
assets/segmenter.safetensors   the base OV segmenter (visual tower + head), trained on the source domain
assets/library/                the adapter library: one peft LoRA per target domain + centroids
assets/manifest.json           configs, seeds and the metrics each stage reached

`semla-lab build all` (or `make assets`; pipeline.build_assets) rebuilds them deterministically for a given
thread count, in a staging folder beside the artifacts (`staging`); they are replaced only once every stage
has finished (`commit`), so an interrupted rebuild leaves the previous artifacts in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..models.clip import TINY_CLIP, Clip, load_clip
from ..core.io import atomic_write_json
from ..core.errors import MissingFileError
from ..core.runtime import assets_dir, resolve_device
from ..models.segmenter import HeadConfig, OVSegmenter, build_segmenter
from ..models.segmenter_catseg import catseg_path, load_catseg_segmenter
ARTIFACTS = ("tiny_clip.safetensors", "segmenter.safetensors", "library", "manifest.json")   # commit order


def save_weights(state: dict[str, torch.Tensor], path: Path, dtype=None) -> None:
    """safetensors save through a temporary file (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def read_manifest(root: Path | None = None) -> dict:
    path = (root or assets_dir()) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def update_manifest(root: Path, key: str, value: dict) -> None:
    atomic_write_json(root / "manifest.json", {**read_manifest(root), key: value})


def load_segmenter(path: str | Path | None = None, clip: Clip | None = None, device=None) -> OVSegmenter:
    """The shipped base segmenter (or one saved by `build`), built around the tiny CLIP architecture; a path
    "catseg:FILE" is a CAT-Seg checkpoint (models/segmenter_catseg.py), which needs no CLIP."""
    checkpoint = catseg_path(path)
    if checkpoint is not None:
        return load_catseg_segmenter(checkpoint).to(resolve_device(device)).eval()
    root = assets_dir()
    path = Path(path) if path else root / "segmenter.safetensors"
    if not path.is_file():
        raise MissingFileError(f"segmenter weights not found at {path}; run `semla-lab build segmenter`")
    head = HeadConfig(**read_manifest(path.parent).get("segmenter", {}).get("head", {}))
    seg = build_segmenter((clip or load_clip(TINY_CLIP, pretrained="random")).model, head)
    seg.load_state_dict(load_file(str(path)))
    return seg.to(resolve_device(device)).eval()


def base_model_id(path: str | Path | None = None, clip_name: str = TINY_CLIP) -> str:
    """Identity of a segmenter's weights, recorded in every adapter and the library index: the CLIP it
    is built around and a digest of the weights file ("catseg@<digest>" for "catseg:FILE")."""
    checkpoint = catseg_path(path)
    if checkpoint is not None:
        return f"catseg@{file_digest(checkpoint)}"
    path = path or assets_dir() / "segmenter.safetensors"
    model = "semla-tiny" if clip_name == TINY_CLIP else clip_name
    return f"{model}-segmenter@{file_digest(path)}"


@contextmanager
def staging(near: Path, seed: Path | None = None):
    """A new hidden folder beside `near` (same file system, so `commit` only renames), holding copies of
    the model files and manifest of `seed`; stages build into it. Removed on exit, also on error."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp = near.parent / f".{near.name}.build-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name in ARTIFACTS:
            if seed is not None and name != "library" and (Path(seed) / name).is_file():
                shutil.copy2(Path(seed) / name, tmp / name)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_path(new: Path, dest: Path) -> None:
    """Put `new` at `dest`. A file is swapped by one os.replace. A folder: the old one is renamed aside,
    the new one renamed in, then the old one deleted; a crash in between leaves the old folder at
    `.<name>.old-*` beside `dest`, never a half-written one at `dest`."""
    new, dest = Path(new), Path(dest)
    if new.is_file() or not dest.exists():
        os.replace(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{secrets.token_hex(4)}")
    dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old)


def commit(staged: Path, root: Path) -> list[str]:
    """Replace root's artifacts with those built in `staged` (manifest last); returns their names."""
    root.mkdir(parents=True, exist_ok=True)
    names = [name for name in ARTIFACTS if (staged / name).exists()]
    for name in names:
        replace_path(staged / name, root / name)
    return names
