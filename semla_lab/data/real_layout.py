"""Writing labelled images into a real dataset's official folder layout, so that the real-data path
(real_data.RealDataset and every step after it) can be run end to end on generated stand-in data
(notebook 09's dry run, the tests) before any download."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .datasets import IGNORE_INDEX
from ..core.errors import UsageError
from .real_data import load_real_spec


def _raw_ids(spec) -> tuple[dict[int, int], int]:
    """class id -> a raw label id that converts to it, and a raw id that converts to ignore."""
    n = len(spec.classes)
    if spec.conversion == "identity":
        return {c: c for c in range(n)}, IGNORE_INDEX
    if spec.conversion == "minus_one":
        return {c: c + 1 for c in range(n)}, 0
    inverse: dict[int, int] = {}
    for raw, cls in spec.id_map.items():
        if cls != IGNORE_INDEX:
            inverse.setdefault(cls, raw)
    ignore = next(i for i in range(256) if spec.id_map.get(i, IGNORE_INDEX) == IGNORE_INDEX)
    return inverse, ignore


def write_real_layout(dataset: str, root: str | Path, images: torch.Tensor, labels: torch.Tensor,
                      class_names: Sequence[str], split: str = "val", domain: str | None = None,
                      prefix: str = "mini") -> list[tuple[str, str]]:
    """Write uint8 images (N, 3, H, W) and labels (N, H, W) (ids into `class_names`, 255 = ignore) under
    `root` in the official layout of a real dataset (data_manifests/real/<dataset>.yaml): file names
    from its glob and pairing regex, label ids in its raw encoding, classes matched by name (names
    the dataset lacks become ignore). Returns the (image, label) paths relative to `root`."""
    spec = load_real_spec(dataset)
    domain = domain or next(iter(spec.domains))
    raw_of, ignore_raw = _raw_ids(spec)
    lut = np.full(256, ignore_raw, dtype=np.int64)
    for i, cname in enumerate(class_names):
        if cname in spec.classes:
            lut[i] = raw_of[spec.classes.index(cname)]
    root = Path(root)
    written = []
    for i in range(len(images)):
        parts = spec.patterns(split, domain)[0].split("*")
        if len(parts) < 2:
            raise UsageError(f"{dataset}: its glob {spec.globs[0]!r} has no '*' to name files after")
        listed = "".join(p + (f"{prefix}_{i:06d}" if j == len(parts) - 2 else prefix)
                         for j, p in enumerate(parts[:-1])) + parts[-1]
        other = spec.partner(listed)
        image_rel, label_rel = (other, listed) if spec.from_labels else (listed, other)
        raw = lut[labels[i].numpy().astype(np.int64)]
        raw[labels[i].numpy() == IGNORE_INDEX] = ignore_raw
        for rel in (image_rel, label_rel):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(root / image_rel, quality=95)
        Image.fromarray(raw.astype(np.uint8) if raw.max() < 256 else raw.astype(np.uint16)).save(root / label_rel)
        written.append((image_rel, label_rel))
    return written
