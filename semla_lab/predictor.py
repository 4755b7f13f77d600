"""SemLA at inference: a segmenter carrying a whole adapter library, and a predictor for people.

`LibraryModel` installs every adapter of a library into a copy of the segmenter once (fused
layers, see fusion.py) and runs any per-image selection: none (zero-shot), one adapter (oracle),
all with equal weights (uniform merge), retrieved top-K (SemLA), or output-level mixing (late
fusion). `SemLAPredictor` is the one object a notebook needs: set an image, then predict for any
class names, and ask what it chose. Notebook 05 steps through it.
"""
from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .clip import Clip, embed_class_names, index_embeddings
from .data import read_image
from .fusion import FusedAdapters
from .errors import UsageError
from .library import lora_scaling
from .retrieval import Retrieval, RetrievalConfig, retrieve
from .runtime import resolve_device


class LibraryModel:
    """A copy of `segmenter` with all adapters of `library` installed for per-image fusion."""

    def __init__(self, segmenter: torch.nn.Module, library, device=None):
        self.device = resolve_device(device)
        self.model = copy.deepcopy(segmenter).to(self.device).eval()
        scaling = partial(lora_scaling, library.lora_config)     # per module: alpha_pattern, rank_pattern
        self.library = library
        self.fused = FusedAdapters(self.model, {n: (library.load_adapter_state(n), scaling) for n in library.names()})
        self.names = self.fused.names

    def embed(self, clip: Clip, images: torch.Tensor) -> torch.Tensor:
        """Query embeddings (N, D) of images, as the library's centroids were made."""
        return index_embeddings(clip, images, self.library.embedder)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, text: torch.Tensor, indices: torch.Tensor | None = None,
               weights: torch.Tensor | None = None, fusion: str = "cat") -> torch.Tensor:
        """(B, T, H, W) logits; `indices`/`weights` (B, K) select adapters per image (None = base)."""
        images, text = images.to(self.device), text.to(self.device)
        if indices is None:
            return self.model(images, text)
        with self.fused.select(indices, weights, fusion):
            return self.model(images, text)

    @torch.no_grad()
    def late_logits(self, images: torch.Tensor, text: torch.Tensor, indices: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
        """Late fusion: one forward per selected adapter, probabilities mixed with the weights.
        Returns log-probabilities (B, T, H, W), so argmax works as for logits."""
        probs = 0
        for k in range(indices.shape[1]):
            out = self.logits(images, text, indices[:, k:k + 1], torch.ones_like(weights[:, k:k + 1]))
            probs = probs + weights[:, k].to(out).view(-1, 1, 1, 1) * out.softmax(1)
        return probs.clamp_min(1e-12).log()


def as_image_tensor(image) -> torch.Tensor:
    """A path, PIL image, numpy HWC array or (3, H, W) tensor -> (3, H, W) float32 in [0, 1]."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise UsageError(f"expected an HxWx3 image array, got shape {image.shape}")
        image = torch.from_numpy(image[..., :3].copy()).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise UsageError("expected an image path, PIL image, HxWx3 array or a (3, H, W) tensor")
    image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    if not torch.isfinite(image).all():
        raise UsageError("image contains NaN or inf values")
    return image


class SemLAPredictor:
    """Embed an image once, retrieve its adapters, then predict masks for any class names.

    >>> p = SemLAPredictor.from_assets()
    >>> p.set_image("street.png", exclude=["acdc_fog"])
    >>> mask = p.predict(["road", "car", "sky"])      # (H, W) class ids
    >>> p.explain()                                   # [(domain, distance, weight), ...]
    """

    def __init__(self, segmenter, clip: Clip, library, config: RetrievalConfig = RetrievalConfig(),
                 fusion: str = "cat", device=None):
        self.clip, self.library, self.config, self.fusion = clip, library, config, fusion
        self.model = LibraryModel(segmenter, library, device)
        self._image: torch.Tensor | None = None
        self.retrieval: Retrieval | None = None

    @classmethod
    def from_assets(cls, library_dir: str | Path | None = None, **kwargs) -> "SemLAPredictor":
        """The embedded default: shipped tiny CLIP, base segmenter and adapter library."""
        from .assets import load_segmenter
        from .clip import load_clip
        from .library import AdapterLibrary
        from .runtime import assets_dir
        clip = load_clip(device=kwargs.get("device"))
        library = AdapterLibrary(library_dir or assets_dir() / "library")
        return cls(load_segmenter(clip=clip, device=kwargs.get("device")), clip, library, **kwargs)

    def set_image(self, image, exclude=()) -> Retrieval:
        """Embed and retrieve once for this image; `exclude` leaves named domains out (leave-one-out)."""
        self._image = as_image_tensor(image)
        embedding = self.model.embed(self.clip, self._image[None])
        self.retrieval = retrieve(embedding, self.library.centroids(self.model.names), self.model.names,
                                  self.config, exclude=exclude)
        return self.retrieval

    @property
    def image(self) -> torch.Tensor:
        """The current image (3, H, W) float in [0, 1]."""
        self._require_image()
        return self._image

    def _require_image(self):
        if self._image is None:
            raise RuntimeError("call set_image(image) before predict() or explain()")

    def logits(self, class_names: list[str], adapt: bool = True) -> torch.Tensor:
        """(T, H, W) logits for the current image; `adapt=False` gives the zero-shot base model."""
        self._require_image()
        text = embed_class_names(self.clip, class_names)
        if not adapt:
            return self.model.logits(self._image[None], text)[0].cpu()
        return self.model.logits(self._image[None], text, self.retrieval.indices, self.retrieval.weights,
                                 self.fusion)[0].cpu()

    def predict(self, class_names: list[str], adapt: bool = True) -> torch.Tensor:
        """(H, W) int64 class ids into `class_names`."""
        return self.logits(class_names, adapt).argmax(0)

    def explain(self) -> list[tuple[str, float, float]]:
        """The chosen domains with their distances and weights, nearest first."""
        self._require_image()
        return self.retrieval.chosen(0)
