"""CAT-Seg as a base segmenter of the library: the segmenter interface (segmenter.py's) around models/catseg.

The package's segmenters take images (B, 3, H, W) in [0, 1] and class "text" made once per vocabulary; the
tiny segmenter's text is CLIP text embeddings. CAT-Seg encodes its class names with its own text tower, and
SemLA's adapters change that tower too (its `mlp.c_fc` / `mlp.c_proj`), so the text must be encoded under each
image's fused adapters, inside the forward. Here a CAT-Seg's class text is therefore its prompt tokens
(T, context) (`class_text`), and the forward encodes them:
- with no fusion selection active (zero-shot, training under peft): once, shared by the batch;
- under a per-image selection of a LibraryModel: B copies of the vocabulary, one per image, which the
  fused text layers see as B image groups along their first axis (core/fusion.py).

`CATSegSegmenter` is CATSeg with these methods (same module names, so official LoRA target names apply and
peft folders it trains are official ones); `load_catseg_segmenter` reads a checkpoint into one, and a
segmenter path "catseg:FILE" names one wherever the package loads a base segmenter.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.fusion import FusedAdapters, Selection, active_selection, selecting
from ..core.fusion_merged import merge_where_cheaper
from .catseg import CATSeg
from .catseg.inference import catseg_scores
from .catseg.model import prompts, tokenize
from .segmenter import upsample_logits

PREFIX = "catseg:"


def catseg_path(segmenter: str | Path | None) -> Path | None:
    """The checkpoint of a segmenter path "catseg:FILE", None for any other path."""
    s = str(segmenter) if segmenter is not None else ""
    return Path(s[len(PREFIX):]) if s.startswith(PREFIX) else None


class CATSegSegmenter(CATSeg):
    """CAT-Seg with the segmenter interface: `class_text(names)`, `to_input_size`, `coarse_logits`, and a forward
    on [0, 1] images of any size returning logits at that size."""

    _fusion_key: object | None = None

    @classmethod
    def wrap(cls, model: CATSeg) -> "CATSegSegmenter":
        """The same object, given this class's methods (no state added; the weights are not copied)."""
        model.__class__ = cls
        return model

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def class_text(self, class_names: list[str]) -> torch.Tensor:
        """The official prompt tokens of each class, (T, context) long: the `text` this segmenter takes."""
        return tokenize(prompts(list(class_names)), self.cfg.context_length)

    def install_fusion(self, fused: FusedAdapters) -> None:
        """Called once a LibraryModel installed its fused adapters: the aggregator's layers, which see every class
        at every pixel, merge each image's adapters into its own weight (core/fusion_merged.py), and the text is
        encoded per image whenever a selection is active."""
        merge_where_cheaper(fused)
        self._fusion_key = fused.key

    def text_features(self, tokens: torch.Tensor, images: int) -> torch.Tensor:
        """tokens (T, context) -> L2-normalised text features (copies, T, 1, E): one copy per image under a fusion
        selection, else one shared copy."""
        per_image = self._fusion_key is not None and active_selection(self._fusion_key) is not None
        tokens = tokens.to(self.clip_model.token_embedding.weight.device)
        feats = self.clip_model.encode_text(tokens.expand(images if per_image else 1, -1, -1))
        return F.normalize(feats, dim=-1)[:, :, None]

    def to_input_size(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, S, S), bilinear, as the official inference resizes before CLIP."""
        S = self.cfg.image_size
        if images.shape[-2:] != (S, S):
            images = F.interpolate(images, size=(S, S), mode="bilinear", align_corners=False)
        return images

    def coarse_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [0, 1], text from `class_text` -> logits (B, T, 4g, 4g) on the token grid g, which
        the official inference resizes to the image in one bilinear step (after its sigmoid)."""
        feats = self.text_features(text, images.shape[0])
        return super().forward(self.normalize(images * 255.0), feats.to(images.dtype))

    @staticmethod
    def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The official training loss: logits (B, T, H, W) against one-hot targets by binary cross-entropy, mean
        over every pixel and class. As in the official code, ignored pixels (255) are not left out: their target
        is all zeros ("no class"), which is how the released adapters were trained."""
        valid = labels != 255
        target = F.one_hot(labels.long().clamp(max=logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2)
        target = target.to(logits.dtype) * valid[:, None]
        return F.binary_cross_entropy_with_logits(logits, target)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], text from `class_text` -> logits (B, T, H, W). In eval mode with
        cfg.sliding_window (SemLA's evaluation protocol), the official test-time path, image by image."""
        if self.cfg.sliding_window and not self.training:
            return self.official_logits(images, text)
        return upsample_logits(self.coarse_logits(self.to_input_size(images), text), images.shape[-2:])

    def official_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The official evaluation's scores (catseg/inference.py: test resize, sliding window of 5 crops, sigmoid)
        as logits, one image at a time, each with its own adapters (its row of the active selection, repeated
        for its crops)."""
        sel = active_selection(self._fusion_key) if self._fusion_key is not None else None
        out = []
        for i, image in enumerate(images):
            scope = nullcontext() if sel is None else selecting(
                self._fusion_key, Selection(sel.indices[i:i + 1], sel.weights[i:i + 1], sel.fusion))
            with scope:
                scores = catseg_scores(_OfficialCall(self), image * 255.0, self.text_features(text, 1))
            out.append(torch.logit(scores.clamp(1e-6, 1 - 1e-6)))
        return torch.stack(out)


class _OfficialCall:
    """A CATSegSegmenter seen with CATSeg's own call convention (normalised images, text features), as
    catseg/inference.py calls the model."""

    def __init__(self, model: CATSegSegmenter):
        self.model, self.cfg, self.normalize = model, model.cfg, model.normalize

    def __call__(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return CATSeg.forward(self.model, images, text)

    def parameters(self):
        return self.model.parameters()


def load_catseg_segmenter(path: str | Path) -> CATSegSegmenter:
    """A CAT-Seg checkpoint (detectron2 .pth read weights-only, or safetensors) as a segmenter in eval mode, set up
    as SemLA's scripts evaluate it (class-aggregation pooling (1, 1), sliding-window inference)."""
    from .catseg import load_catseg
    return CATSegSegmenter.wrap(load_catseg(path, semla_recipe=True)).eval()
