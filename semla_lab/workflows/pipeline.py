"""The SemLA recipe as one pipeline for every data source: build a base segmenter, build or extend an
adapter library, evaluate it leave-one-out, ablate its knobs. `semla-lab build-library / add-domain /
evaluate / ablate / build all` and notebook 09 go through here, for mini-world domains and real data alike.

Sources are the names of sources.py: `acdc_fog`, `path/spec.yaml`, `path/dataset_folder`, `real:acdc_fog`.
Models are named, not passed (`Models`: CLIP name/tag/checkpoint, segmenter weights, library, device), so
that a job can load them wherever it runs. The jobs, one per adapter or per target, are plain functions
(`train_adapter_job`, `evaluate_job`, `ablate_job`) that an engine.Engine runs serially or as Ray tasks:

- a worker trains an adapter into its own staging folder and returns the folder; only the driver commits
  it to the library, through the library's atomic `add`, in the order the sources were given (so a Ray
  build equals the serial one byte for byte). A retried or killed task never leaves half an adapter in
  the library, and a killed driver leaves a library holding what it committed.
- building into an existing library skips the domains it already holds: rerunning a build resumes it.
"""
from __future__ import annotations

import json
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..library.assets import base_model_id, load_segmenter, save_weights, update_manifest
from ..models.clip import (
    CENTER_CROP, TINY_CLIP, Clip, check_embedder, embed_class_names, embed_images, index_embeddings, load_clip
)
from ..core.engine import Engine
from ..core.errors import UsageError
from ..evaluation.experiments import (
    METHODS, EvalConfig, ablate_target, config_methods, ablation_tables, benchmark_payload, benchmark_target,
    evaluate_model, write_ablation, write_benchmark
)
from ..library.index import AdapterLibrary
from ..evaluation.methods import check_methods
from ..library.predictor import LibraryModel
from ..core.runtime import resolve_device
from ..models.segmenter import HeadConfig, OVSegmenter, build_segmenter, class_text
from ..models.segmenter_catseg import catseg_path
from ..data.sources import class_name_choices, domain_name, load_split
from ..data.split import Split
from ..training.train import (
    AdapterConfig, ClipTrainConfig, Replay, SegTrainConfig, pretrain_clip, train_adapter, train_base_segmenter
)
from ..data.world.generate import SOURCE_DOMAIN, target_domains

CENTROID = "centroid.safetensors"


# ---- models, named so that any process can load them -----------------------------------------------

@dataclass(frozen=True)
class Models:
    """Which CLIP, base segmenter and library a job uses: an open_clip name with a pretrained tag or a
    local checkpoint (default: the shipped tiny CLIP), segmenter weights (default: the shipped ones),
    a library folder, and the device. Small and picklable: Ray tasks receive this, not the models."""
    clip: str = TINY_CLIP
    pretrained: str | None = None
    checkpoint: str | None = None
    segmenter: str | None = None
    library: str | None = None
    device: str = "cpu"

    def on_worker(self, gpus: float) -> "Models":
        """The same models for a Ray task that was given `gpus` (Ray picks its GPU: device "cuda")."""
        return replace(self, device="cuda") if gpus and self.device.startswith("cuda") else self


def library_pretrained(library: AdapterLibrary) -> str | None:
    """The open_clip pretrained tag a library's embedder was loaded with (e.g. "openai" for official SemLA
    libraries), or None when it came from a file or random weights."""
    import open_clip
    emb = library.embedder
    tag = emb.get("pretrained")
    return tag if tag in open_clip.list_pretrained_tags_by_model(emb.get("model", "")) else None


def _stamp(path: str | None) -> tuple:
    """A file's identity for caching: a rebuilt file at the same path is a different model."""
    file = catseg_path(path) or (Path(path) if path is not None else None)
    if file is None or not file.exists():
        return (path,)
    st = file.stat()
    return path, st.st_size, st.st_mtime_ns


@lru_cache(maxsize=2)
def _load(models: Models, stamps: tuple) -> tuple[Clip, OVSegmenter]:
    clip = load_clip(models.clip, pretrained=models.pretrained, checkpoint=models.checkpoint, device=models.device)
    return clip, load_segmenter(models.segmenter, clip=clip, device=models.device)


def load_models(models: Models) -> tuple[Clip, OVSegmenter]:
    """(clip, base segmenter), loaded once per process for the same files."""
    return _load(models, (_stamp(models.checkpoint), _stamp(models.segmenter)))


@lru_cache(maxsize=1)
def _library_model(models: Models, stamps: tuple) -> LibraryModel:
    clip, segmenter = load_models(models)
    library = AdapterLibrary(models.library)
    check_embedder(clip, library.embedder, f"library {library.root}")
    return LibraryModel(segmenter, library, models.device)


def library_model(models: Models) -> LibraryModel:
    """The segmenter carrying every adapter of `models.library`, built once per process per library version."""
    return _library_model(models, (_stamp(str(Path(models.library) / "index.json")),))


# ---- base segmenter -----------------------------------------------------------------------------------

def build_base_segmenter(clip: Clip, source: str, out: str | Path, cfg: SegTrainConfig = SegTrainConfig(),
                         head: HeadConfig = HeadConfig(), max_images: int | None = None,
                         image_size: int | None = None, device=None, progress: bool = True) -> dict:
    """Train a segmenter around `clip` on the train split of `source` (e.g. "source" for the mini world,
    "real:coco_stuff" for the paper's setup) and save it to `out` (safetensors, atomically)."""
    torch.manual_seed(cfg.seed)
    seg = build_segmenter(clip.model, head)
    data = load_split(source, "train", max_images, image_size)
    t0 = time.time()
    info = train_base_segmenter(seg, clip, data.images, data.labels, class_name_choices(source, data), cfg, device,
                                progress)
    save_weights(seg.state_dict(), Path(out))
    info.update(seconds=round(time.time() - t0, 1), head=asdict(head), source=source,
                threads=torch.get_num_threads())
    return info


# ---- adapters -------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _replay(models: Models, stamps: tuple, source: str, max_images: int | None, image_size: int | None) -> Replay:
    clip, _ = load_models(models)
    data = load_split(source, "train", max_images, image_size)
    return Replay(data.images, data.labels, embed_class_names(clip, data.class_names))


def source_replay(clip: Clip, source: str = SOURCE_DOMAIN, max_images: int | None = None,
                  image_size: int | None = None) -> Replay:
    """The base-training source's train split with its vocabulary: what adapters replay (AdapterConfig.replay)."""
    data = load_split(source, "train", max_images, image_size)
    return Replay(data.images, data.labels, embed_class_names(clip, data.class_names))


def adapter_recipe(library: AdapterLibrary, cfg: AdapterConfig = AdapterConfig()) -> AdapterConfig:
    """`cfg` with the library's LoRA shape (r, alpha, targets): every adapter of a library shares it."""
    lora = library.lora_config
    return replace(cfg, r=lora["r"], lora_alpha=lora["lora_alpha"], target_modules=lora["target_modules"])


def train_staged(segmenter: OVSegmenter, clip: Clip, data: Split, folder: Path, base_model: str, embedder: dict,
                 cfg: AdapterConfig = AdapterConfig(), replay: Replay | None = None, device=None,
                 progress: bool = False) -> dict:
    """Train one adapter on `data` into folder/adapter (peft format) with its centroid in folder/CENTROID,
    and return what the library records with it."""
    info = train_adapter(segmenter, class_text(segmenter, clip, data.class_names), data.images, data.labels,
                         folder / "adapter", base_model, cfg, device, progress, replay)
    centroid = index_embeddings(clip, data.images, embedder).mean(0)
    save_file({"centroid": centroid.contiguous()}, str(folder / CENTROID))
    return {"name": data.name, "folder": str(folder), "num_images": len(data), "metadata": data.metadata,
            "info": info}


def commit_staged(library: AdapterLibrary, staged: dict) -> None:
    """Add a staged adapter and its centroid to `library` (the library's atomic add)."""
    folder = Path(staged["folder"])
    centroid = load_file(str(folder / CENTROID))["centroid"]
    library.add(staged["name"], folder / "adapter", centroid, num_images=staged["num_images"],
                metadata=staged["metadata"])


def add_domain(library: AdapterLibrary, data: Split, segmenter: OVSegmenter, clip: Clip,
               cfg: AdapterConfig = AdapterConfig(), replay: Replay | None = None, device=None,
               progress: bool = False) -> dict:
    """In this process, with models already loaded (notebook 08): train an adapter on `data` (a train
    Split) with the library's LoRA shape and add it with its centroid. Replays the mini world's source
    domain when cfg.replay asks for it and no `replay` is given. Returns the training info."""
    cfg = adapter_recipe(library, cfg)
    if cfg.replay and replay is None:
        replay = source_replay(clip)
    with staging_folder(Path(library.root)) as stage:
        staged = train_staged(segmenter, clip, data, stage, library.base_model, library.embedder, cfg, replay,
                              device, progress)
        commit_staged(library, staged)
    return staged["info"]


WORKER_PRELOAD = (__name__,)   # what Ray workers import as they start (Engine(preload=...)): this module's jobs


@dataclass(frozen=True)
class AdapterJob:
    """Train the adapter of one source's domain into `staging`: everything a Ray task needs, by name."""
    source: str
    models: Models
    cfg: AdapterConfig
    base_model: str
    embedder_json: str                 # the library's embedder, as JSON (hashable)
    staging: str
    max_images: int | None = None
    image_size: int | None = None


def build_replay(models: Models, cfg: AdapterConfig, source: str | None, image_size: int | None) -> Replay | None:
    """The source images a build's adapters replay (None when cfg.replay is 0): built once by the driver
    and handed to every job (`Engine.map(..., shared=...)`), on the CPU."""
    if not cfg.replay:
        return None
    if source is None:
        raise UsageError(f"AdapterConfig.replay={cfg.replay} needs a replay source (the base-training "
                         "source); pass one or set replay=0")
    from ..data.real_data import MissingDataError
    try:
        replay = _replay(models, (_stamp(models.checkpoint),), source, None, image_size)
    except MissingDataError as e:
        raise MissingDataError(f"{e} (adapters replay {cfg.replay} source images per step; "
                               "AdapterConfig(replay=0) trains without them)") from None
    return Replay(replay.images, replay.labels, replay.text.cpu())


def train_adapter_job(job: AdapterJob, replay: Replay | None = None) -> dict:
    """The unit of work of a library build: load the models and the domain's train split, train into a
    fresh folder under job.staging (a retried task writes a new one), return its description."""
    clip, segmenter = load_models(job.models)
    data = load_split(job.source, "train", job.max_images, job.image_size)
    folder = Path(job.staging) / f"{data.name}-{secrets.token_hex(4)}"
    folder.mkdir(parents=True)
    return train_staged(segmenter, clip, data, folder, job.base_model, json.loads(job.embedder_json), job.cfg,
                        replay, job.models.device)


@contextmanager
def staging_folder(near: Path):
    """A new hidden folder beside `near` for workers' results; removed on exit (also on error). A killed
    driver leaves it behind, harmless (`.<name>.staging-*`)."""
    folder = near.parent / f".{near.name}.staging-{secrets.token_hex(4)}"
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def library_embedder(clip: Clip, segmenter: str | None) -> dict:
    """The embedder a new library records: `clip`, L2-normalised and resized; on a CAT-Seg base ("catseg:FILE")
    the official SemLA embedder's conventions (unnormalised features, centre crop), as official libraries use."""
    if catseg_path(segmenter) is None:
        return clip.identity()
    return {**clip.identity(normalize=False), "preprocess": CENTER_CROP}


def open_library(out: str | Path, clip: Clip, base_model: str, cfg: AdapterConfig,
                 embedder: dict | None = None) -> AdapterLibrary:
    """The library at `out`, created (atomically: built beside, renamed in) when absent, recording `embedder`
    (default: clip.identity()). An existing one must have been built for the same CLIP, segmenter and LoRA
    shape; building into it resumes it."""
    out = Path(out)
    if (out / "index.json").is_file():
        library = AdapterLibrary(out)
        check_embedder(clip, library.embedder, f"library {out}")
        if library.base_model != base_model:
            raise UsageError(f"library {out} was built on segmenter {library.base_model}, not {base_model}")
        if (library.lora_config["r"], library.lora_config["lora_alpha"]) != (cfg.r, cfg.lora_alpha):
            raise UsageError(f"library {out} holds LoRA r={library.lora_config['r']}, alpha="
                             f"{library.lora_config['lora_alpha']}; this build asks for r={cfg.r}, alpha={cfg.lora_alpha}")
        return library
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is neither an adapter library nor an empty folder; choose a new one")
    fresh = out.parent / f".{out.name}.new-{secrets.token_hex(4)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    AdapterLibrary.create(fresh, embedder=embedder or clip.identity(), base_model=base_model,
                          lora={"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": targets})
    if out.exists():
        out.rmdir()
    fresh.rename(out)
    return AdapterLibrary(out)


def add_domains(sources: Sequence[str], out: str | Path, models: Models = Models(),
                cfg: AdapterConfig = AdapterConfig(), engine: Engine | None = None,
                replay_source: str | None = SOURCE_DOMAIN, max_images: int | None = None,
                image_size: int | None = None, progress: bool = True) -> dict:
    """Train one adapter per source (its train split) and add each to the library at `out`, created when
    absent. Domains the library already holds are skipped (a rerun resumes an interrupted build).
    Jobs run on `engine` (default: serially here); they ask for one GPU each when the device is CUDA.
    Returns {"added": {domain: training info}, "skipped": [domains], "seconds": wall time}."""
    out = Path(out)
    engine = engine or Engine()
    clip, _ = load_models(models)
    base = base_model_id(models.segmenter, models.clip)
    library = open_library(out, clip, base, cfg, library_embedder(clip, models.segmenter))
    cfg = adapter_recipe(library, cfg)
    held = set(library.names())
    names = [domain_name(s) for s in sources]
    if len(set(names)) != len(names):
        raise UsageError(f"each domain may be given once, got {names}")
    todo = [s for s, n in zip(sources, names) if n not in held]
    gpus = 1.0 if resolve_device(models.device).type == "cuda" else 0.0
    t0, added = time.time(), {}
    with staging_folder(out) as stage:
        jobs = [AdapterJob(s, models.on_worker(gpus) if engine.ray else models, cfg, base,
                           json.dumps(library.embedder, sort_keys=True), str(stage), max_images,
                           image_size) for s in todo]
        replay = build_replay(models, cfg, replay_source, image_size) if jobs else None
        done = engine.map(train_adapter_job, jobs, gpus=gpus, ordered=True, shared=replay)
        for job, staged in tqdm(done, total=len(jobs), desc="adapters", disable=not progress):
            commit_staged(library, staged)
            added[staged["name"]] = staged["info"]
    return {"added": added, "skipped": [n for n in names if n in held], "seconds": round(time.time() - t0, 1)}


# ---- evaluation -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalJob:
    source: str
    models: Models
    methods: tuple[str, ...]
    cfg: EvalConfig


def evaluate_job(job: EvalJob):
    """The unit of work of a benchmark: one target, leave-one-out (experiments.benchmark_target)."""
    clip, _ = load_models(job.models)
    return benchmark_target(library_model(job.models), clip, job.source, job.methods, job.cfg)


def evaluate(targets: Sequence[str], models: Models, methods: Sequence[str] = METHODS,
             cfg: EvalConfig = EvalConfig(), out_dir: str | Path | None = None, engine: Engine | None = None,
             progress: bool = True) -> dict:
    """The leave-one-out benchmark of `models.library` on `targets`, one job per target on `engine`;
    the same payload as experiments.run_benchmark, written to `out_dir` when given."""
    methods = tuple(config_methods(methods, cfg))
    engine = engine or Engine()
    gpus = 1.0 if resolve_device(models.device).type == "cuda" else 0.0
    jobs = [EvalJob(t, models.on_worker(gpus) if engine.ray else models, methods, cfg) for t in targets]
    outcomes = [r for _, r in tqdm(engine.map(evaluate_job, jobs, gpus=gpus, ordered=True), total=len(jobs),
                                   desc="targets", disable=not progress)]
    payload = benchmark_payload(outcomes, AdapterLibrary(models.library), list(targets), methods, cfg)
    if out_dir is not None:
        write_benchmark(out_dir, payload, [r for o in outcomes for r in o.records])
    return payload


@dataclass(frozen=True)
class AblateJob:
    source: str
    models: Models
    methods: tuple[str, ...]
    configs: tuple[EvalConfig, ...]


def ablate_job(job: AblateJob) -> list[dict[str, float]]:
    clip, _ = load_models(job.models)
    return ablate_target(library_model(job.models), clip, job.source, list(job.configs), job.methods)


def ablate(targets: Sequence[str], models: Models, configs: Sequence[EvalConfig], methods: Sequence[str] = ("semla",),
           out_dir: str | Path | None = None, engine: Engine | None = None, progress: bool = True):
    """experiments.run_ablation with one job per target on `engine`: the ablation table (and CSVs in `out_dir`)."""
    methods = tuple(check_methods(methods))
    engine = engine or Engine()
    gpus = 1.0 if resolve_device(models.device).type == "cuda" else 0.0
    jobs = [AblateJob(t, models.on_worker(gpus) if engine.ray else models, methods, tuple(configs)) for t in targets]
    per_target = {job.source: r for job, r in tqdm(engine.map(ablate_job, jobs, gpus=gpus, ordered=True),
                                                    total=len(jobs), desc="ablation", disable=not progress)}
    table, tidy = ablation_tables(per_target, list(configs), methods)
    if out_dir is not None:
        write_ablation(out_dir, table, tidy)
    return table


# ---- the whole recipe -----------------------------------------------------------------------------

def run_recipe(targets: Sequence[str], out_dir: str | Path, models: Models = Models(), source: str = "real:coco_stuff",
               seg_cfg: SegTrainConfig = SegTrainConfig(), adapter_cfg: AdapterConfig = AdapterConfig(),
               eval_cfg: EvalConfig = EvalConfig(), methods: Sequence[str] = METHODS, max_source: int | None = None,
               max_train: int | None = None, engine: Engine | None = None, progress: bool = True) -> dict:
    """The SemLA recipe end to end on any sources (notebook 09 runs it on real data):
    1. a base segmenter around the CLIP, trained on `source`'s train split into out_dir/segmenter.safetensors
       (skipped when `models.segmenter` names trained weights),
    2. one adapter per target on its train split into out_dir/library (replaying `source` images when
       adapter_cfg.replay > 0),
    3. the leave-one-out benchmark on the targets' test (real: val) splits into out_dir/benchmark.
    Images are resized to eval_cfg.image_size when given; max_source and max_train cap the images per
    split (they are held in memory as uint8). Returns the benchmark payload."""
    for t in targets:
        domain_name(t)                     # an unknown name fails before hours of base training
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = eval_cfg.image_size
    if models.segmenter is None:
        clip = load_clip(models.clip, pretrained=models.pretrained, checkpoint=models.checkpoint, device=models.device)
        build_base_segmenter(clip, source, out / "segmenter.safetensors", seg_cfg, max_images=max_source,
                             image_size=size, device=models.device, progress=progress)
        models = replace(models, segmenter=str(out / "segmenter.safetensors"))
    add_domains(targets, out / "library", models, adapter_cfg, engine, source if adapter_cfg.replay else None,
                max_train, size, progress)
    return evaluate(targets, replace(models, library=str(out / "library")), methods, eval_cfg, out / "benchmark",
                    engine, progress)


# ---- the shipped artifacts (`semla-lab build`, `make assets`) -----------------------------------------

def nearest_centroid_accuracy(clip: Clip, domains: list[str], train: int = 100, test: int = 50) -> float:
    """Fraction of held-out images whose nearest domain centroid is their own domain (what retrieval
    depends on)."""
    cents = torch.stack([embed_images(clip, load_split(d, "train", train).images).mean(0) for d in domains])
    hits = [(torch.cdist(embed_images(clip, load_split(d, "test", test).images), cents).argmin(1) == i).float()
            for i, d in enumerate(domains)]
    return float(torch.cat(hits).mean())


def build_clip(root: Path, cfg: ClipTrainConfig = ClipTrainConfig(), domains: list[str] | None = None,
               device=None, progress=True) -> dict:
    """Pretrain the tiny CLIP into root/tiny_clip.safetensors and report nearest-centroid domain accuracy
    against the untrained one."""
    torch.manual_seed(cfg.seed)
    clip = load_clip(TINY_CLIP, pretrained="random", device=device)
    domains = domains or target_domains()
    untrained = nearest_centroid_accuracy(clip, domains)
    t0 = time.time()
    info = pretrain_clip(clip, cfg, device=device, progress=progress)
    save_weights(clip.model.state_dict(), root / "tiny_clip.safetensors", torch.float16)
    clip = load_clip(TINY_CLIP, checkpoint=root / "tiny_clip.safetensors", device=device)
    info.update(seconds=round(time.time() - t0, 1), nearest_centroid_accuracy=nearest_centroid_accuracy(clip, domains),
                untrained_nearest_centroid_accuracy=untrained, threads=torch.get_num_threads())
    update_manifest(root, "tiny_clip", info)
    return info


def build_segmenter_asset(root: Path, cfg: SegTrainConfig = SegTrainConfig(), head: HeadConfig = HeadConfig(),
                          domains: list[str] | None = None, device=None, progress=True) -> dict:
    """Train the base segmenter on the mini world's source domain into root/segmenter.safetensors and
    report its zero-shot mIoU per domain."""
    from ..data.world.generate import shipped_domains
    clip = load_clip(TINY_CLIP, checkpoint=root / "tiny_clip.safetensors", device=device)
    info = build_base_segmenter(clip, SOURCE_DOMAIN, root / "segmenter.safetensors", cfg, head, device=device,
                                progress=progress)
    info.pop("source")
    update_manifest(root, "segmenter", info)
    seg = load_segmenter(root / "segmenter.safetensors", clip, device)
    scores = {name: evaluate_model(seg, clip, load_split(name, "test")) for name in (domains or shipped_domains())}
    info["zero_shot_miou"] = {k: round(v, 2) for k, v in scores.items()}
    update_manifest(root, "segmenter", info)
    return info


SHIPPED_PROFILES = ("kmeans:2", "kmeans:4", "kmeans:8", "gmm:2", "gmm:4")   # the index kinds of notebook 10


def build_library(root: Path, cfg: AdapterConfig = AdapterConfig(), domains: list[str] | None = None,
                  device=None, progress=True, engine: Engine | None = None) -> dict:
    """One adapter per target domain (default: every shipped one) into root/library, around root's tiny
    CLIP and segmenter, then every domain's profiles (SHIPPED_PROFILES); resumes a library already there."""
    device = str(resolve_device(device))
    models = Models(checkpoint=str(root / "tiny_clip.safetensors"), segmenter=str(root / "segmenter.safetensors"),
                    device=device)
    built = add_domains(domains or target_domains(), root / "library", models, cfg, engine,
                        replay_source=SOURCE_DOMAIN if cfg.replay else None, progress=progress)
    fit_domain_profiles(AdapterLibrary(root / "library"), load_models(models)[0], SHIPPED_PROFILES, progress=progress)
    info = {"config": asdict(cfg), "seconds": built["seconds"], "domains": built["added"],
            "profiles": list(SHIPPED_PROFILES), "threads": torch.get_num_threads()}
    update_manifest(root, "library", info)
    return info


def fit_domain_profiles(library, clip: Clip, kinds=("kmeans:4", "gmm:4"), domains: list[str] | None = None,
                        quantile: float = 0.95, progress=True) -> dict:
    """Fit and store the profiles (profiles.py) of library domains from their regenerated training splits,
    embedded as their centroids were. A domain whose images do not give back its library centroid (another
    CLIP, or no mini-world domain of that name) is refused. Returns {name: DomainProfile}."""
    from ..core.profiles import fit_profile, parse_index
    for kind in kinds:
        parse_index(kind)
    fitted = {}
    for name in tqdm(domains or library.names(), desc="profiles", disable=not progress):
        centroid = library.get(name).centroid
        data = load_split(name, "train")
        emb = index_embeddings(clip, data.images, library.embedder)
        gap = float((emb.mean(0) - centroid).norm())
        if gap > 1e-3:
            raise UsageError(f"domain {name!r}: its regenerated training images lie {gap:.3g} from the library "
                             "centroid; the library was built from other data or with another CLIP")
        fitted[name] = fit_profile(emb, centroid, kinds, quantile, embed_class_names(clip, data.class_names))
    library.set_profiles(fitted)
    return fitted
