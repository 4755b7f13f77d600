"""Training: the tiny CLIP (contrastive), the base segmenter (source domain) and per-domain LoRA
adapters (peft). Inference code never imports this module. Notebook 03 trains an adapter live.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from ..models.clip import Clip, embed_class_names, prepare_images
from ..core.errors import UsageError
from ..core.io import atomic_write_json
from ..core.runtime import model_device, resolve_device, seed_everything
from ..models.catseg.targets import OFFICIAL_LORA_TARGETS
from ..models.segmenter import LORA_TARGETS, OVSegmenter


def photometric_augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random brightness (x0.25-1.2), per-channel gain (0.7-1.3), haze and noise on (B, 3, H, W) in
    [0, 1]. Without it a clear-day base model collapses at dusk and night."""
    B = images.shape[0]
    u = lambda lo, hi, *s: lo + (hi - lo) * torch.rand(B, *s, generator=gen).to(images.device)
    out = images * u(0.25, 1.2, 1, 1, 1) * u(0.7, 1.3, 3, 1, 1)
    haze = u(0, 0.5, 1, 1, 1) * (torch.rand(B, 1, 1, 1, generator=gen).to(images.device) < 0.4)
    out = out * (1 - haze) + haze * u(0.5, 0.9, 1, 1, 1)
    out = out + u(0, 0.06, 1, 1, 1) * torch.randn(out.shape, generator=gen).to(images.device)
    return out.clamp(0, 1)


def hflip(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
    flip = (torch.rand(images.shape[0], generator=gen) < 0.5).to(images.device)
    return (torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images),
            torch.where(flip.view(-1, 1, 1), labels.flip(-1), labels))


def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    """`steps` index batches drawn by epochs of seeded permutations."""
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos:pos + batch]
        pos += batch


def _fit(step_loss, opt: torch.optim.Optimizer, steps: int, n: int, batch: int, gen: torch.Generator, desc: str,
         progress: bool) -> float:
    """`steps` AdamW steps under a one-cycle schedule; `step_loss(idx)` is the loss of one batch of
    sample indices. Returns the mean loss over the last tenth of the steps."""
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, [g["lr"] for g in opt.param_groups], total_steps=steps,
                                                pct_start=0.1)
    losses = []
    for idx in tqdm(list(_batches(n, batch, steps, gen)), desc=desc, disable=not progress, leave=False):
        loss = step_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    tail = losses[-max(1, steps // 10):]
    return sum(tail) / len(tail)


@dataclass
class ClipTrainConfig:
    steps: int = 1200
    batch: int = 128
    lr: float = 1e-3
    corpus: int = 16384       # image/caption pairs from random mini-world domains
    seed: int = 0
    captions: str = "full"    # or "no_conditions": captions without weather, camera and time words (notebook 03b)

    def __post_init__(self):
        from ..data.world.generate import CAPTION_MODES
        if self.captions not in CAPTION_MODES:
            raise UsageError(f"unknown caption mode {self.captions!r}; expected one of {CAPTION_MODES}")


def pretrain_clip(clip: Clip, cfg: ClipTrainConfig = ClipTrainConfig(), device=None, progress=True) -> dict:
    """Contrastive (InfoNCE both ways) training of a CLIP on mini-world image/caption pairs, in place."""
    from ..data.world.generate import web_corpus
    device = resolve_device(device) if device is not None else model_device(clip.model)
    gen = seed_everything(cfg.seed)
    images, captions = web_corpus(cfg.corpus, seed=cfg.seed, captions=cfg.captions)
    tokens = clip.tokenizer(captions)
    model = clip.model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)

    def step_loss(idx):
        img_f = F.normalize(model.encode_image(prepare_images(images[idx].to(device), clip)), dim=-1)
        txt_f = F.normalize(model.encode_text(tokens[idx].to(device)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img_f @ txt_f.T
        target = torch.arange(len(idx), device=device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    loss = _fit(step_loss, opt, cfg.steps, len(images), cfg.batch, gen, "CLIP", progress)
    model.eval()
    return {"config": asdict(cfg), "final_loss": loss}


@dataclass
class SegTrainConfig:
    steps: int = 800
    batch: int = 32
    lr_visual: float = 3e-4
    lr_head: float = 3e-3
    augment: bool = True
    seed: int = 0


def segmentation_loss(model, images, labels, text) -> torch.Tensor:
    """The segmenter's own loss when it has one (CAT-Seg: the official per-class BCE), else cross-entropy."""
    own = getattr(model, "segmentation_loss", None)
    logits = model(images, text)
    return own(logits, labels) if own is not None else F.cross_entropy(logits, labels.long(), ignore_index=255)


def train_base_segmenter(segmenter: OVSegmenter, clip: Clip, images: torch.Tensor, labels: torch.Tensor,
                         names: list[list[str]], cfg: SegTrainConfig = SegTrainConfig(), device=None,
                         progress=True) -> dict:
    """Tune the visual tower and train the head on source images (uint8 (N, 3, H, W), labels (N, H, W)).
    `names[c]` lists the names class c may go by; each step draws one per class (vocabulary
    augmentation), so the head learns the text embedding space rather than one set of names."""
    device = resolve_device(device) if device is not None else model_device(segmenter)
    gen = seed_everything(cfg.seed)
    flat = [n for group in names for n in group]
    table = embed_class_names(clip, flat).to(device)                 # (sum of names, D)
    offsets = torch.tensor([0] + [len(g) for g in names]).cumsum(0)[:-1]
    sizes = torch.tensor([len(g) for g in names])
    model = segmenter.to(device).train()
    opt = torch.optim.AdamW([{"params": model.visual.parameters(), "lr": cfg.lr_visual},
                             {"params": model.head.parameters(), "lr": cfg.lr_head}], weight_decay=0.01)

    def step_loss(idx):
        x, y = hflip(images[idx].float().div(255), labels[idx], gen)
        if cfg.augment:
            x = photometric_augment(x, gen)
        pick = offsets + (torch.rand(len(names), generator=gen) * sizes).long()
        return segmentation_loss(model, x.to(device), y.to(device), table[pick.to(device)])

    loss = _fit(step_loss, opt, cfg.steps, len(images), cfg.batch, gen, "segmenter", progress)
    model.eval()
    return {"config": asdict(cfg), "final_loss": loss}


@dataclass
class AdapterConfig:
    r: int = 8
    lora_alpha: int = 16
    target_modules: str = LORA_TARGETS
    steps: int = 60
    batch: int = 32
    lr: float = 1e-3          # 2e-3 overwrote: 44% of off-domain pairs lost > 2 mIoU (README, "Faithful stand-ins")
    replay: int = 16          # source images added to every batch (with the source vocabulary): adapt, not overwrite
    strength: float = 0.9     # WiSE-FT: the trained dW is saved as strength * dW, a step back toward the base model
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.strength <= 1:
            raise UsageError(f"AdapterConfig.strength must be in (0, 1], got {self.strength}")

    def lora_config(self, base_model: str) -> LoraConfig:
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, target_modules=targets,
                          lora_dropout=0.0, bias="none", base_model_name_or_path=base_model)


# The official SemLA recipe on CAT-Seg (catseg/cat_seg/config.py add_lora_config, the domain configs, vitl_336.yaml):
# rank 8, alpha 16 on the official 214 module names, AdamW at 1e-4, 2 images per step, 2000 steps, the config's
# SEED for every adapter; no source replay and no strength shrink (both are this package's additions).
CATSEG_RECIPE = AdapterConfig(r=8, lora_alpha=16, target_modules=OFFICIAL_LORA_TARGETS, steps=2000, batch=2, lr=1e-4,
                              replay=0, strength=1.0, seed=250)


@dataclass
class Replay:
    """Source images (uint8 (N, 3, H, W)), labels (N, H, W) and class-name embeddings (T, D) that an
    adapter keeps seeing while it learns its domain, so it adapts rather than overwrites."""
    images: torch.Tensor
    labels: torch.Tensor
    text: torch.Tensor


def train_adapter(segmenter: OVSegmenter, text: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                  out_dir: str | Path, base_model: str, cfg: AdapterConfig = AdapterConfig(), device=None,
                  progress=True, replay: Replay | None = None) -> dict:
    """Train one LoRA adapter on a frozen copy of `segmenter` for one domain and save it in peft's
    format (adapter_config.json + adapter_model.safetensors) under `out_dir`. With `cfg.replay` > 0,
    each step also sees that many `replay` images; the two losses are weighed by their image counts.
    The saved update is `cfg.strength` times the trained one (lora_B scaled; r and alpha unchanged)."""
    if len(images) == 0 or len(images) != len(labels):
        raise UsageError(f"an adapter needs training images with labels; got {len(images)} images and "
                         f"{len(labels)} label maps")
    if cfg.replay and replay is None:
        raise UsageError(f"AdapterConfig.replay={cfg.replay} needs replay data (source images, labels, text)")
    device = resolve_device(device) if device is not None else model_device(segmenter)
    gen = seed_everything(cfg.seed)
    base = copy.deepcopy(segmenter).to(device)
    base.name_or_path = base_model          # peft copies this into adapter_config.json
    model = get_peft_model(base, cfg.lora_config(base_model))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    text = text.to(device)
    share = cfg.batch / (cfg.batch + cfg.replay)

    def batch_loss(imgs, labs, idx, txt):
        x, y = hflip(imgs[idx].float().div(255), labs[idx], gen)
        return segmentation_loss(model, x.to(device), y.to(device), txt)

    def step_loss(idx):
        loss = batch_loss(images, labels, idx, text)
        if not cfg.replay:
            return loss
        pick = torch.randint(len(replay.images), (cfg.replay,), generator=gen)
        return share * loss + (1 - share) * batch_loss(replay.images, replay.labels, pick, replay.text.to(device))

    loss = _fit(step_loss, opt, cfg.steps, len(images), cfg.batch, gen, "adapter", progress)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(cfg.strength)
    model.save_pretrained(str(out_dir), save_embedding_layers=False)   # no hub lookup of the base model
    if not isinstance(cfg.target_modules, str):   # peft shortens long name lists to suffixes; keep the full names
        config = Path(out_dir) / "adapter_config.json"    # (official SemLA adapters list them in full)
        atomic_write_json(config, {**json.loads(config.read_text()), "target_modules": list(cfg.target_modules)})
    return {"config": asdict(cfg), "final_loss": loss}
