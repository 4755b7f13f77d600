"""The mini world as a folder of ordinary photos, like the folder a user brings: JPEG, PNG and BMP files of
mixed sizes, optional label masks with the same stems in one shared vocabulary, and one corrupt file.
Notebook 12 and the tests analyse such folders (`semla-lab analyze`).

Each image is a mini-world test sample rendered at the domain's size and resized to its photo size
(bicubic; labels nearest), so content and appearance are those of its domain at any resolution.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ...core.errors import UsageError
from .generate import generate, get_domain, mini_dir
from .spec import load_vocabularies

SIZES = ((96, 64), (64, 64), (160, 120), (600, 512), (240, 320))     # (width, height), cycled
FORMATS = (".jpg", ".png", ".bmp")                                    # cycled
CORRUPT = "corrupt.jpg"


def _vocabulary(name: str) -> dict[str, str]:
    vocabularies = load_vocabularies(mini_dir() / "vocabularies.yaml")
    if name not in vocabularies:
        raise UsageError(f"unknown vocabulary {name!r}; known: {', '.join(vocabularies)}")
    return vocabularies[name]


def vocabulary_classes(vocabulary: str) -> list[str]:
    """Class names, in label-id order, of one of the mini world's label vocabularies (e.g. "cityscapes")."""
    return list(_vocabulary(vocabulary).values())


def _label_lut(domain_vocabulary: dict[str, str], target: dict[str, str]) -> np.ndarray:
    """(256,) uint8: a domain's class id -> the target vocabulary's id of the same concept (255 if absent)."""
    lut = np.full(256, 255, dtype=np.uint8)
    concepts = list(target)
    for class_id, concept in enumerate(domain_vocabulary):
        if concept in target:
            lut[class_id] = concepts.index(concept)
    return lut


def write_photo_folder(folder: str | Path, domains: Sequence[str], per_domain: int,
                       sizes: Sequence[tuple[int, int]] = SIZES, labels: str | Path | None = None,
                       vocabulary: str = "cityscapes", corrupt: bool = True) -> list[Path]:
    """Write `per_domain` test images of each domain (shipped names or spec files, e.g. the held-out
    ones) into `folder` as `<domain>_<i>.<ext>`, sizes and formats cycling through `sizes` and FORMATS.
    With `labels`, also write each image's label mask (8-bit PNG, ids into `vocabulary_classes(vocabulary)`,
    255 = ignore) there under the same stem. With `corrupt`, add CORRUPT: the first bytes of a JPEG.
    Returns the image files written, corrupt one last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = _vocabulary(vocabulary)
    if labels is not None:
        Path(labels).mkdir(parents=True, exist_ok=True)
    written, n = [], 0
    for name in domains:
        spec = get_domain(name)
        data = generate(spec, "test", per_domain)
        lut = _label_lut(spec.vocabulary, target)
        for i in range(len(data)):
            size, ext = sizes[n % len(sizes)], FORMATS[n % len(FORMATS)]
            n += 1
            stem = f"{spec.name}_{i:03d}"
            image = Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).resize(size, Image.Resampling.BICUBIC)
            image.save(folder / f"{stem}{ext}", **({"quality": 92} if ext == ".jpg" else {}))
            written.append(folder / f"{stem}{ext}")
            if labels is not None:
                label = Image.fromarray(lut[data.labels[i].numpy()]).resize(size, Image.Resampling.NEAREST)
                label.save(Path(labels) / f"{stem}.png")
    if corrupt:
        jpeg = written[0].read_bytes() if written and written[0].suffix == ".jpg" else b"\xff\xd8\xff\xe0"
        (folder / CORRUPT).write_bytes(jpeg[:300])             # a JPEG cut short: the header reads, the pixels do not
        written.append(folder / CORRUPT)
    return written
