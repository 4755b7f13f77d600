"""A CAT-Seg-style open-vocabulary segmenter on an open_clip vision transformer.

images -> dense CLIP patch features (every token through ln_post and proj) -> cosine cost volume
against the text embeddings of any class names -> a class-agnostic aggregation head run once per
class -> logits (B, T, H, W). The same code wraps the tiny CLIP and real ViT-B/16 or ViT-L/14.

LoRA liveness: open_clip's blocks use nn.MultiheadAttention, whose forward reads
`out_proj.weight` and `in_proj_weight` directly, so a peft LoRA on them is silently dead.
`make_lora_ready` swaps in an attention that calls `in_proj` and `out_proj` as modules.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LORA_TARGETS = r".*visual\.transformer\.resblocks\.\d+\.(attn\.(in_proj|out_proj)|mlp\.(c_fc|c_proj))"


class LiveAttention(nn.Module):
    """Drop-in for batch-first self-attention nn.MultiheadAttention whose projections are real
    nn.Linear calls (so LoRA on them takes effect). Same call signature, returns (out, None)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        assert mha.batch_first and mha._qkv_same_embed_dim, "expects open_clip's batch-first self-attention"
        d = mha.embed_dim
        self.num_heads = mha.num_heads
        self.in_proj = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        B, N, D = query.shape                                                   # (B, N, D)
        q, k, v = self.in_proj(query).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)    # (B, heads, N, D/heads)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D)), None


def make_lora_ready(visual: nn.Module) -> nn.Module:
    """Replace every nn.MultiheadAttention in an open_clip VisionTransformer by LiveAttention (in place)."""
    for block in visual.transformer.resblocks:
        if isinstance(block.attn, nn.MultiheadAttention):
            block.attn = LiveAttention(block.attn)
    return visual


def cost_volume(feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch with every class name: feats (B, D, h, w) and text (T, D), both
    L2-normalised -> (B, T, h, w). Its argmax over T is a segmentation before any learned head."""
    return torch.einsum("bdhw,td->bthw", feats, text)


@dataclass
class HeadConfig:
    guidance_dim: int = 16   # image / text features projected to this many channels per class
    hidden: int = 32         # channels of the per-class aggregation convs
    upsample: int = 2        # learned upsampling before the final bilinear resize
    up_channels: int = 8     # channels of the upsampling convs (they run at the highest resolution)


class AggregationHead(nn.Module):
    """Class-agnostic cost aggregation: every class's cost map, with projected image and text
    guidance, goes through the same convs (so any number of classes works); a mean over classes
    lets classes see each other (CAT-Seg's class aggregation, in its simplest form)."""

    def __init__(self, embed_dim: int, cfg: HeadConfig = HeadConfig()):
        super().__init__()
        g, c = cfg.guidance_dim, cfg.hidden
        self.cfg = cfg
        self.image_guidance = nn.Conv2d(embed_dim, g, 1)
        self.text_guidance = nn.Linear(embed_dim, g)
        self.conv1 = nn.Conv2d(1 + 2 * g, c, 3, padding=1)
        self.class_mix = nn.Linear(c, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.up = nn.Sequential(nn.Conv2d(c, cfg.up_channels, 1),
                                nn.Upsample(scale_factor=cfg.upsample, mode="bilinear", align_corners=False),
                                nn.Conv2d(cfg.up_channels, cfg.up_channels, 3, padding=1), nn.GELU(),
                                nn.Conv2d(cfg.up_channels, 1, 1))
        self.cost_scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """feats (B, D, h, w) and text (T, D), both L2-normalised -> logits (B, T, s*h, s*w)."""
        B, D, h, w = feats.shape
        T = text.shape[0]
        cost = cost_volume(feats, text)                                           # (B, T, h, w) cosine
        img_g = self.image_guidance(feats)[:, None].expand(B, T, -1, h, w)       # (B, T, g, h, w)
        txt_g = self.text_guidance(text)[None, :, :, None, None].expand(B, T, -1, h, w)
        x = torch.cat([cost[:, :, None] * self.cost_scale, img_g, txt_g], 2).flatten(0, 1)
        x = F.gelu(self.conv1(x)).view(B, T, -1, h, w)                           # (B, T, c, h, w)
        x = x + self.class_mix(x.mean(1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)[:, None]
        x = F.gelu(self.conv2(F.gelu(x).flatten(0, 1)))
        out = self.up(x).view(B, T, self.cfg.upsample * h, self.cfg.upsample * w)
        skip = F.interpolate(cost, scale_factor=self.cfg.upsample, mode="bilinear", align_corners=False)
        return out + skip * self.cost_scale


class OVSegmenter(nn.Module):
    """CLIP visual tower (LoRA-ready) + aggregation head. Class names enter as text embeddings, so the
    model predicts any vocabulary. Input images are (B, 3, H, W) in [0, 1]; logits match H, W."""

    def __init__(self, visual: nn.Module, mean: tuple, std: tuple, head_cfg: HeadConfig = HeadConfig()):
        super().__init__()
        self.visual = make_lora_ready(visual)
        self.head = AggregationHead(visual.output_dim, head_cfg)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        size = visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def config(self) -> dict:
        return {"head": asdict(self.head.cfg), "image_size": self.image_size}

    def to_input_size(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, S, S) at the tower's input size S (bilinear); unchanged when already S x S."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        return images

    def transformer_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1 + h*w, width): the visual transformer's output tokens, class token
        first. The embedding steps are those of open_clip's private `VisionTransformer._embeds`, written with
        public attributes only; a test checks the class token against open_clip's own `visual(x)`."""
        images = self.to_input_size(images)
        v = self.visual
        x = v.conv1((images - self.mean) / self.std).flatten(2).transpose(1, 2)   # (B, h*w, width)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return v.transformer(v.ln_pre(v.patch_dropout(torch.cat([cls, x], 1) + v.positional_embedding.to(x.dtype))))

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D, h, w) L2-normalised patch embeddings in CLIP's joint space."""
        v = self.visual
        tokens = v.ln_post(self.transformer_tokens(images)[:, 1:]) @ v.proj          # (B, h*w, D)
        side = int(tokens.shape[1] ** 0.5)
        return F.normalize(tokens, dim=-1).transpose(1, 2).reshape(tokens.shape[0], -1, side, side)

    def coarse_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, T, h, w) logits at the head's resolution, before the upsampling to the image size."""
        return self.head(self.dense_features(images), text.to(images.dtype))

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return upsample_logits(self.coarse_logits(images, text), images.shape[-2:])


def upsample_logits(coarse: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, T, h, w) coarse logits -> (B, T, H, W) at an image's size (bilinear), as the segmenter outputs them."""
    return F.interpolate(coarse, size=tuple(size), mode="bilinear", align_corners=False)


def class_text(segmenter: nn.Module, clip, class_names) -> torch.Tensor:
    """The class text a segmenter takes for `class_names`: its own (`segmenter.class_text`: CAT-Seg's prompt
    tokens, encoded by its own text tower) when it has one, else the CLIP text embeddings (T, D) (embed_class_names)."""
    own = getattr(segmenter, "class_text", None)
    if own is not None:
        return own(list(class_names))
    from .clip import embed_class_names
    return embed_class_names(clip, list(class_names))


def build_segmenter(clip_model: nn.Module, head_cfg: HeadConfig = HeadConfig()) -> OVSegmenter:
    """A segmenter around a copy of a CLIP model's visual tower (the CLIP itself stays untouched)."""
    import copy
    visual = copy.deepcopy(clip_model.visual)
    cfg = visual.preprocess_cfg
    return OVSegmenter(visual, cfg["mean"], cfg["std"], head_cfg)
