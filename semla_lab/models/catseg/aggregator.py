"""CAT-Seg's cost aggregator (`sem_seg_head.predictor.transformer`): cost volume -> logits.

cost (B, P, T, 24, 24) cosine of dense CLIP features with P prompt embeddings of T classes
  -> conv1 embedding (B, C, T, 24, 24)
  -> `num_layers` x [spatial aggregation: two Swin blocks (plain, shifted windows) per class, the queries and
     keys seeing the projected appearance guidance; class aggregation: linear attention across classes
     (padded to `pad_len` with learnable tokens) per pixel, queries and keys seeing the projected text]
  -> decoder: two x2 transposed-conv upsamplings, each joined by projected CLIP guidance of blocks
     `guidance_layers` -> one logit per class and pixel (B, T, 96, 96).
Official quirks kept (the checkpoints were trained with them): the class-aggregation residual is
x + up(pool(x) + attention + mlp), i.e. 2x + update when pooling is (1, 1); the padding tokens take part in
the attention; above `pad_len` classes only the top `pad_len` by maximum cost are aggregated, the others get
logit -100. Different from the official only where it cannot change a number: plain (not in-place) ReLU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """timm's Mlp as the official Swin blocks use it: fc1, GELU, fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(N, H, W, C) -> (N * H/w * W/w, w * w, C)."""
    N, H, W, C = x.shape
    return x.view(N, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)


def window_merge(windows: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    """(N * H/w * W/w, w * w, C) -> (N, H, W, C)."""
    C = windows.shape[-1]
    return windows.view(-1, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


class WindowAttention(nn.Module):
    """Attention inside each window; q and k read the features with the guidance appended, v the features."""

    def __init__(self, dim: int, guidance_dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (N windows, n, dim + guidance) -> (N, n, dim); mask (windows per image, n, n) additive."""
        N, n, _ = x.shape
        q, k, v = (t.view(N, n, self.heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x[..., :self.dim])))
        attn = (q * (self.dim // self.heads) ** -0.5) @ k.transpose(-2, -1)     # (N, heads, n, n)
        if mask is not None:
            attn = (attn.view(-1, mask.shape[0], self.heads, n, n) + mask[None, :, None]).view(N, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(N, n, -1))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, guidance_dim: int, resolution: int, heads: int, window: int, shift: int):
        super().__init__()
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, guidance_dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.register_buffer("attn_mask", shifted_window_mask(resolution, window, shift) if shift else None)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x (N, H*W, C), guidance (N, H*W, G) -> (N, H*W, C)."""
        N, L, C = x.shape
        H = W = self.resolution
        y = self.norm1(x).view(N, H, W, C)
        if guidance is not None:
            y = torch.cat([y, guidance.view(N, H, W, -1)], -1)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_merge(self.attn(window_partition(y, self.window), self.attn_mask), self.window, H, W)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(N, L, C)
        return x + self.mlp(self.norm2(x))


def shifted_window_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """Swin's mask for shifted windows: -100 between tokens from different image regions, (windows, n, n)."""
    region = torch.zeros(1, resolution, resolution, 1, device="cpu")   # also when built on the meta device
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
        region[:, h, w, :] = i
    ids = window_partition(region, window)[..., 0]                               # (windows, n)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class SwinBlockPair(nn.Module):
    """Spatial aggregation: a plain and a shifted Swin block over every class's (H, W) map."""

    def __init__(self, dim: int, guidance_dim: int, resolution: int, heads: int, window: int):
        super().__init__()
        self.block_1 = SwinBlock(dim, guidance_dim, resolution, heads, window, 0)
        self.block_2 = SwinBlock(dim, guidance_dim, resolution, heads, window, window // 2)
        self.guidance_norm = nn.LayerNorm(guidance_dim)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W), guidance (B, G, H, W) -> (B, C, T, H, W)."""
        B, C, T, H, W = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)
        g = guidance.flatten(2).transpose(1, 2)                                  # (B, H*W, G)
        g = self.guidance_norm(g.repeat_interleave(T, dim=0))                   # (B*T, H*W, G)
        x = self.block_2(self.block_1(x, g), g)
        return x.view(B, T, H, W, C).permute(0, 4, 1, 2, 3)


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """"Transformers are RNNs" attention with elu + 1 features: q (N, L, H, D), k, v (N, S, H, D) -> (N, L, H, D)."""
    Q, K = elu_feature_map(q), elu_feature_map(k)
    S = v.shape[1]
    KV = torch.einsum("nshd,nshv->nhdv", K, v / S)
    Z = 1 / (torch.einsum("nlhd,nhd->nlh", Q, K.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", Q, KV, Z) * S


class AttentionLayer(nn.Module):
    def __init__(self, dim: int, guidance_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """x (N, T, C), guidance (N, T, G) -> (N, T, C)."""
        xg = torch.cat([x, guidance], -1)
        N, T, C = x.shape
        q, k, v = (t.view(N, T, self.heads, -1) for t in (self.q(xg), self.k(xg), self.v(x)))
        return linear_attention(q, k, v).reshape(N, T, C)


class ClassAttention(nn.Module):
    """Class aggregation: per (pooled) pixel, linear attention across the classes and `pad_len` padding."""

    def __init__(self, dim: int, guidance_dim: int, heads: int, pooling_size: tuple[int, int], pad_len: int):
        super().__init__()
        self.pool = nn.AvgPool2d(pooling_size)
        self.attention = AttentionLayer(dim, guidance_dim, heads)
        self.MLP = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.pad_len = pad_len
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.padding_guidance = nn.Parameter(torch.zeros(1, 1, guidance_dim))

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W), guidance (B, T, G) -> (B, C, T, H, W)."""
        B, C, T, H, W = x.shape
        y = self.pool(x.transpose(1, 2).reshape(B * T, C, H, W))
        h, w = y.shape[-2:]
        y = y.view(B, T, C, h * w)
        pad = self.pad_len - T
        if pad > 0:
            y = torch.cat([y, self.padding_tokens.view(1, 1, C, 1).expand(B, pad, C, h * w)], 1)
            guidance = torch.cat([guidance, self.padding_guidance.expand(B, pad, -1)], 1)
        n = y.shape[1]
        y = y.permute(0, 3, 1, 2).reshape(B * h * w, n, C)                       # (B h w, n, C)
        g = guidance.repeat_interleave(h * w, dim=0)                             # (B h w, n, G)
        y = y + self.attention(self.norm1(y), g)
        y = y + self.MLP(self.norm2(y))
        y = y.view(B, h, w, n, C).permute(0, 3, 4, 1, 2).reshape(B * n, C, h, w)
        y = F.interpolate(y, size=(H, W), mode="bilinear", align_corners=True).view(B, n, C, H, W)
        return x + y[:, :T].transpose(1, 2)


class AggregatorLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.swin_block = SwinBlockPair(cfg.hidden_dim, cfg.appearance_guidance_proj_dim, cfg.feature_resolution,
                                        cfg.num_heads, cfg.window_size)
        self.attention = ClassAttention(cfg.hidden_dim, cfg.text_guidance_proj_dim, cfg.num_heads,
                                        tuple(cfg.pooling_size), cfg.pad_len)

    def forward(self, x, appearance_guidance, text_guidance):
        return self.attention(self.swin_block(x, appearance_guidance), text_guidance)


class DoubleConv(nn.Module):
    """(3x3 conv, GroupNorm of 16-channel groups, ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.GroupNorm(out_channels // 16, out_channels),
            nn.ReLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Up(nn.Module):
    """x2 transposed conv to (in - guidance) channels, the guidance appended, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """x (B*T, C, h, w), guidance (B, G, 2h, 2w) -> (B*T, out, 2h, 2w)."""
        x = self.up(x)
        g = guidance.repeat_interleave(x.shape[0] // guidance.shape[0], dim=0)
        return self.conv(torch.cat([x, g], 1))


class Aggregator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.pad_len = cfg.pad_len
        self.layers = nn.ModuleList([AggregatorLayer(cfg) for _ in range(cfg.num_layers)])
        self.conv1 = nn.Conv2d(1, cfg.hidden_dim, kernel_size=7, stride=1, padding=3)    # one prompt channel
        self.guidance_projection = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.appearance_guidance_proj_dim, 3, padding=1), nn.ReLU())
        self.text_guidance_projection = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.text_guidance_proj_dim), nn.ReLU())
        self.decoder_guidance_projection = nn.ModuleList([
            nn.Sequential(nn.Conv2d(d, p, 3, padding=1), nn.ReLU())
            for d, p in zip(cfg.decoder_guidance_dims, cfg.decoder_guidance_proj_dims)])
        self.decoder1 = Up(cfg.hidden_dim, cfg.decoder_dims[0], cfg.decoder_guidance_proj_dims[0])
        self.decoder2 = Up(cfg.decoder_dims[0], cfg.decoder_dims[1], cfg.decoder_guidance_proj_dims[1])
        self.head = nn.Conv2d(cfg.decoder_dims[1], 1, kernel_size=3, padding=1)

    def forward(self, img_feats: torch.Tensor, text_feats: torch.Tensor, guidance: list[torch.Tensor]) -> torch.Tensor:
        """img_feats (B, E, h, w) dense CLIP features; text_feats (B, T, P, E); guidance: the appearance map
        (B, E, h, w) and the two decoder maps (B, 256, 2h, 2w), (B, 128, 4h, 4w) -> logits (B, T, 4h, 4w)."""
        img = F.normalize(img_feats, dim=1)
        text = F.normalize(text_feats, dim=-1)
        B, T = text.shape[:2]
        keep = None
        if T > self.pad_len:       # aggregate only the pad_len classes with the highest cost anywhere
            best = torch.einsum("bchw,btpc->btphw", img, text).flatten(2).max(-1).values
            keep = best.topk(self.pad_len, dim=-1, sorted=False).indices           # (B, pad_len)
            text = torch.gather(text, 1, keep[..., None, None].expand(-1, -1, *text.shape[2:]))
        cost = torch.einsum("bchw,btpc->bpthw", img, text)                       # (B, P, T', h, w)
        P, Tk, h, w = cost.shape[1:]
        x = self.conv1(cost.transpose(1, 2).reshape(B * Tk, P, h, w))
        x = x.view(B, Tk, -1, h, w).transpose(1, 2)                              # (B, C, T', h, w)
        appearance = self.guidance_projection(guidance[0])
        decoder_guidance = [proj(g) for proj, g in zip(self.decoder_guidance_projection, guidance[1:])]
        text_guidance = self.text_guidance_projection(F.normalize(text.mean(-2), dim=-1))   # (B, T', G)
        for layer in self.layers:
            x = layer(x, appearance, text_guidance)
        y = x.transpose(1, 2).reshape(B * Tk, -1, h, w)
        y = self.decoder2(self.decoder1(y, decoder_guidance[0]), decoder_guidance[1])
        logits = self.head(y).view(B, Tk, *y.shape[-2:])
        if keep is None:
            return logits
        out = logits.new_full((B, T, *logits.shape[-2:]), -100.0)
        return out.scatter_(1, keep[..., None, None].expand_as(logits), logits)
