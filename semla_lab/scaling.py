"""The library-scaling study: zero-shot, the uniform merge and SemLA as an adapter library grows.

A pool of random domains (world/pool.py) gets one adapter each, trained once with the shipped recipe
(train.train_adapter, source replay included) into the pool library. Growth orders (growth.py: random
orders with seeds 0, 1, ..., and active growth by target coverage) list the pool's domains; the library
of size s in an order holds its first s domains, so libraries are nested and share the pool's adapters.
Each is an ordinary library folder, evaluated on fixed held-out targets by experiments.run_benchmark;
the targets' own adapters, in a library of their own, give the oracle. Training and evaluation are
jobs (`train_job`, `evaluate_job`) that engine.Engine runs serially or as Ray tasks; the driver alone
writes libraries. A rerun reuses what is on disk: the pool, trained adapters, libraries, and
evaluations made with the same settings.

Layout of a study folder:
    pool/                         the pool's spec files and vocabularies.yaml
    pool-library/                 one adapter per pool domain
    oracle-library/               one adapter per target, trained on its training split
    libraries/<order>-<size>/     the first <size> domains of <order>; full-<size> when that is the whole pool
    evaluations/<library>/        results.json and selections.jsonl of run_benchmark
    scaling.json, scaling.png     the curves
Notebook 11 presents the study.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from .assets import EMBED_NORMALIZE, base_model_id, load_segmenter, replace_path, source_replay
from .clip import embed_class_names, embed_images, load_clip
from .data import atomic_write_json
from .engine import Engine
from .errors import UsageError
from .experiments import EvalConfig, run_benchmark
from .growth import active_order, coverage_curve, random_order
from .library import AdapterLibrary
from .runtime import resolve_device
from .train import AdapterConfig, train_adapter
from .world.generate import generate, get_domain
from .world.pool import domain_pool, read_pool, write_pool
from .world.spec import DomainSpec, to_dict

METHODS = ("zero_shot", "uniform", "semla")
ACTIVE = "active"


@dataclass(frozen=True)
class ScaleConfig:
    """The study's design; adapters follow train.AdapterConfig and evaluation experiments.EvalConfig."""
    sizes: tuple[int, ...] = (5, 10, 20, 40, 80)    # library sizes, each order's libraries nested
    pool_size: int = 80                             # domains in the pool (at least the largest size)
    pool_seed: int = 0
    random_orders: int = 3                          # random orders, seeds 0 .. n-1
    active: bool = True                             # also grow by target coverage (growth.active_order)
    oracle: bool = True                             # train each target's own adapter as the ceiling
    query_images: int = 50                          # unlabelled training images per target that active growth sees

    def __post_init__(self):
        sizes = list(self.sizes)
        if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1:
            raise UsageError(f"sizes must be increasing positive integers, got {sizes}")
        if sizes[-1] > self.pool_size:
            raise UsageError(f"the largest library size {sizes[-1]} exceeds the pool of {self.pool_size} domains")
        if self.random_orders < 0 or (self.random_orders == 0 and not self.active):
            raise UsageError("the study needs at least one order: random_orders >= 1 or active")
        if self.query_images < 1:
            raise UsageError(f"query_images must be >= 1, got {self.query_images}")

    @property
    def orders(self) -> list[str]:
        return [f"random-{s}" for s in range(self.random_orders)] + ([ACTIVE] if self.active else [])


def spec_digest(spec: DomainSpec) -> str:
    return hashlib.sha256(json.dumps(to_dict(spec), sort_keys=True).encode()).hexdigest()[:12]


def library_name(order: str, size: int, pool_size: int) -> str:
    """Folder name of an order's library of `size` domains; all orders share the whole pool."""
    return f"full-{size:03d}" if size == pool_size else f"{order}-{size:03d}"


# ---- jobs (run in this process or as Ray tasks) --------------------------------------------------

@lru_cache(maxsize=2)
def _models(device: str | None, replay: bool):
    """The shipped CLIP and segmenter, the source replay set and the base model id, once per process."""
    clip = load_clip(device=device)
    segmenter = load_segmenter(clip=clip, device=device)
    return clip, segmenter, source_replay(clip) if replay else None, base_model_id()


@dataclass(frozen=True)
class TrainJob:
    """Train the adapter of the domain in `spec_file` into the empty folder `out_dir`."""
    spec_file: str
    out_dir: str
    adapter: AdapterConfig
    device: str | None = None


def train_job(job: TrainJob) -> dict:
    """Returns the domain's centroid (mean normalised CLIP embedding of its training images), image count,
    final loss and seconds; the adapter is in job.out_dir."""
    clip, segmenter, replay, base = _models(job.device, job.adapter.replay > 0)
    data = generate(get_domain(job.spec_file), "train")
    t0 = time.perf_counter()
    info = train_adapter(segmenter, embed_class_names(clip, data.class_names), data.images, data.labels, job.out_dir,
                         base, job.adapter, job.device, progress=False, replay=replay)
    centroid = embed_images(clip, data.images, normalize=EMBED_NORMALIZE).mean(0)
    return {"centroid": centroid.tolist(), "num_images": len(data), "final_loss": info["final_loss"],
            "seconds": round(time.perf_counter() - t0, 2)}


@dataclass(frozen=True)
class EvalJob:
    """Evaluate `methods` of the library at `library` on `targets`, writing to `out_dir`."""
    library: str
    targets: tuple[str, ...]
    methods: tuple[str, ...]
    cfg: EvalConfig
    out_dir: str
    device: str | None = None


def evaluate_job(job: EvalJob) -> dict:
    """run_benchmark's results (per method: per-domain mIoU, mean, h-mean, image counts)."""
    clip, segmenter, _, _ = _models(job.device, False)
    payload = run_benchmark(segmenter, clip, AdapterLibrary(job.library), list(job.targets), job.methods, job.cfg,
                            job.out_dir, device=job.device, progress=False)
    return payload["results"]


# ---- the driver's steps ----------------------------------------------------------------------------

def ensure_pool(folder: Path, size: int, seed: int) -> list[DomainSpec]:
    """The pool's specs, written to `folder` on the first run and checked against it on later ones."""
    specs = domain_pool(size, seed)
    if not folder.exists():
        write_pool(specs, folder)
    elif [to_dict(s) for s in read_pool(folder)] != [to_dict(s) for s in specs]:
        raise UsageError(f"{folder} holds another pool than {size} domains of seed {seed}; choose a new --out")
    return specs


def open_library(root: Path, like: AdapterLibrary | None = None, lora: dict | None = None) -> AdapterLibrary:
    """The library at `root`, created for the shipped CLIP and segmenter (or like `like`) if absent."""
    if (root / "index.json").is_file():
        return AdapterLibrary(root)
    if like is not None:
        return AdapterLibrary.create(root, like.embedder, like.base_model, like.lora_config)
    clip, _, _, base = _models(None, False)
    return AdapterLibrary.create(root, clip.identity(EMBED_NORMALIZE), base, lora)


def _recipe(spec: DomainSpec, adapter: AdapterConfig) -> dict:
    return {"spec": spec_digest(spec), "adapter": asdict(adapter)}


def pending_adapters(library: AdapterLibrary, specs: Sequence[DomainSpec], adapter: AdapterConfig) -> list[DomainSpec]:
    """The specs whose adapter `library` still lacks; one trained from another spec or recipe is refused."""
    todo = []
    for spec in specs:
        if spec.name not in library:
            todo.append(spec)
        elif library.get(spec.name).metadata.get("recipe") != json.loads(json.dumps(_recipe(spec, adapter))):
            raise UsageError(f"library {library.root} holds {spec.name!r} trained from another spec or adapter recipe; "
                             "choose a new --out")
    return todo


def nested_library(pool: AdapterLibrary, names: Sequence[str], root: Path) -> AdapterLibrary:
    """An ordinary library at `root` holding `names` from `pool` (adapters copied), built beside it and
    renamed into place; an existing one with the same domains is reused."""
    if (root / "index.json").is_file():
        existing = AdapterLibrary(root)
        if existing.names() == list(names) and all(
                existing.get(n).metadata == pool.get(n).metadata for n in names):
            return existing
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.build-{secrets.token_hex(4)}")
    try:
        library = AdapterLibrary.create(tmp, pool.embedder, pool.base_model, pool.lora_config)
        for n in names:
            entry = pool.get(n)
            library.add(n, entry.path, entry.centroid, entry.num_images, entry.metadata)
        replace_path(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return AdapterLibrary(root)


def stored_results(out_dir: Path, library: AdapterLibrary, job: EvalJob) -> dict | None:
    """The results in out_dir/results.json if they were computed for this library, targets, methods and
    settings, else None."""
    path = out_dir / "results.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    config = payload.get("config", {})
    expected = json.loads(json.dumps({**asdict(job.cfg), "methods": list(job.methods), "targets": list(job.targets)}))
    same = all(config.get(k) == v for k, v in expected.items()) and \
        config.get("library", {}).get("domains") == library.names()
    return payload["results"] if same else None


def target_queries(targets: Sequence[DomainSpec], count: int, device=None) -> list[torch.Tensor]:
    """Normalised CLIP embeddings (count, D) of each target's first `count` training images, labels unused."""
    clip = _models(None if device is None else str(device), False)[0]
    return [embed_images(clip, generate(t, "train", count).images, normalize=EMBED_NORMALIZE) for t in targets]


def _target_specs(targets: Sequence[str], pool: Sequence[DomainSpec]) -> list[DomainSpec]:
    specs = []
    for t in targets:
        if Path(t).is_dir() or str(t).startswith("real:"):
            raise UsageError(f"scale targets must be mini-world domains (name or spec file), got {t!r}: active "
                             "growth reads their unlabelled training images and the oracle trains on them")
        specs.append(get_domain(t))
    clash = sorted({s.name for s in specs} & {s.name for s in pool})
    if clash:
        raise UsageError(f"target(s) {clash} are pool domains; the study's targets must be held out of the pool")
    if len({s.name for s in specs}) != len(specs):
        raise UsageError(f"targets are named twice: {[s.name for s in specs]}")
    return specs


def _train(engine: Engine, work: list[tuple[AdapterLibrary, DomainSpec, str]], out: Path, adapter: AdapterConfig,
           device, progress: bool) -> dict[str, float]:
    """Train every (library, spec, spec file) job through the engine; the driver adds each adapter to its
    library as it arrives. Returns the training seconds per domain."""
    staging = out / ".staging"
    jobs = [TrainJob(file, str(staging / f"{spec.name}-{secrets.token_hex(4)}"), adapter, device) for _, spec, file in work]
    owner = {job.out_dir: (library, spec) for job, (library, spec, _) in zip(jobs, work)}
    seconds = {}
    try:
        for job, info in tqdm(engine.map(train_job, jobs), total=len(jobs), desc="adapters", disable=not progress):
            library, spec = owner[job.out_dir]
            library.add(spec.name, job.out_dir, torch.tensor(info["centroid"]), info["num_images"],
                        metadata={"dataset": spec.dataset, "plays": spec.plays, "factors": spec.factors,
                                  "scene": spec.scene, "recipe": _recipe(spec, adapter)})
            shutil.rmtree(job.out_dir, ignore_errors=True)
            seconds[spec.name] = info["seconds"]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return seconds


def growth_orders(cfg: ScaleConfig, names: list[str], centroids: dict[str, torch.Tensor], queries: list[torch.Tensor],
                  metric: str) -> tuple[dict[str, list[str]], dict[str, dict[str, float]]]:
    """The study's orders of the pool's domains (random-<seed>, then active) and each order's coverage of
    the targets at every library size (keyed by str(size), as in JSON)."""
    orders = {f"random-{s}": random_order(names, s) for s in range(cfg.random_orders)}
    if cfg.active:
        orders[ACTIVE] = active_order(queries, torch.stack([centroids[n] for n in names]), names, metric)
    coverage = {o: {str(size): value for size, value in coverage_curve(queries, centroids, order, cfg.sizes, metric).items()}
                for o, order in orders.items()}
    return orders, coverage


def _evaluate(engine: Engine, out: Path, cfg: ScaleConfig, orders: dict[str, list[str]], pool_lib: AdapterLibrary,
              targets: list[str], eval_cfg: EvalConfig, device, progress: bool, log) -> tuple[dict, dict, int]:
    """Build the nested libraries, evaluate those without stored results (and the oracle) through the engine.
    Returns the runs (library name -> library, size, orders, domains), results by library name, and the
    number of evaluations run."""
    runs: dict[str, dict] = {}
    for order_name, order in orders.items():
        for size in cfg.sizes:
            name = library_name(order_name, size, cfg.pool_size)
            run = runs.setdefault(name, {"library": f"libraries/{name}", "size": size, "orders": [],
                                         "domains": order[:size]})
            run["orders"].append(order_name)
    jobs, results = {}, {}
    for name, run in runs.items():
        library = nested_library(pool_lib, run["domains"], out / run["library"])
        job = EvalJob(str(library.root), tuple(targets), METHODS, eval_cfg, str(out / "evaluations" / name), device)
        results[name] = stored_results(Path(job.out_dir), library, job)
        if results[name] is None:
            jobs[job] = name
    if cfg.oracle:
        oracle_lib = AdapterLibrary(out / "oracle-library")
        # run_benchmark also retrieves (top-k among the other targets' adapters), which the oracle ignores: k=1
        job = EvalJob(str(oracle_lib.root), tuple(targets), ("oracle",), replace(eval_cfg, k=1),
                      str(out / "evaluations" / "oracle"), device)
        results["oracle"] = stored_results(Path(job.out_dir), oracle_lib, job)
        if results["oracle"] is None:
            jobs[job] = "oracle"
    log(f"{len(runs)} libraries, {len(jobs)} evaluation(s) to run")
    for job, res in tqdm(engine.map(evaluate_job, list(jobs)), total=len(jobs), desc="evaluations", disable=not progress):
        results[jobs[job]] = res
    return runs, results, len(jobs)


def _spec_label(file: str) -> str:
    """A target's spec file relative to the data manifests when it is one of them (no local paths in results)."""
    from .manifests import manifests_dir
    path = Path(file).resolve()
    return str(path.relative_to(manifests_dir().resolve())) if path.is_relative_to(manifests_dir().resolve()) else file


def run_scale(out: str | Path, cfg: ScaleConfig = ScaleConfig(), targets: Sequence[str] | None = None,
              adapter: AdapterConfig = AdapterConfig(), eval_cfg: EvalConfig = EvalConfig(max_images=100),
              engine: Engine | None = None, device=None, progress: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the study in folder `out`; returns the payload written to out/scaling.json.
    `targets` default to the held-out domains of data_manifests/heldout/."""
    from .manifests import manifests_dir
    t_start = time.perf_counter()
    out = Path(out)
    engine = engine or Engine()
    device = None if device is None else str(resolve_device(device))
    if cfg.sizes[0] < eval_cfg.k:
        raise UsageError(f"the smallest library ({cfg.sizes[0]} domains) is below SemLA's k={eval_cfg.k}")
    pool = ensure_pool(out / "pool", cfg.pool_size, cfg.pool_seed)
    targets = [str(p) for p in sorted((manifests_dir() / "heldout").glob("*.yaml"))] if targets is None else list(targets)
    target_specs = _target_specs(targets, pool)
    if cfg.oracle and len(target_specs) < 2:
        raise UsageError("the oracle needs two or more targets (run_benchmark also retrieves among the other "
                         "targets' adapters); add a target or drop the oracle")
    lora = {"r": adapter.r, "lora_alpha": adapter.lora_alpha, "target_modules": adapter.target_modules}
    pool_lib = open_library(out / "pool-library", lora=lora)
    libs = [(pool_lib, pool, [str(out / "pool" / f"{s.name}.yaml") for s in pool])]
    if cfg.oracle:
        libs.append((open_library(out / "oracle-library", like=pool_lib), target_specs, targets))
    work = []
    for lib, specs, files in libs:
        todo = {s.name for s in pending_adapters(lib, specs, adapter)}
        work += [(lib, spec, file) for spec, file in zip(specs, files) if spec.name in todo]
    log(f"{len(pool)} pool domains, {len(target_specs)} targets: {len(work)} adapter(s) to train with {engine}")
    with engine:
        t0 = time.perf_counter()
        train_seconds = _train(engine, work, out, adapter, device, progress) if work else {}
        t_train = time.perf_counter() - t0
        names = [s.name for s in pool]
        orders, coverage = growth_orders(cfg, names, {n: pool_lib.get(n).centroid for n in names},
                                         target_queries(target_specs, cfg.query_images, device), eval_cfg.metric)
        t0 = time.perf_counter()
        runs, results, evaluations = _evaluate(engine, out, cfg, orders, pool_lib, targets, eval_cfg, device, progress, log)
        t_eval = time.perf_counter() - t0

    pick = lambda res: {k: res[k] for k in ("hmean", "mean", "per_domain")}
    counts = results[next(iter(runs))]["zero_shot"]["num_images"]
    payload = {
        "config": {**asdict(cfg), "adapter": asdict(adapter), "evaluation": asdict(eval_cfg), "methods": list(METHODS)},
        "targets": {t.name: {"spec": _spec_label(f), "test_images": counts[t.name]} for t, f in zip(target_specs, targets)},
        "pool": {"folder": "pool", "domains": {s.name: s.plays for s in pool}},
        "orders": orders,
        "coverage": coverage,
        "runs": [{"library": r["library"], "size": r["size"], "orders": r["orders"],
                  "results": {m: pick(res) for m, res in results[n].items()}} for n, r in runs.items()],
        "oracle": pick(results["oracle"]["oracle"]) if cfg.oracle else None,
        "timing": {"engine": repr(engine), "threads": torch.get_num_threads(), "adapters_trained": len(train_seconds),
                   "train_wall_s": round(t_train, 1), "train_job_s": round(sum(train_seconds.values()), 1),
                   "evaluations_run": evaluations, "evaluate_wall_s": round(t_eval, 1),
                   "total_wall_s": round(time.perf_counter() - t_start, 1)},
    }
    atomic_write_json(out / "scaling.json", payload)
    return payload


# ---- reading a study -------------------------------------------------------------------------------

def scaling_table(payload: dict, by_target: bool = False) -> pd.DataFrame:
    """One row per (order, size, method): h-mean and mean mIoU over the targets and the targets' coverage
    distance; `kind` is "random" or "active". With `by_target`, one row per target instead, with its mIoU."""
    rows = []
    for run in payload["runs"]:
        for order in run["orders"]:
            for method, res in run["results"].items():
                row = {"order": order, "kind": ACTIVE if order == ACTIVE else "random", "size": run["size"],
                       "method": method, "coverage": payload["coverage"][order][str(run["size"])]}
                if by_target:
                    rows += [{**row, "target": t, "miou": v} for t, v in res["per_domain"].items()]
                else:
                    rows.append({**row, "hmean": res["hmean"], "mean": res["mean"]})
    return pd.DataFrame(rows).sort_values(["method", "order", "size"], ignore_index=True)


def curve_summary(table: pd.DataFrame, value: str = "hmean") -> pd.DataFrame:
    """Per (method, size): mean, min and max of `value` over the random orders, and the active order's value."""
    rand = table[table.kind == "random"].groupby(["method", "size"])[value].agg(["mean", "min", "max", "count"])
    rand.columns = [f"random {c}" for c in rand.columns]
    active = table[table.kind == ACTIVE].set_index(["method", "size"])[value].rename(ACTIVE)
    return rand.join(active) if len(active) else rand
