"""The shipped artifacts of the embedded default: load them, and rebuild them from scratch.

assets/tiny_clip.safetensors   the tiny CLIP (fp16), contrastively pretrained on mini-world captions
assets/segmenter.safetensors   the base OV segmenter (visual tower + head), trained on the source domain
assets/library/                the adapter library: one peft LoRA per target domain + centroids
assets/manifest.json           configs, seeds and the metrics each stage reached

`semla-lab build all` (or `make assets`) rebuilds them deterministically for a given thread count, in a
staging folder beside the artifacts (`staging`); they are replaced only once every stage has finished
(`commit`), so an interrupted rebuild leaves the previous artifacts in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .clip import TINY_CLIP, Clip, embed_class_names, embed_images, load_clip
from .data import atomic_write_json
from .errors import MissingFileError
from .runtime import assets_dir, resolve_device
from .segmenter import HeadConfig, OVSegmenter, build_segmenter
from .train import (AdapterConfig, ClipTrainConfig, Replay, SegTrainConfig, pretrain_clip, train_adapter,
                    train_base_segmenter)
from .world.generate import SOURCE_DOMAIN, generate, shipped_domains, target_domains

EMBED_NORMALIZE = True   # library centroids and queries use L2-normalised CLIP embeddings
ARTIFACTS = ("tiny_clip.safetensors", "segmenter.safetensors", "library", "manifest.json")   # commit order


def _save(state: dict[str, torch.Tensor], path: Path, dtype=None) -> None:
    """safetensors save through a temporary file (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def read_manifest(root: Path | None = None) -> dict:
    path = (root or assets_dir()) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _update_manifest(root: Path, key: str, value: dict) -> None:
    atomic_write_json(root / "manifest.json", {**read_manifest(root), key: value})


def training_names(spec) -> list[list[str]]:
    """For each class of a vocabulary, the names base training draws from: its own name and its
    concept's synonyms, minus the held-out names kept for testing open-vocabulary transfer."""
    from .world.concepts import HELD_OUT_NAMES, SYNONYMS
    return [[name] + [s for s in SYNONYMS[concept] if s != name and s not in HELD_OUT_NAMES]
            for concept, name in spec.vocabulary.items()]


def load_segmenter(path: str | Path | None = None, clip: Clip | None = None, device=None) -> OVSegmenter:
    """The shipped base segmenter (or one saved by `build`), built around the tiny CLIP architecture."""
    root = assets_dir()
    path = Path(path) if path else root / "segmenter.safetensors"
    if not path.is_file():
        raise MissingFileError(f"segmenter weights not found at {path}; run `semla-lab build segmenter`")
    head = HeadConfig(**read_manifest(path.parent).get("segmenter", {}).get("head", {}))
    seg = build_segmenter((clip or load_clip(TINY_CLIP, pretrained="random")).model, head)
    seg.load_state_dict(load_file(str(path)))
    return seg.to(resolve_device(device)).eval()


def base_model_id(path: Path | None = None) -> str:
    """Identity of a segmenter's weights, recorded in every adapter and the library index."""
    path = path or assets_dir() / "segmenter.safetensors"
    return f"semla-tiny-segmenter@{file_digest(path)}"


def nearest_centroid_accuracy(clip: Clip, domains: list[str], train: int = 100, test: int = 50) -> float:
    """Fraction of held-out images whose nearest domain centroid is their own domain (what
    retrieval depends on)."""
    specs = shipped_domains()
    cents, queries = [], []
    for name in domains:
        cents.append(embed_images(clip, generate(specs[name], "train", train).images).mean(0))
        queries.append(embed_images(clip, generate(specs[name], "test", test).images))
    cents = torch.stack(cents)
    hits = [(torch.cdist(q, cents).argmin(1) == i).float() for i, q in enumerate(queries)]
    return float(torch.cat(hits).mean())


def build_clip(root: Path, cfg: ClipTrainConfig = ClipTrainConfig(), domains: list[str] | None = None,
               device=None, progress=True) -> dict:
    """Pretrain the tiny CLIP and report nearest-centroid domain accuracy against the untrained one."""
    torch.manual_seed(cfg.seed)
    clip = load_clip(TINY_CLIP, pretrained="random", device=device)
    domains = domains or target_domains()
    untrained = nearest_centroid_accuracy(clip, domains)
    t0 = time.time()
    info = pretrain_clip(clip, cfg, device=device, progress=progress)
    _save(clip.model.state_dict(), root / "tiny_clip.safetensors", torch.float16)
    clip = load_clip(TINY_CLIP, checkpoint=root / "tiny_clip.safetensors", device=device)
    info.update(seconds=round(time.time() - t0, 1), nearest_centroid_accuracy=nearest_centroid_accuracy(clip, domains),
                untrained_nearest_centroid_accuracy=untrained, threads=torch.get_num_threads())
    _update_manifest(root, "tiny_clip", info)
    return info


def build_segmenter_asset(root: Path, cfg: SegTrainConfig = SegTrainConfig(), head: HeadConfig = HeadConfig(),
                          domains: list[str] | None = None, device=None, progress=True) -> dict:
    """Train the base segmenter on the source domain and report its zero-shot mIoU per domain."""
    from .experiments import evaluate_model
    clip = load_clip(TINY_CLIP, checkpoint=root / "tiny_clip.safetensors", device=device)
    torch.manual_seed(cfg.seed)
    seg = build_segmenter(clip.model, head)
    source = generate(shipped_domains()[SOURCE_DOMAIN], "train")
    t0 = time.time()
    info = train_base_segmenter(seg, clip, source.images, source.labels, training_names(source.spec), cfg, device,
                                progress)
    _save(seg.state_dict(), root / "segmenter.safetensors")
    info.update(seconds=round(time.time() - t0, 1), head=asdict(head), threads=torch.get_num_threads())
    _update_manifest(root, "segmenter", info)
    seg = load_segmenter(root / "segmenter.safetensors", clip, device)
    specs = shipped_domains()
    scores = {name: evaluate_model(seg, clip, generate(specs[name], "test"))
              for name in (domains or specs)}
    info["zero_shot_miou"] = {k: round(v, 2) for k, v in scores.items()}
    _update_manifest(root, "segmenter", info)
    return info


def build_library(root: Path, cfg: AdapterConfig = AdapterConfig(), domains: list[str] | None = None,
                  device=None, progress=True) -> dict:
    """Train one adapter per target domain and add it, with its centroid, to a new root/library (build
    inside `staging` to replace an existing one)."""
    from .library import AdapterLibrary
    clip = load_clip(TINY_CLIP, checkpoint=root / "tiny_clip.safetensors", device=device)
    seg = load_segmenter(root / "segmenter.safetensors", clip, device)
    base = base_model_id(root / "segmenter.safetensors")
    lib = AdapterLibrary.create(root / "library", embedder=clip.identity(EMBED_NORMALIZE), base_model=base,
                                lora={"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": cfg.target_modules})
    specs = shipped_domains()
    replay = source_replay(clip) if cfg.replay else None
    t0, infos = time.time(), {}
    for name in (domains or target_domains()):
        data = generate(specs[name], "train")
        infos[name] = add_domain(lib, name, data, seg, clip, cfg, device=device, progress=progress, replay=replay)
    info = {"config": asdict(cfg), "seconds": round(time.time() - t0, 1), "domains": infos,
            "threads": torch.get_num_threads()}
    _update_manifest(root, "library", info)
    return info


@contextmanager
def staging(near: Path, seed: Path | None = None):
    """A new hidden folder beside `near` (same file system, so `commit` only renames), holding copies of
    the model files and manifest of `seed`; stages build into it. Removed on exit, also on error."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp = near.parent / f".{near.name}.build-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name in ARTIFACTS:
            if seed is not None and name != "library" and (Path(seed) / name).is_file():
                shutil.copy2(Path(seed) / name, tmp / name)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_path(new: Path, dest: Path) -> None:
    """Put `new` at `dest`. A file is swapped by one os.replace. A folder: the old one is renamed aside,
    the new one renamed in, then the old one deleted; a crash in between leaves the old folder at
    `.<name>.old-*` beside `dest`, never a half-written one at `dest`."""
    new, dest = Path(new), Path(dest)
    if new.is_file() or not dest.exists():
        os.replace(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{secrets.token_hex(4)}")
    dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old)


def commit(staged: Path, root: Path) -> list[str]:
    """Replace root's artifacts with those built in `staged` (manifest last); returns their names."""
    root.mkdir(parents=True, exist_ok=True)
    names = [name for name in ARTIFACTS if (staged / name).exists()]
    for name in names:
        replace_path(staged / name, root / name)
    return names


def source_replay(clip: Clip) -> Replay:
    """The source domain's training split with its vocabulary: what adapters replay (AdapterConfig.replay)."""
    source = generate(shipped_domains()[SOURCE_DOMAIN], "train")
    return Replay(source.images, source.labels, embed_class_names(clip, source.class_names))


def add_domain(library, name: str, data, segmenter: OVSegmenter, clip: Clip, cfg: AdapterConfig = AdapterConfig(),
               device=None, progress=True, replay: Replay | None = None) -> dict:
    """Train an adapter on one domain's training split and add it to `library` with its centroid."""
    import tempfile
    text = embed_class_names(clip, data.class_names)
    if cfg.replay and replay is None:
        replay = source_replay(clip)
    with tempfile.TemporaryDirectory() as tmp:
        info = train_adapter(segmenter, text, data.images, data.labels, tmp, library.base_model, cfg, device,
                             progress, replay)
        centroid = embed_images(clip, data.images, normalize=library.embedder["normalize"]).mean(0)
        library.add(name, tmp, centroid, num_images=len(data),
                    metadata={"dataset": data.spec.dataset, "plays": data.spec.plays,
                              "factors": data.spec.factors, "scene": data.spec.scene})
    return info


def fit_domain_profiles(library, clip: Clip, kinds=("kmeans:4", "gmm:4"), domains: list[str] | None = None,
                        quantile: float = 0.95, progress=True) -> dict:
    """Fit and store the profiles (profiles.py) of library domains from their regenerated training splits,
    embedded as their centroids were. A domain whose images do not give back its library centroid (another
    CLIP, or no mini-world domain of that name) is refused. Returns {name: DomainProfile}."""
    from tqdm.auto import tqdm
    from .errors import UsageError
    from .profiles import fit_profile, parse_index
    from .world.generate import get_domain
    for kind in kinds:
        parse_index(kind)
    fitted = {}
    for name in tqdm(domains or library.names(), desc="profiles", disable=not progress):
        centroid = library.get(name).centroid
        data = generate(get_domain(name), "train")
        emb = embed_images(clip, data.images, normalize=library.embedder.get("normalize", True))
        gap = float((emb.mean(0) - centroid).norm())
        if gap > 1e-3:
            raise UsageError(f"domain {name!r}: its regenerated training images lie {gap:.3g} from the library "
                             "centroid; the library was built from other data or with another CLIP")
        fitted[name] = fit_profile(emb, centroid, kinds, quantile, embed_class_names(clip, data.class_names))
    library.set_profiles(fitted)
    return fitted
