"""CAT-Seg's own CLIP: OpenAI CLIP's image and text towers as the official CAT-Seg modifies them.

Module and parameter names mirror the official model, so official LoRA target names resolve unchanged.
What runs, and so which LoRA targets act, is the official's too:
- attention reads its projections' weights (`attn.q_proj/k_proj/v_proj/out_proj`) directly, as
  `nn.MultiheadAttention` does in the official model: a LoRA on them is inert; `mlp.c_fc` and `mlp.c_proj`
  are called as modules and act;
- the last image block runs CAT-Seg's dense forward: every token becomes out_proj(v_proj(ln_1(x_i))) plus the
  input class token, then the MLP;
- the outputs of the guidance blocks are returned (the official collects them with forward hooks).
Layout: batch first, (B, L, D) (the official is sequence-first; the per-token maths is the same), so that
per-image LoRA fusion sees the images on the first axis. The text tower takes (B, T, L) tokens, B copies of a
vocabulary of T prompts, and runs its MLPs on (B, T * L, D) for the same reason.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v weights (`attn.{q,k,v}_proj`, no bias, one
    `in_proj_bias`) and `out_proj`. The weights are read, never called as modules: see the module docstring."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, L, D) -> (N, L, D); `mask` an additive (L, L) mask (the text tower's causal one)."""
        N, L, D = x.shape
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q, k, v = (F.linear(x, proj.weight, b).view(N, L, self.heads, D // self.heads).transpose(1, 2)
                   for proj, b in ((self.q_proj, bq), (self.k_proj, bk), (self.v_proj, bv)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)          # (N, heads, L, D / heads)
        return F.linear(out.transpose(1, 2).reshape(N, L, D), self.out_proj.weight, self.out_proj.bias)

    def dense_values(self, x: torch.Tensor) -> torch.Tensor:
        """CAT-Seg's last-block attention replacement: out_proj(v_proj(x)) for every token (no mixing)."""
        v = F.linear(x, self.v_proj.weight, self.in_proj_bias.chunk(3)[2])
        return F.linear(v, self.out_proj.weight, self.out_proj.bias)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, seq_len: int | None = None, mask: torch.Tensor | None = None):
        """x (B, S, D): S tokens of B images, made of sequences of `seq_len` tokens (default: one of S)."""
        B, S, D = x.shape
        seq_len = seq_len or S
        x = x + self.attn(self.ln_1(x).view(-1, seq_len, D), mask).view(B, S, D)
        return x + self.mlp(self.ln_2(x))

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The official `forward_dense`: y_i = out_proj(v_proj(ln_1(x_i))) + x_cls, then y + mlp(ln_2(y))."""
        y = self.attn.dense_values(self.ln_1(x)) + x[:, :1]
        return y + self.mlp(self.ln_2(y))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])


class VisualTransformer(nn.Module):
    """Image tower: (B, 3, S, S) CLIP-normalised -> dense tokens (B, 1 + g*g, embed) after ln_post and proj,
    and the outputs (B, 1 + g*g, width) of the guidance blocks."""

    def __init__(self, clip_size: int, patch_size: int, width: int, layers: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((clip_size // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, width // 64)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))

    def positions(self, tokens: int) -> torch.Tensor:
        """Positional rows for `tokens` tokens: the stored grid resized bicubically when it differs (the
        official `resized_pos_embed`: ViT-B/16's 14 x 14 grid becomes 24 x 24 at 384 px)."""
        pos = self.positional_embedding
        if tokens == pos.shape[0]:
            return pos
        side, new_side, D = round((pos.shape[0] - 1) ** 0.5), int((tokens - 1) ** 0.5), pos.shape[1]
        grid = pos[1:].reshape(1, side, side, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], grid[0].reshape(D, -1).T])

    def forward(self, images: torch.Tensor, guidance_layers: tuple[int, ...]):
        x = self.conv1(images).flatten(2).transpose(1, 2)                       # (B, g*g, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1)
        x = self.ln_pre(x + self.positions(x.shape[1]).to(x.dtype))              # (B, 1 + g*g, width)
        *blocks, last = self.transformer.resblocks
        guidance = []
        for i, block in enumerate(blocks):
            x = block(x)
            if i in guidance_layers:
                guidance.append(x)
        x = last.forward_dense(x)
        return self.ln_post(x) @ self.proj, guidance


class CLIP(nn.Module):
    """The official CAT-Seg CLIP: `visual`, the text `transformer` and its embeddings. No logit use at
    inference; `logit_scale` is kept because checkpoints carry it."""

    def __init__(self, cfg):
        super().__init__()
        self.context_length = cfg.context_length
        self.visual = VisualTransformer(cfg.clip_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers,
                                        cfg.embed_dim)
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width,      # zeros: no random init to
                                            _weight=torch.zeros(cfg.vocab_size, cfg.text_width))   # discard
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.text_width))
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.zeros(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, context) -> (B, T, embed) at each prompt's end-of-text token, not normalised.

        The causal mask lets no token see past its own position, so columns after the last end-of-text token
        cannot change the result: they are dropped (CLIP's 77 columns become ~10 for short prompts)."""
        B, T, _ = tokens.shape
        eot = tokens.argmax(-1)                                                  # (B, T)
        n = int(eot.max()) + 1
        tokens = tokens[..., :n]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]         # (B, T, n, width)
        mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        x = x.reshape(B, T * n, -1)
        for block in self.transformer.resblocks:
            x = block(x, seq_len=n, mask=mask)
        x = self.ln_final(x).view(B, T, n, -1)
        return torch.gather(x, 2, eot[..., None, None].expand(-1, -1, 1, x.shape[-1]))[:, :, 0] @ self.text_projection
