"""Official SemLA adapter libraries (`loradb/` folders) opened as semla_lab libraries.

The official code (rezaqorbani/SemLA) keeps one folder per training domain, written by peft's save_pretrained
with the domain as adapter name, plus the domain's centroid from generate_embeddings.py:

    loradb/<domain>/adapter_config.json          target_modules: full module names
    loradb/<domain>/adapter_model.safetensors    keys base_model.model.<module>.lora_{A,B}.weight
    loradb/<domain>/<domain>_statistics.npz      train_average_embedding (1, 768)

The centroid is the mean of Hugging Face CLIP ViT-L/14 (224 px) `get_image_features` over the domain's
training images: not L2-normalised, images prepared by CLIPProcessor (shorter side to 224, centre crop). The
orchestrator ranks domains by 1 / Euclidean distance and weighs the top K = 5 with softmax((1 / d) / 0.05):
core/retrieval.py's defaults. open_clip's ViT-L-14 with the `openai` weights computes the same features, so
an imported library records that embedder, unnormalised, with centre-crop preprocessing (models/clip.py).

`open_library` accepts either kind of folder: an official one is imported once into a cache folder (keyed by
the loradb's files and the embedder) and reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

import open_clip

from ..core.errors import UsageError
from ..models.clip import CENTER_CROP
from .index import AdapterLibrary, LibraryError, import_loradb

OFFICIAL_CLIP = ("ViT-L-14", "openai")     # HF openai/clip-vit-large-patch14 in open_clip's naming


def embedder_identity(name: str = OFFICIAL_CLIP[0], pretrained: str | None = OFFICIAL_CLIP[1],
                      checkpoint: str | None = None) -> dict:
    """The embedder record (Clip.identity, unnormalised, centre crop) of the official retrieval, for the open_clip
    model `name` with `pretrained` weights or a `checkpoint` file: what `load_clip` with the same arguments gives,
    without loading the weights."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise UsageError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    size = cfg["vision_cfg"]["image_size"]
    label = str(checkpoint) if checkpoint is not None else (pretrained or "random")
    return {"model": name, "pretrained": Path(label).name if Path(label).suffix else label,
            "image_size": size[0] if isinstance(size, (tuple, list)) else int(size), "normalize": False,
            "dim": int(cfg["embed_dim"]), "preprocess": CENTER_CROP}


def is_loradb(path: str | Path) -> bool:
    """Whether `path` is an official loradb folder: no index.json, and domain folders holding adapter configs."""
    path = Path(path)
    return (path.is_dir() and not (path / "index.json").exists()
            and any((d / "adapter_config.json").is_file() for d in path.iterdir() if d.is_dir()))


def cache_root() -> Path:
    """Where imported loradb folders are kept: $SEMLA_CACHE, else ~/.cache/semla_lab."""
    return Path(os.environ.get("SEMLA_CACHE") or Path.home() / ".cache" / "semla_lab")


def _fingerprint(loradb: Path, embedder: dict, base_model: str | None) -> str:
    """A digest of every file of the loradb (relative path, size, modification time) and the import settings."""
    files = sorted((str(p.relative_to(loradb)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in loradb.rglob("*") if p.is_file())
    blob = json.dumps([str(loradb.resolve()), files, embedder, base_model], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def import_official(loradb: str | Path, root: str | Path, embedder: dict | None = None,
                    base_model: str | None = None) -> AdapterLibrary:
    """A new library at `root` holding every domain of the official `loradb` folder, retrieved as the official
    orchestrator retrieves (embedder: `embedder_identity()` unless given)."""
    return import_loradb(loradb, root, embedder or embedder_identity(), base_model)


def open_library(path: str | Path, embedder: dict | None = None, base_model: str | None = None) -> AdapterLibrary:
    """The library at `path`: a semla_lab library as it is, or an official loradb folder imported (once, into
    cache_root()/loradb-<digest>) with `embedder` (default: the official one)."""
    path = Path(path)
    if not is_loradb(path):
        return AdapterLibrary(path)
    embedder = embedder or embedder_identity()
    dest = cache_root() / f"loradb-{_fingerprint(path, embedder, base_model)}"
    if (dest / "index.json").is_file():
        return AdapterLibrary(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fresh = dest.with_name(f".{dest.name}.new-{secrets.token_hex(4)}")
    try:
        import_official(path, fresh, embedder, base_model)
        fresh.rename(dest)
    except OSError:              # another process imported it first: use theirs
        shutil.rmtree(fresh, ignore_errors=True)
        if not (dest / "index.json").is_file():
            raise
    except LibraryError:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    return AdapterLibrary(dest)
