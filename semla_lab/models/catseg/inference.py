"""CAT-Seg's official test-time path: one RGB image -> per-class scores at the image's own size.

As the official evaluation (detectron2 mapper + `CATSeg.forward` / `inference_sliding_window`):
1. test resize (detectron2 ResizeShortestEdge): shorter side to `min_size`, longer side at most `max_size`,
   PIL bilinear for uint8 images; the official configs set these per dataset (640 / 2560 by default);
2a. whole image: CLIP-normalise, zero-pad to a multiple of 32, resize to the model's square input, forward;
2b. sliding window: resize to 640 x 640, four 384-px crops (stride 256) plus the whole image at 384 px, each
    resized to the model input, one batch; crop scores are averaged where they overlap, then averaged with the
    whole-image scores;
3. sigmoid, then bilinear to the original size. Scores are probabilities in [0, 1], as the official outputs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIZE_DIVISIBILITY = 32            # the official MODEL.MASK_FORMER.SIZE_DIVISIBILITY
WINDOW, OVERLAP, WINDOW_RES = 384, 0.333, 640   # the official inference_sliding_window defaults


def test_resize_shape(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge output size; min_size 0 keeps the image as it is."""
    if min_size == 0:
        return h, w
    scale = min_size / min(h, w)
    newh, neww = (min_size, scale * w) if h < w else (scale * h, min_size)
    if max(newh, neww) > max_size:
        scale = max_size / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def test_resize(image: torch.Tensor, min_size: int, max_size: int) -> torch.Tensor:
    """(3, H, W) RGB 0..255 -> float32 (3, h, w) resized as detectron2 does (PIL bilinear for uint8)."""
    h, w = test_resize_shape(*image.shape[-2:], min_size, max_size)
    if (h, w) == tuple(image.shape[-2:]):
        return image.float()
    if image.dtype == torch.uint8:
        from PIL import Image
        pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).resize((w, h), Image.BILINEAR)
        return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().to(image.device)
    return F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]


def model_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) RGB 0..255 -> the model's input (B, 3, S, S): normalised, zero-padded to a multiple of 32
    (after normalising, as detectron2's ImageList), resized bilinearly to S."""
    x = model.normalize(images.float())
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % SIZE_DIVISIBILITY, -w % SIZE_DIVISIBILITY
    x = F.pad(x, (0, pad_w, 0, pad_h))
    S = model.cfg.image_size
    return F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)


def _whole(model, image, text):
    scores = model(model_input(model, image[None]), text).sigmoid()[0]          # (T, 4g, 4g)
    return scores[:, :image.shape[-2], :image.shape[-1]]    # the official crop to the input size (a no-op above 96 px)


def _sliding(model, image, text):
    stride = int(WINDOW * (1 - OVERLAP))
    unfold = nn.Unfold(kernel_size=WINDOW, stride=stride)
    fold = nn.Fold((WINDOW_RES, WINDOW_RES), kernel_size=WINDOW, stride=stride)
    big = F.interpolate(image[None], size=(WINDOW_RES, WINDOW_RES), mode="bilinear", align_corners=False)[0]
    crops = unfold(big).T.reshape(-1, 3, WINDOW, WINDOW)                      # (L, 3, 384, 384)
    whole = F.interpolate(image[None], size=(WINDOW, WINDOW), mode="bilinear", align_corners=False)
    x = model.normalize(torch.cat([crops, whole]))
    S = model.cfg.image_size
    x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
    out = F.interpolate(model(x, text), size=WINDOW, mode="bilinear", align_corners=False).sigmoid()
    ones = torch.ones(1, WINDOW_RES, WINDOW_RES, device=image.device)
    tiled = fold(out[:-1].flatten(1).T) / fold(unfold(ones))                  # (T, 640, 640)
    whole_out = F.interpolate(out[-1:], size=(WINDOW_RES, WINDOW_RES), mode="bilinear", align_corners=False)[0]
    return (tiled + whole_out) / 2


@torch.no_grad()
def catseg_scores(model: nn.Module, image: torch.Tensor, classes: list[str] | torch.Tensor, *,
                  sliding_window: bool | None = None, min_size: int = 640, max_size: int = 2560) -> torch.Tensor:
    """One image (3, H, W) RGB, uint8 or float in 0..255 -> scores (T, H, W) in [0, 1] as the official
    evaluation computes them. `classes`: class names or text features (model.encode_text). `sliding_window`
    None follows model.cfg. Under per-image LoRA fusion, the sliding window runs 5 crops of this one image as a
    batch: select the image's adapters for 5 rows."""
    H, W = image.shape[-2:]
    resized = test_resize(image, min_size, max_size).to(next(model.parameters()).device)
    sliding = model.cfg.sliding_window if sliding_window is None else sliding_window
    scores = (_sliding if sliding else _whole)(model, resized, classes)
    return F.interpolate(scores[None], size=(H, W), mode="bilinear", align_corners=False)[0]
