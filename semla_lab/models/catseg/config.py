"""CAT-Seg's architecture in one dataclass: the two published variants and small ones for tests.

Field values follow the official configs (`vitb_384.yaml`, `vitl_336.yaml`, the CAT-Seg releases). The
official code derives the guidance layers, the CLIP input size and the `upsample1/2` in-channels from the
CLIP name; here they are plain fields, so a reduced model runs the same code at a fraction of the cost.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

VARIANTS = ("B", "L")
SINGLE_TEMPLATE = "A photo of a {} in the scene"   # the official PROMPT_ENSEMBLE_TYPE "single"


@dataclass(frozen=True)
class CATSegConfig:
    variant: str = "L"                       # "B": OpenAI CLIP ViT-B/16 at 384 px; "L": ViT-L/14 at 336 px
    # CLIP image tower
    image_size: int = 336                    # CAT-Seg resizes every input to this square
    clip_size: int = 336                     # CLIP's pretraining size: positional rows = (clip_size / patch)^2 + 1
    patch_size: int = 14
    vision_width: int = 1024                 # heads = width // 64, as OpenAI CLIP
    vision_layers: int = 24
    guidance_layers: tuple[int, int] = (7, 15)   # blocks whose outputs feed upsample1 and upsample2
    # CLIP text tower
    embed_dim: int = 768                     # joint space; also the text and appearance guidance dims
    text_width: int = 768
    text_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    # aggregator (sem_seg_head.predictor.transformer)
    hidden_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    text_guidance_proj_dim: int = 128
    appearance_guidance_proj_dim: int = 128
    decoder_dims: tuple[int, int] = (64, 32)
    decoder_guidance_dims: tuple[int, int] = (256, 128)     # upsample1 / upsample2 out-channels
    decoder_guidance_proj_dims: tuple[int, int] = (32, 16)
    pooling_size: tuple[int, int] = (2, 2)   # class aggregation pooling; SemLA's scripts run (1, 1)
    feature_resolution: int = 24             # the 24 x 24 token grid (hard-coded in the official model)
    window_size: int = 12
    pad_len: int = 256                       # classes are padded to (or top-k cut to) this many
    # inference
    sliding_window: bool = False             # SemLA's scripts set TEST.SLIDING_WINDOW True

    @property
    def vision_heads(self) -> int:
        return self.vision_width // 64

    @property
    def text_heads(self) -> int:
        return self.text_width // 64

    @property
    def proj_dim(self) -> int:
        """In-channels of upsample1/2: the width of the guidance blocks' tokens."""
        return self.vision_width

    @classmethod
    def vit_b16(cls) -> CATSegConfig:
        """CAT-Seg (B): OpenAI CLIP ViT-B/16 (224-px positional rows, interpolated to 384 px)."""
        return cls(variant="B", image_size=384, clip_size=224, patch_size=16, vision_width=768, vision_layers=12,
                   guidance_layers=(3, 7), embed_dim=512, text_width=512)

    @classmethod
    def vit_l14(cls) -> CATSegConfig:
        """CAT-Seg (L), the paper's backbone: OpenAI CLIP ViT-L/14 at 336 px."""
        return cls()

    @classmethod
    def reduced(cls, variant: str) -> CATSegConfig:
        """The same architecture as variant "B" or "L" (patch, sizes, guidance layers, 24 x 24 grid) with
        small widths: for tests and fixtures. The visual tower keeps one block past the last guidance layer."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        full = cls.vit_b16() if variant == "B" else cls.vit_l14()
        return replace(full, vision_width=128, vision_layers=full.guidance_layers[1] + 2, embed_dim=64,
                       text_width=64, text_layers=2, hidden_dim=32, text_guidance_proj_dim=32,
                       appearance_guidance_proj_dim=32, decoder_dims=(32, 16), decoder_guidance_proj_dims=(16, 8))

    def with_semla_recipe(self) -> CATSegConfig:
        """The settings SemLA's training and evaluation scripts pass on the command line."""
        return replace(self, pooling_size=(1, 1), sliding_window=True)
