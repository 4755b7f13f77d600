"""CLIP models: loading (any open_clip name + tag, a local checkpoint, or the shipped tiny CLIP),
batched image embedding, and class-name text embedding. Notebook 04 explores the embedding space.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.errors import SemlaError, UsageError
from ..core.runtime import assets_dir, model_device, resolve_device

TINY_CLIP = "semla-tiny-clip"
open_clip.add_model_config(Path(__file__).parents[1] / "model_configs")

TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "there is a {} in the scene.", "a {} in the picture.")


class ClipLoadError(SemlaError, RuntimeError):
    """A CLIP model could not be loaded; the message says what to do."""


class _OpenClipRecords(logging.Filter):
    """Drops the log records that open_clip's own code emits and whose message contains `text`."""
    DIR = str(Path(open_clip.__file__).parent)

    def __init__(self, text: str = ""):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.pathname.startswith(self.DIR) and self.text in record.getMessage())


@contextmanager
def muted_open_clip_logs(text: str = ""):
    """Inside the block, drop open_clip's log records (those containing `text`, when given). open_clip
    logs through the root logger (`logging.warning`), which also installs a stderr handler when the root
    has none (`logging.basicConfig`); on exit the filter and any such handler are removed: the caller's
    logging is left exactly as it was."""
    root = logging.getLogger()
    had_handlers, drop = bool(root.handlers), _OpenClipRecords(text)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        if not had_handlers:
            for handler in list(root.handlers):
                root.removeHandler(handler)


@contextmanager
def _hub_cache_only(on: bool):
    """open_clip has no cache-only option: inside the block its Hugging Face Hub downloads (all made
    through open_clip.pretrained.hf_hub_download) pass `local_files_only=True`; restored on exit."""
    import open_clip.pretrained as pretrained
    download = pretrained.hf_hub_download
    if on and download is not None:
        pretrained.hf_hub_download = partial(download, local_files_only=True)
    try:
        yield
    finally:
        pretrained.hf_hub_download = download


@dataclass
class Clip:
    """A CLIP model with what is needed to use it: tensor preprocessing and the tokenizer."""
    model: open_clip.CLIP
    name: str
    pretrained: str            # tag, file path or "random"
    tokenizer: Callable
    preprocess: Callable       # PIL image -> tensor (open_clip's eval transform)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.model.visual.preprocess_cfg
        return torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    def identity(self, normalize: bool = True) -> dict:
        """What a library records about its embedding model, to refuse mismatched queries; `normalize`:
        whether its centroids and queries are L2-normalised (True for every library semla_lab builds)."""
        return {"model": self.name, "pretrained": Path(self.pretrained).name if Path(self.pretrained).suffix
                else self.pretrained, "image_size": self.image_size, "normalize": normalize, "dim": self.embed_dim}


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file, or a torch file loaded with weights_only=True (never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise ClipLoadError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ClipLoadError(f"cannot read safetensors checkpoint {path}: {e}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ClipLoadError(f"refusing or unable to load {path} with weights_only=True ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); convert it to safetensors") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_clip(name: str = TINY_CLIP, pretrained: str | None = None, checkpoint: str | Path | None = None,
              device: str | torch.device | None = None, cache_dir: str | None = None, offline: bool = False) -> Clip:
    """Load an open_clip model by name with a pretrained tag (e.g. "ViT-B-16", "openai"), from a local
    checkpoint file (safetensors or a weights-only torch file), or the shipped tiny CLIP (default).
    `pretrained="random"` gives the untrained architecture (tests, timing). `offline=True` reads tagged
    weights from the local Hugging Face cache only, never downloading."""
    if name not in open_clip.list_models():
        raise ClipLoadError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    if name == TINY_CLIP and pretrained is None and checkpoint is None:
        checkpoint = assets_dir() / "tiny_clip.safetensors"
    tag = None if (checkpoint is not None or pretrained == "random") else pretrained
    try:    # without a tag open_clip warns "no pretrained weights loaded": we load them ourselves, or want none
        with muted_open_clip_logs("No pretrained weights loaded"), _hub_cache_only(offline):
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, cache_dir=cache_dir)
    except Exception as e:
        raise ClipLoadError(
            f"could not load {name!r} with pretrained={tag!r}: {type(e).__name__}: {str(e)[:300]}. "
            "Without network access, download the weights elsewhere and either put them in the open_clip / "
            "Hugging Face cache (cache_dir=..., HF_HUB_CACHE) or pass checkpoint='path/to/weights.safetensors'."
        ) from None
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint)
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        if missing or unexpected:
            raise ClipLoadError(f"checkpoint {checkpoint} does not fit {name!r}: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
    label = str(checkpoint) if checkpoint is not None else (pretrained or "random")
    model = model.to(resolve_device(device)).eval()
    return Clip(model, name, label, open_clip.get_tokenizer(name), preprocess)


def resize_to_input(images: torch.Tensor, clip: Clip) -> torch.Tensor:
    """(B, 3, H, W) float -> (B, 3, S, S) at the model's input size S (bilinear, antialiased); unchanged when
    already S x S. Images of different sizes resized one by one and stacked embed as they would alone."""
    if images.shape[-1] != clip.image_size or images.shape[-2] != clip.image_size:
        images = F.interpolate(images, size=(clip.image_size, clip.image_size), mode="bilinear",
                               antialias=True, align_corners=False)
    return images


CENTER_CROP = "resize-shorter-crop"   # an embedder's "preprocess": the official SemLA embedder's (HF CLIPProcessor)


def resize_shorter_and_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size): the shorter side resized to `size` (bicubic, antialiased), then the
    centre cropped, as Hugging Face's CLIPProcessor prepares images for `get_image_features`."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new = (size, int(w * scale)) if h <= w else (int(h * scale), size)
    if new != (h, w):
        images = F.interpolate(images, size=new, mode="bicubic", antialias=True, align_corners=False)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return images[..., top:top + size, left:left + size]


def embedder_input(images: torch.Tensor, clip: Clip, embedder: dict) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, S, S) as a library's `embedder` prepares its images: resized to S x S, or (official
    SemLA libraries, preprocess CENTER_CROP) shorter side to S and centre-cropped."""
    if embedder.get("preprocess") == CENTER_CROP:
        return resize_shorter_and_crop(images, clip.image_size)
    return resize_to_input(images, clip)


def prepare_images(images: torch.Tensor, clip: Clip) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] (or uint8) -> resized to the model's input size and normalised."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    images = resize_to_input(images, clip)
    mean, std = clip.mean_std
    return (images - mean.to(images.device)) / std.to(images.device)


@torch.no_grad()
def embed_images(clip: Clip, images: torch.Tensor | Sequence, normalize: bool = True, batch_size: int = 128,
                 progress: bool = False) -> torch.Tensor:
    """CLIP image embeddings (N, D) float32 on the CPU; L2-normalised when `normalize`. Computed on the
    model's device (the inputs go there; the model is not moved).
    `images` is a (N, 3, H, W) tensor (uint8 or float in [0, 1]) or a dataset of dicts with "image"."""
    model = clip.model
    device = model_device(model)
    out = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="embedding", disable=not progress):
        chunk = images[start:start + batch_size] if isinstance(images, torch.Tensor) else \
            torch.stack([images[i]["image"] for i in range(start, min(start + batch_size, len(images)))])
        feats = model.encode_image(prepare_images(chunk.to(device), clip)).float()
        out.append((F.normalize(feats, dim=-1) if normalize else feats).cpu())
    if not out:
        return torch.zeros(0, clip.embed_dim)
    emb = torch.cat(out)
    if not torch.isfinite(emb).all():
        raise UsageError("CLIP produced non-finite embeddings; check the input images for NaN/inf")
    return emb


def index_embeddings(clip: Clip, images: torch.Tensor, embedder: dict, batch_size: int = 64) -> torch.Tensor:
    """Image embeddings (N, D) as a library index built with `embedder` (a Clip.identity) holds them:
    L2-normalised or not, resized or centre-cropped. Centroids are written and queries embedded through here only."""
    normalize = embedder.get("normalize", True)
    if embedder.get("preprocess") != CENTER_CROP:
        return embed_images(clip, images, normalize=normalize, batch_size=batch_size)
    chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    out = [embed_images(clip, resize_shorter_and_crop(c.float() / 255.0 if c.dtype == torch.uint8 else c,
                                                      clip.image_size), normalize, batch_size) for c in chunks]
    return torch.cat(out) if out else torch.zeros(0, clip.embed_dim)


def check_embedder(clip: Clip, embedder: dict, where: str) -> None:
    """A UsageError unless `clip` is the embedding model recorded in `embedder` (a library's)."""
    preprocess = {"preprocess": embedder["preprocess"]} if "preprocess" in embedder else {}
    if {**clip.identity(embedder.get("normalize", True)), **preprocess} != embedder:
        raise UsageError(f"{where} was built with embedder {embedder}, not {clip.identity()}")


def try_load_clip(name: str, pretrained: str | None = None, checkpoint: str | Path | None = None,
                  offline: bool = True, device=None) -> tuple[Clip | None, str]:
    """(Clip, "loaded ...") when the weights are available (offline: local cache or checkpoint only),
    else (None, the ClipLoadError message telling what to do). open_clip's own log lines are muted."""
    try:
        with muted_open_clip_logs():
            clip = load_clip(name, pretrained=pretrained, checkpoint=checkpoint, device=device, offline=offline)
    except ClipLoadError as e:
        return None, str(e)
    return clip, f"loaded {name} ({clip.pretrained}): image size {clip.image_size}, embedding dim {clip.embed_dim}"


@torch.no_grad()
def embed_class_names(clip: Clip, names: Sequence[str], templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """(T, D) L2-normalised text embeddings on the CPU, averaged over prompt templates (CLIP's prompt
    ensembling). Computed on the model's device; the model is not moved."""
    if not names:
        raise UsageError("embed_class_names needs at least one class name")
    model = clip.model
    device = model_device(model)
    prompts = [t.format(n) for n in names for t in templates]
    feats = F.normalize(model.encode_text(clip.tokenizer(prompts).to(device)).float(), dim=-1)
    feats = feats.view(len(names), len(templates), -1).mean(1)
    return F.normalize(feats, dim=-1).cpu()
