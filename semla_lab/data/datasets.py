"""One on-disk dataset format for mini-world and real data, and a torch Dataset that reads it.

Layout of a dataset folder:
    manifest.json   {"name", "classes": [...], "ignore_index": 255,
                     "samples": [{"id", "image", "label", "split", "domain"}, ...]}
    images/<id>.png RGB
    labels/<id>.png 8-bit label ids into "classes"; 255 = ignore
Every item is a dict: image (3, H, W) float32 in [0, 1], label (H, W) int64, id, domain.
"""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..core.errors import SemlaError
from ..core.io import atomic_write_json

IGNORE_INDEX = 255
MANIFEST = "manifest.json"
MAX_PIXELS = 4096 * 4096   # refuse decompression bombs; resize bigger images before use
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")   # a dataset name is a folder name (library domains)


class DataError(SemlaError, ValueError):
    """A dataset, image or label file is missing or malformed; the message names the file."""


def read_image(path: str | Path) -> torch.Tensor:
    """Any readable image file -> (3, H, W) float32 in [0, 1]. Grayscale, palette, RGBA (alpha
    dropped) and 16-bit images are converted; unreadable or empty files raise DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            if im.width * im.height == 0:
                raise DataError(f"image has zero size: {path}")
            if im.width * im.height > MAX_PIXELS:
                raise DataError(f"image {path} is {im.width}x{im.height}, above the {MAX_PIXELS} pixel limit; "
                                "resize it first")
            im.load()
            return pil_to_tensor(im)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def _full_scale(im: Image.Image) -> float | None:
    """The largest value of a single-channel integer image's mode (its bit depth), None for 8-bit modes."""
    if im.mode.startswith("I;16"):
        return 65535.0
    if im.mode == "I":           # 32-bit signed; a PNG holds at most 16 bits (older Pillow opens those as "I")
        return 65535.0 if im.format == "PNG" else 2.0 ** 31 - 1
    return None


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """A PIL image of any mode -> (3, H, W) float32 in [0, 1]. 16- and 32-bit grayscale are scaled by the
    full scale of their bit depth, never by the data (a dark 16-bit photo stays dark)."""
    full = _full_scale(im)
    if full is not None:
        arr = np.clip(np.asarray(im, dtype=np.float64) / full, 0, 1).astype(np.float32)
        return torch.from_numpy(np.repeat(arr[None], 3, 0).copy())
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def read_label(path: str | Path, num_classes: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An 8-bit label PNG -> (H, W) int64. Ids must be < num_classes or 255; `size` (H, W), when
    given, must match the image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"label {path} has mode {im.mode}; expected a single-channel id map (L or P)")
            arr = np.asarray(im).astype(np.int64)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read label {path}: {e}") from None
    if size is not None and tuple(arr.shape) != tuple(size):
        raise DataError(f"label {path} is {arr.shape[1]}x{arr.shape[0]} but its image is {size[1]}x{size[0]}")
    bad = np.unique(arr[(arr >= num_classes) & (arr != IGNORE_INDEX)])
    if len(bad):
        raise DataError(f"label {path} has ids {bad[:10].tolist()} outside the {num_classes} classes (255 = ignore)")
    return torch.from_numpy(arr)


def write_dataset(root: str | Path, name: str, classes: list[str], samples: Iterable[dict]) -> Path:
    """Write samples ({id, image (3,H,W) uint8, label (H,W) uint8, split, domain}) as a dataset folder.
    The manifest is written last and atomically, so a crash leaves no half-listed dataset."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    entries = []
    for s in samples:
        file_id = s["id"].replace("/", "__")
        Image.fromarray(s["image"].permute(1, 2, 0).numpy()).save(root / "images" / f"{file_id}.png")
        Image.fromarray(s["label"].numpy(), mode="L").save(root / "labels" / f"{file_id}.png")
        entries.append({"id": s["id"], "image": f"images/{file_id}.png", "label": f"labels/{file_id}.png",
                        "split": s["split"], "domain": s["domain"]})
    ids = [e["id"] for e in entries]
    if len(set(ids)) != len(ids):
        raise DataError(f"duplicate sample ids in dataset {name!r}")
    atomic_write_json(root / MANIFEST, {"name": name, "classes": list(classes), "ignore_index": IGNORE_INDEX,
                                        "samples": entries})
    return root


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {root}: not a semla_lab dataset folder "
                        "(write one with `semla-lab world` or semla_lab.data.datasets.write_dataset)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    for key in ("classes", "samples"):
        if key not in manifest:
            raise DataError(f"{path} lacks the {key!r} field")
    if not manifest["classes"]:
        raise DataError(f"{path} lists no classes")
    ids = [s.get("id") for s in manifest["samples"]]
    dupes = {i for i in ids if ids.count(i) > 1} if len(set(ids)) != len(ids) else set()
    if dupes:
        raise DataError(f"{path} has duplicate sample ids: {sorted(dupes)[:5]}")
    name = manifest.get("name", root.name)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise DataError(f"{path}: name {name!r} is not usable as a folder name; use 1-128 letters, digits, "
                        "'_', '-' or '.', not starting with '.'")
    for s in manifest["samples"]:
        for key in ("image", "label"):
            rel = s.get(key)
            parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
            if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
                raise DataError(f"{path}: sample {s.get('id')!r} has {key} path {rel!r}; paths must be relative "
                                "and stay inside the dataset folder")
    return manifest


class SegmentationDataset(Dataset):
    """A dataset folder (see module docstring), optionally filtered by split and domain."""

    def __init__(self, root: str | Path, split: str | None = None, domain: str | None = None):
        self.root = Path(root)
        manifest = read_manifest(self.root)
        self.name = manifest.get("name", self.root.name)
        self.classes: list[str] = manifest["classes"]
        self.samples = [s for s in manifest["samples"]
                        if (split is None or s["split"] == split) and (domain is None or s["domain"] == domain)]
        if not self.samples:
            raise DataError(f"dataset {self.root} has no samples for split={split!r}, domain={domain!r}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        image = read_image(self.root / s["image"])
        label = read_label(self.root / s["label"], len(self.classes), tuple(image.shape[1:]))
        return {"image": image, "label": label, "id": s["id"], "domain": s["domain"]}
