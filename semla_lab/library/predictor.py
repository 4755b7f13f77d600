"""SemLA at inference: a segmenter carrying a whole adapter library, and a predictor for people.

`LibraryModel` installs every adapter of a library into a copy of the segmenter once (fused
layers, see fusion.py) and runs any per-image selection: none (zero-shot), one adapter (oracle),
all with equal weights (uniform merge), retrieved top-K (SemLA), or output-level mixing (late
fusion). `SemLAPredictor` is the one object a notebook needs: set an image (or a list of images of
any sizes, embedded and segmented in batches), then predict for any class names, and ask what it chose.
Notebook 05 steps through it; notebook 12 runs it on a folder of photos.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..models.clip import Clip, embed_class_names, embedder_input, index_embeddings
from ..data.datasets import read_image
from ..core.fusion import FusedAdapters
from ..core.errors import UsageError
from .index import lora_scaling
from ..core.retrieval import DomainIndex, Retrieval, RetrievalConfig
from ..core.runtime import resolve_device
from ..models.segmenter import class_text, upsample_logits


class LibraryModel:
    """A copy of `segmenter` with all adapters of `library` installed for per-image fusion."""

    def __init__(self, segmenter: torch.nn.Module, library, device=None):
        self.device = resolve_device(device)
        self.model = copy.deepcopy(segmenter).to(self.device).eval()
        scaling = partial(lora_scaling, library.lora_config)     # per module: alpha_pattern, rank_pattern
        self.library = library
        self.fused = FusedAdapters(self.model, {n: (library.load_adapter_state(n), scaling) for n in library.names()})
        install = getattr(self.model, "install_fusion", None)     # a segmenter whose layers see images otherwise
        if install is not None:                                    # (CAT-Seg: segmenter_catseg.py)
            install(self.fused)
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
    def logits_per_image(self, images: Sequence[torch.Tensor], text: torch.Tensor, indices: torch.Tensor | None = None,
                         weights: torch.Tensor | None = None, fusion: str = "cat") -> list[torch.Tensor]:
        """One forward for images of any sizes, each (3, H_i, W_i): every image is resized to the model's
        input as the segmenter itself resizes, and its coarse logits are upsampled back to its own size:
        a list of (T, H_i, W_i) on the CPU, equal to calling `logits` once per image."""
        batch = torch.cat([self.model.to_input_size(im[None].to(self.device)) for im in images])
        select = nullcontext() if indices is None else self.fused.select(indices, weights, fusion)
        with select:
            coarse = self.model.coarse_logits(batch, text.to(self.device))             # (B, T, h, w)
        return [upsample_logits(coarse[i:i + 1], im.shape[-2:])[0].cpu() for i, im in enumerate(images)]

    @torch.no_grad()
    def late_logits(self, images: torch.Tensor, text: torch.Tensor, indices: torch.Tensor,
                    weights: torch.Tensor, base_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Late fusion: one forward per selected adapter, probabilities mixed with the weights (and the base
        model's with `base_weights` (B,), the coverage fallback's null adapter).
        Returns log-probabilities (B, T, H, W), so argmax works as for logits."""
        probs = 0
        for k in range(indices.shape[1]):
            out = self.logits(images, text, indices[:, k:k + 1], torch.ones_like(weights[:, k:k + 1]))
            probs = probs + weights[:, k].to(out).view(-1, 1, 1, 1) * out.softmax(1)
        if base_weights is not None:
            out = self.logits(images, text)
            probs = probs + base_weights.to(out).view(-1, 1, 1, 1) * out.softmax(1)
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
    >>> p.set_image_batch(["a.jpg", "b.png"])         # any sizes; embedded and segmented `batch_size` at a time
    >>> masks = p.predict_batch(["road", "sky"])      # one (H_i, W_i) mask per image
    """

    def __init__(self, segmenter, clip: Clip, library, config: RetrievalConfig = RetrievalConfig(),
                 fusion: str = "cat", device=None, batch_size: int = 32):
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.clip, self.library, self.config, self.fusion = clip, library, config, fusion
        self.batch_size = batch_size
        self._segmenter, self._device, self._model = segmenter, device, None
        self._images: list[torch.Tensor] = []
        self._exclude: list[str] = []
        self.index = DomainIndex.from_library(library)
        self.retrieval: Retrieval | None = None
        self.embeddings: torch.Tensor | None = None     # (N, D) of the images set, None when a retrieval was given

    @classmethod
    def from_assets(cls, library_dir: str | Path | None = None, **kwargs) -> "SemLAPredictor":
        """The embedded default: shipped tiny CLIP, base segmenter and adapter library."""
        from .assets import load_segmenter
        from ..models.clip import load_clip
        from .index import AdapterLibrary
        from ..core.runtime import assets_dir
        clip = load_clip(device=kwargs.get("device"))
        library = AdapterLibrary(library_dir or assets_dir() / "library")
        return cls(load_segmenter(clip=clip, device=kwargs.get("device")), clip, library, **kwargs)

    @property
    def model(self) -> LibraryModel:
        """The segmenter with every adapter installed; built on first use (retrieval alone never needs it)."""
        if self._model is None:
            self._model = LibraryModel(self._segmenter, self.library, self._device)
        return self._model

    def set_image(self, image, exclude=()) -> Retrieval:
        """Embed and retrieve once for this image; `exclude` leaves named domains out (leave-one-out)."""
        return self.set_image_batch([image], exclude)

    def set_image_batch(self, images: Sequence, exclude=(), retrieval: Retrieval | None = None) -> Retrieval:
        """Embed (in batches) and retrieve once for each image (paths, PIL images, arrays or (3, H, W) tensors
        of any sizes): a Retrieval with one row per image. Pass `retrieval` (one row per image, e.g. rows of
        an earlier result) to reuse it instead of embedding again."""
        images = [as_image_tensor(im) for im in images]
        if not images:
            raise UsageError("set_image_batch needs at least one image")
        embeddings = None
        if retrieval is None:
            chunks = [torch.cat([embedder_input(im[None], self.clip, self.library.embedder)
                                 for im in images[i:i + self.batch_size]])
                      for i in range(0, len(images), self.batch_size)]
            embeddings = torch.cat([index_embeddings(self.clip, c, self.library.embedder, batch_size=self.batch_size)
                                    for c in chunks])                          # (N, D)
            retrieval = None if self.config.text_weight > 0 else self._search(embeddings, exclude)
        elif len(retrieval.indices) != len(images):
            raise UsageError(f"retrieval has {len(retrieval.indices)} rows for {len(images)} images")
        self._images, self.retrieval, self.embeddings = images, retrieval, embeddings
        self._exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        return retrieval

    def _search(self, embeddings: torch.Tensor, exclude, class_text: torch.Tensor | None = None) -> Retrieval:
        return self.index.search(embeddings, self.config, [exclude] if isinstance(exclude, str) else list(exclude),
                                 class_text=class_text)

    def _retrieval_for(self, class_names: list[str]) -> Retrieval:
        """The images' retrieval; text-aware retrieval (config.text_weight > 0) is made here, with the CLIP text
        embeddings of the prediction's class names."""
        if self.config.text_weight > 0 and self.embeddings is not None:
            self.retrieval = self._search(self.embeddings, self._exclude, embed_class_names(self.clip, class_names))
        return self.retrieval

    @property
    def image(self) -> torch.Tensor:
        """The current image (3, H, W) float in [0, 1]."""
        self._require_image()
        return self._images[0]

    def _require_image(self, single: bool = True):
        if not self._images:
            raise RuntimeError("call set_image(image) or set_image_batch(images) before predicting or explaining")
        if single and len(self._images) != 1:
            raise RuntimeError(f"{len(self._images)} images are set: use predict_batch() and explain_batch()")

    def logits(self, class_names: list[str], adapt: bool = True) -> torch.Tensor:
        """(T, H, W) logits for the current image; `adapt=False` gives the zero-shot base model."""
        self._require_image()
        text = class_text(self._segmenter, self.clip, class_names)
        if not adapt:
            return self.model.logits(self._images[0][None], text)[0].cpu()
        retrieval = self._retrieval_for(class_names)
        return self.model.logits(self._images[0][None], text, retrieval.indices, retrieval.weights,
                                 self.fusion)[0].cpu()

    def predict(self, class_names: list[str], adapt: bool = True) -> torch.Tensor:
        """(H, W) int64 class ids into `class_names`."""
        return self.logits(class_names, adapt).argmax(0)

    def predict_batch(self, class_names: list[str], adapt: bool = True) -> list[torch.Tensor]:
        """One (H_i, W_i) int64 mask per image set with set_image_batch, `batch_size` images per forward."""
        self._require_image(single=False)
        text = class_text(self._segmenter, self.clip, class_names)
        retrieval = self._retrieval_for(class_names) if adapt else None
        masks = []
        for start in range(0, len(self._images), self.batch_size):
            rows = slice(start, start + self.batch_size)
            selection = (retrieval.indices[rows], retrieval.weights[rows], self.fusion) if adapt else ()
            masks += [lg.argmax(0) for lg in self.model.logits_per_image(self._images[rows], text, *selection)]
        return masks

    def explain(self) -> list[tuple[str, float, float]]:
        """The chosen domains with their distances and weights, nearest first; with the coverage fallback,
        then ("base model", nan, its weight)."""
        self._require_image()
        return self.explain_batch()[0]

    def explain_batch(self) -> list[list[tuple[str, float, float]]]:
        """explain() for every image set with set_image_batch."""
        self._require_image(single=False)
        if self.retrieval is None:
            raise RuntimeError("text-aware retrieval waits for the class names: call predict() before explain()")
        base = self.retrieval.base_weights
        return [self.retrieval.chosen(q) + ([] if base is None else [("base model", float("nan"), float(base[q]))])
                for q in range(len(self._images))]
