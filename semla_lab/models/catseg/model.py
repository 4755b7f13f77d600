"""CAT-Seg as one module, named as the official detectron2 model so its checkpoints and LoRA targets fit.

    CATSeg
    ├── sem_seg_head.predictor.clip_model   CAT-Seg's CLIP (clip.py): dense image tokens, guidance blocks, text
    ├── sem_seg_head.predictor.transformer  the aggregator (aggregator.py)
    └── upsample1, upsample2                transposed convs lifting the guidance blocks to 48 x 48 and 96 x 96

Decisions on the official code's traps (each a deliberate choice, see also clip.py and aggregator.py):
- text embeddings are never cached: `forward` encodes the class names every call, under whatever adapters
  are active. The official evaluation caches the first call's text for good (a new vocabulary, or the next
  image's merged adapter, then silently reuses it); its per-image SemLA path therefore equals ours only with
  the cache reset before each image.
- the guidance is always the outputs of `guidance_layers`. The official training path re-registers its hooks
  after peft wraps the model, so there the second guidance map comes from the first layer's block; we do not
  reproduce that (evaluation, and the released models, use the intended blocks).
- prompts: only the "single" template runs (the official "imagenet" ensemble raises in its forward); a class
  name with ", " uses its first synonym, as the official forward does.
- when per-image LoRA fusion is installed on the text tower (core.fusion), the text is encoded once per image
  under that image's adapters; otherwise once per call and shared by the batch.
The training loss's ignored pixels are the trainer's business (training/), not the model's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.fusion import FusedLoRALinear
from .aggregator import Aggregator
from .clip import CLIP
from .config import SINGLE_TEMPLATE, CATSegConfig

PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)   # the official CLIP_PIXEL_MEAN / STD, for 0-255 RGB
PIXEL_STD = (68.5005327, 66.6321579, 70.3231630)


def prompts(class_names: list[str]) -> list[str]:
    """The official prompt for each class: its first ", "-separated synonym in the single template."""
    return [SINGLE_TEMPLATE.format(name.split(", ")[0]) for name in class_names]


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    """OpenAI CLIP's BPE tokens (N, context_length), as the official `clip.tokenize`."""
    import open_clip
    return open_clip.tokenize(texts, context_length=context_length)


class CATSegPredictor(nn.Module):
    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        self.clip_model = CLIP(cfg)
        self.transformer = Aggregator(cfg)


class CATSegHead(nn.Module):
    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        self.predictor = CATSegPredictor(cfg)


class CATSeg(nn.Module):
    """CAT-Seg: images and class names (or their text features) -> per-class logits at 4x the token grid."""

    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        self.cfg = cfg
        self.sem_seg_head = CATSegHead(cfg)
        self.upsample1 = nn.ConvTranspose2d(cfg.proj_dim, cfg.decoder_guidance_dims[0], kernel_size=2, stride=2)
        self.upsample2 = nn.ConvTranspose2d(cfg.proj_dim, cfg.decoder_guidance_dims[1], kernel_size=4, stride=4)

    @property
    def clip_model(self) -> CLIP:
        return self.sem_seg_head.predictor.clip_model

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in 0..255 -> CLIP-normalised, the model's input convention."""
        mean, std = (torch.tensor(v, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
                     for v in (PIXEL_MEAN, PIXEL_STD))
        return (pixels - mean) / std

    def _text_tower_fused(self) -> bool:
        return any(isinstance(m, FusedLoRALinear) for m in self.clip_model.transformer.modules())

    def encode_text(self, class_names: list[str], copies: int = 1) -> torch.Tensor:
        """Class names -> L2-normalised text features (copies, T, 1, E): one prompt per class (P = 1)."""
        device = self.clip_model.token_embedding.weight.device
        tokens = tokenize(prompts(class_names), self.cfg.context_length).to(device)
        feats = self.clip_model.encode_text(tokens.expand(copies, -1, -1))
        return F.normalize(feats, dim=-1)[:, :, None]

    def forward(self, images: torch.Tensor, classes: list[str] | torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) float32, CLIP-normalised (`normalize` of 0..255 RGB), S = cfg.image_size;
        classes: T class names, or text features (T, P, E) / (B, T, P, E) from `encode_text` ->
        logits (B, T, 4 g, 4 g) for the g x g token grid (96 x 96), before the official sigmoid."""
        B = images.shape[0]
        clip = self.clip_model
        assert images.shape[-1] == self.cfg.image_size, f"resize images to {self.cfg.image_size} (inference.model_input)"
        if isinstance(classes, torch.Tensor):
            text = classes if classes.dim() == 4 else classes[None]
        else:
            text = self.encode_text(classes, copies=B if self._text_tower_fused() else 1)
        text = text.expand(B, -1, -1, -1).to(images.dtype)
        tokens, guidance = clip.visual(images, self.cfg.guidance_layers)
        dense = token_grid(tokens)                                               # (B, E, g, g)
        maps = [dense, self.upsample1(token_grid(guidance[0])), self.upsample2(token_grid(guidance[1]))]
        return self.sem_seg_head.predictor.transformer(dense, text, maps)


def token_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1 + g*g, C) tokens, class token first -> (B, C, g, g) map of the patch tokens."""
    B, n, C = tokens.shape
    g = round((n - 1) ** 0.5)
    return tokens[:, 1:].transpose(1, 2).reshape(B, C, g, g)


def _fill_random(model: nn.Module, generator: torch.Generator) -> None:
    """Every parameter drawn from `generator` in a fixed order: norms' weights near 1, other vectors small,
    matrices with std 1/sqrt(fan-in) (so activations keep their scale through the depth)."""
    norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name in norms:
                p.copy_(1 + 0.1 * noise)
            elif p.dim() < 2:
                p.copy_(0.02 * noise)
            else:
                fan_in = p.shape[0] if name.endswith(("proj", "text_projection")) else p[0].numel()
                p.copy_(noise / fan_in ** 0.5)


def build_catseg(cfg: CATSegConfig, seed: int | None = None) -> CATSeg:
    """A CAT-Seg with random weights, in eval mode; with `seed`, the same weights on every machine."""
    model = CATSeg(cfg)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    _fill_random(model, generator)
    return model.eval()


@torch.no_grad()
def stage_shapes(model: CATSeg, images: torch.Tensor, classes: list[str]) -> dict[str, tuple[int, ...]]:
    """The tensor shape at each stage of one forward (read by forward hooks): model input images (B, 3, S, S)
    and T class names -> {stage: shape}, in the order the data flows."""
    pred, shapes = model.sem_seg_head.predictor, {}

    def record(*names, inputs=False):
        def hook(module, args, out):
            values = args if inputs else (out if isinstance(out, tuple) else (out,))
            for name, value in zip(names, values):
                for i, v in enumerate(value if isinstance(value, list) else [value]):
                    shapes[name.format(i + 1)] = tuple(v.shape)
        return hook

    hooks = [pred.clip_model.visual.register_forward_hook(record("dense CLIP tokens", "guidance block {} tokens")),
             pred.transformer.text_guidance_projection.register_forward_hook(record("text embeddings", inputs=True)),
             model.upsample1.register_forward_hook(record("decoder guidance 1")),
             model.upsample2.register_forward_hook(record("decoder guidance 2")),
             pred.transformer.conv1.register_forward_hook(record("cost volume (B*T, P, h, w)", inputs=True)),
             pred.transformer.layers[-1].register_forward_hook(record("aggregated cost (B, C, T, h, w)")),
             pred.transformer.decoder2.register_forward_hook(record("decoder output (B*T, C, 4h, 4w)"))]
    try:
        shapes["logits"] = tuple(model(images, classes).shape)
    finally:
        for h in hooks:
            h.remove()
    return shapes
