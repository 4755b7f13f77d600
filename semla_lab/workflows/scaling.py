"""The library-scaling study: zero-shot, the uniform merge and SemLA as an adapter library grows.

A pool of random domains (world/pool.py) gets one adapter each, trained once with the shipped recipe
(source replay included) into the pool library by the one pipeline (pipeline.add_domains). Growth
orders (library/growth.py: random orders with seeds 0, 1, ..., and active growth by target coverage) list the
pool's domains; the library of size s in an order holds its first s domains, so libraries are nested
and share the pool's adapters. Each is an ordinary library folder, evaluated on fixed held-out targets by pipeline.evaluate; the
targets' own adapters, in a library of their own, give the oracle. The pipeline's jobs (one per adapter,
one per target) run on an engine.Engine, serially or as Ray tasks; the driver alone writes libraries. A
rerun reuses what is on disk: the pool, trained adapters, libraries, and evaluations made with the same
settings; another adapter recipe in the same folder is refused.

Layout of a study folder:
    pool/                         the pool's spec files and vocabularies.yaml
    recipe.json                   the adapter recipe every adapter of the study was trained with
    pool-library/                 one adapter per pool domain
    oracle-library/               one adapter per target, trained on its training split
    libraries/<order>-<size>/     the first <size> domains of <order>; full-<size> when that is the whole pool
    evaluations/<library>/        results.json and selections.jsonl of the benchmark
    scaling.json, scaling.png     the curves
Notebook 11 presents the study.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..models.clip import index_embeddings
from ..core.io import atomic_folder, atomic_write_json
from ..core.engine import Engine
from ..core.errors import UsageError
from ..evaluation.config import EvalConfig
from ..library.growth import active_order, coverage_curve, random_order
from ..library.index import AdapterLibrary
from ..core.manifests import manifests_dir
from .pipeline import Models, add_domains, evaluate, load_models
from ..core.runtime import resolve_device
from ..training.train import AdapterConfig
from ..data.world.generate import generate, get_domain
from ..data.world.pool import domain_pool, read_pool, write_pool
from ..data.world.spec import DomainSpec, to_dict

METHODS = ("zero_shot", "uniform", "semla")
ACTIVE = "active"


@dataclass(frozen=True)
class ScaleConfig:
    """The study's design; adapters follow train.AdapterConfig and evaluation config.EvalConfig."""
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


def library_name(order: str, size: int, pool_size: int) -> str:
    """Folder name of an order's library of `size` domains; all orders share the whole pool."""
    return f"full-{size:03d}" if size == pool_size else f"{order}-{size:03d}"


# ---- the driver's steps ----------------------------------------------------------------------------

def ensure_pool(folder: Path, size: int, seed: int) -> list[DomainSpec]:
    """The pool's specs, written to `folder` on the first run and checked against it on later ones."""
    specs = domain_pool(size, seed)
    if not folder.exists():
        write_pool(specs, folder)
    elif [to_dict(s) for s in read_pool(folder)] != [to_dict(s) for s in specs]:
        raise UsageError(f"{folder} holds another pool than {size} domains of seed {seed}; choose a new --out")
    return specs


def check_recipe(out: Path, adapter: AdapterConfig) -> None:
    """Record the adapter recipe in out/recipe.json on the first run; a later run must use the same one
    (the pipeline reuses the adapters a library holds, whatever they were trained with)."""
    path, recipe = out / "recipe.json", json.loads(json.dumps(asdict(adapter)))
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, recipe)
    elif json.loads(path.read_text()) != recipe:
        raise UsageError(f"{out} holds adapters trained with another recipe ({path}); choose a new --out")


def nested_library(pool: AdapterLibrary, names: Sequence[str], root: Path) -> AdapterLibrary:
    """An ordinary library at `root` holding `names` from `pool` (adapters copied), built beside it and
    renamed into place; an existing one with the same domains is reused."""
    if (root / "index.json").is_file():
        existing = AdapterLibrary(root)
        if existing.names() == list(names) and all(
                existing.get(n).metadata == pool.get(n).metadata for n in names):
            return existing
    with atomic_folder(root, replace=True) as tmp:
        library = AdapterLibrary.create(tmp, pool.embedder, pool.base_model, pool.lora_config)
        for n in names:
            entry = pool.get(n)
            library.add(n, entry.path, entry.centroid, entry.num_images, entry.metadata)
    return AdapterLibrary(root)


def stored_results(out_dir: Path, library: AdapterLibrary, targets: Sequence[str], methods: Sequence[str],
                   cfg: EvalConfig) -> dict | None:
    """The results in out_dir/results.json if they were computed for this library, targets, methods and
    settings, else None."""
    path = out_dir / "results.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    config = payload.get("config", {})
    expected = json.loads(json.dumps({**asdict(cfg), "methods": list(methods), "targets": list(targets)}))
    same = all(config.get(k) == v for k, v in expected.items()) and \
        config.get("library", {}).get("domains") == library.names()
    return payload["results"] if same else None


def target_queries(targets: Sequence[DomainSpec], count: int, models: Models, embedder: dict) -> list[torch.Tensor]:
    """CLIP embeddings (count, D) of each target's first `count` training images, as the library indexes
    them; their labels are never read."""
    clip, _ = load_models(models)
    return [index_embeddings(clip, generate(t, "train", count).images, embedder) for t in targets]


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


def growth_orders(cfg: ScaleConfig, names: list[str], centroids: dict[str, torch.Tensor], queries: list[torch.Tensor],
                  metric: str) -> tuple[dict[str, list[str]], dict[str, dict[str, float]]]:
    """The study's orders of the pool's domains (random-<seed>, then active) and each order's coverage of
    the targets at every library size (keyed by str(size), as in JSON)."""
    orders = {f"random-{s}": random_order(names, s) for s in range(cfg.random_orders)}
    if cfg.active:
        orders[ACTIVE] = active_order(queries, torch.stack([centroids[n] for n in names]), names, metric)
    coverage = {o: {str(size): value
                    for size, value in coverage_curve(queries, centroids, order, cfg.sizes, metric).items()}
                for o, order in orders.items()}
    return orders, coverage


def _evaluate(engine: Engine, out: Path, cfg: ScaleConfig, orders: dict[str, list[str]], pool_lib: AdapterLibrary,
              targets: list[str], eval_cfg: EvalConfig, models: Models, progress: bool, log) -> tuple[dict, dict, int]:
    """Build the nested libraries and evaluate those without stored results (and the oracle) with the
    pipeline. Returns the runs (library name -> library, size, orders, domains), results by library name,
    and the number of evaluations run."""
    runs: dict[str, dict] = {}
    for order_name, order in orders.items():
        for size in cfg.sizes:
            name = library_name(order_name, size, cfg.pool_size)
            run = runs.setdefault(name, {"library": f"libraries/{name}", "size": size, "orders": [],
                                         "domains": order[:size]})
            run["orders"].append(order_name)
    todo, results = [], {}
    for name, run in runs.items():
        library = nested_library(pool_lib, run["domains"], out / run["library"])
        todo.append((name, library, METHODS, eval_cfg))
    if cfg.oracle:
        # the benchmark also retrieves (top-k among the other targets' adapters), which the oracle ignores: k=1
        todo.append(("oracle", AdapterLibrary(out / "oracle-library"), ("oracle",), replace(eval_cfg, k=1)))
    for name, library, methods, c in todo:
        results[name] = stored_results(out / "evaluations" / name, library, targets, methods, c)
    todo = [job for job in todo if results[job[0]] is None]
    log(f"{len(runs)} libraries, {len(todo)} evaluation(s) to run")
    for name, library, methods, c in tqdm(todo, desc="libraries", disable=not progress):
        results[name] = evaluate(targets, replace(models, library=str(library.root)), methods, c,
                                 out / "evaluations" / name, engine, progress=False)["results"]
    return runs, results, len(todo)


def _spec_label(file: str) -> str:
    """A target's spec file relative to the data manifests when it is one of them (no local paths in results)."""
    path = Path(file).resolve()
    return str(path.relative_to(manifests_dir().resolve())) if path.is_relative_to(manifests_dir().resolve()) else file


def run_scale(out: str | Path, cfg: ScaleConfig = ScaleConfig(), targets: Sequence[str] | None = None,
              adapter: AdapterConfig = AdapterConfig(), eval_cfg: EvalConfig = EvalConfig(max_images=100),
              engine: Engine | None = None, device=None, progress: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the study in folder `out`; returns the payload written to out/scaling.json.
    `targets` default to the held-out domains of data_manifests/heldout/."""
    t_start = time.perf_counter()
    out = Path(out)
    engine = engine or Engine()
    device = None if device is None else str(resolve_device(device))
    if cfg.sizes[0] < eval_cfg.k:
        raise UsageError(f"the smallest library ({cfg.sizes[0]} domains) is below SemLA's k={eval_cfg.k}")
    pool = ensure_pool(out / "pool", cfg.pool_size, cfg.pool_seed)
    if targets is None:
        targets = [str(p) for p in sorted((manifests_dir() / "heldout").glob("*.yaml"))]
    targets = list(targets)
    target_specs = _target_specs(targets, pool)
    if cfg.oracle and len(target_specs) < 2:
        raise UsageError("the oracle needs two or more targets (run_benchmark also retrieves among the other "
                         "targets' adapters); add a target or drop the oracle")
    check_recipe(out, adapter)
    models = Models(device=device or str(resolve_device(None)))
    log(f"{len(pool)} pool domains, {len(target_specs)} targets, jobs run with {engine}")
    with engine:
        t0 = time.perf_counter()
        trained = add_domains([str(out / "pool" / f"{s.name}.yaml") for s in pool], out / "pool-library", models,
                              adapter, engine, progress=progress)["added"]
        if cfg.oracle:
            trained.update(add_domains(targets, out / "oracle-library", models, adapter, engine,
                                       progress=progress)["added"])
        t_train = time.perf_counter() - t0
        pool_lib = AdapterLibrary(out / "pool-library")
        names = [s.name for s in pool]
        queries = target_queries(target_specs, cfg.query_images, models, pool_lib.embedder)
        orders, coverage = growth_orders(cfg, names, {n: pool_lib.get(n).centroid for n in names}, queries,
                                         eval_cfg.metric)
        t0 = time.perf_counter()
        runs, results, evaluations = _evaluate(engine, out, cfg, orders, pool_lib, targets, eval_cfg, models, progress,
                                               log)
        t_eval = time.perf_counter() - t0

    pick = lambda res: {k: res[k] for k in ("hmean", "mean", "per_domain")}
    counts = results[next(iter(runs))]["zero_shot"]["num_images"]
    payload = {
        "config": {**asdict(cfg), "adapter": asdict(adapter), "evaluation": asdict(eval_cfg), "methods": list(METHODS)},
        "targets": {t.name: {"spec": _spec_label(f), "test_images": counts[t.name]}
                    for t, f in zip(target_specs, targets)},
        "pool": {"folder": "pool", "domains": {s.name: s.plays for s in pool}},
        "orders": orders,
        "coverage": coverage,
        "runs": [{"library": r["library"], "size": r["size"], "orders": r["orders"],
                  "results": {m: pick(res) for m, res in results[n].items()}} for n, r in runs.items()],
        "oracle": pick(results["oracle"]["oracle"]) if cfg.oracle else None,
        "timing": {"engine": repr(engine), "threads": torch.get_num_threads(), "adapters_trained": len(trained),
                   "train_wall_s": round(t_train, 1), "evaluations_run": evaluations,
                   "evaluate_wall_s": round(t_eval, 1),
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
