"""A split in memory: the labelled images of one domain, the one type that training, retrieval and
evaluation take, whatever the images came from (the mini world, a dataset folder, a real dataset).

images (N, 3, H, W) uint8; labels (N, H, W) ids into `class_names`, 255 = ignore; one id per image.
`metadata` says where the domain comes from (mini world: dataset, plays, factors, scene); the library
stores it with the domain's adapter. `captions` exist for mini-world images only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.errors import UsageError


@dataclass
class Split:
    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    ids: list[str]
    metadata: dict = field(default_factory=dict)
    captions: list[str] = field(default_factory=list)
    scene_kinds: list[str] = field(default_factory=list)     # each image's scene kind, where known

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def scene(self) -> dict[str, float]:
        """Scene kind mixture (e.g. {"street": 1.0}), where known."""
        return self.metadata.get("scene", {})

    def float_images(self) -> torch.Tensor:
        """(N, 3, H, W) float32 in [0, 1]."""
        return self.images.float() / 255.0

    def head(self, n: int | None) -> "Split":
        """The first n images (all when n is None)."""
        if n is None:
            return self
        return Split(self.name, self.images[:n], self.labels[:n], self.class_names, self.ids[:n], self.metadata,
                     self.captions[:n], self.scene_kinds[:n])


def stack_items(name: str, items, classes, size: int | None = None, metadata: dict | None = None) -> Split:
    """Dataset items (dicts of image (3, H, W) in [0, 1], label (H, W), id; see data/datasets.py) as one Split,
    resized to size x size when given (bilinear images, nearest labels) so that images of several sizes stack."""
    images, labels, ids = [], [], []
    for it in items:
        img, lab = it["image"][None], it["label"][None, None].float()
        if size is not None:
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            lab = F.interpolate(lab, size=(size, size), mode="nearest")
        images.append((img[0].clamp(0, 1) * 255).round().to(torch.uint8))
        labels.append(lab[0, 0].long())
        ids.append(it["id"])
    if not images:
        raise UsageError(f"{name!r} has no images")
    sizes = {tuple(t.shape) for t in images}
    if len(sizes) != 1:
        raise UsageError(f"{name!r} mixes image sizes {sorted(sizes)[:3]}; pass an image size to resize")
    return Split(name, torch.stack(images), torch.stack(labels), list(classes), ids, dict(metadata or {}))
