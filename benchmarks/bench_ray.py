"""Ray as the engine: a library build and a leave-one-out run, serial against Ray with 1 and 2 workers,
measured side by side in one run, plus Ray's own overhead per task.

Build: 4 adapters on the shipped tiny CLIP and segmenter (mini-world domains, 30 steps each; --quick: 3),
through pipeline.add_domains exactly as `semla-lab build-library [--ray]` runs it. Leave-one-out: the
library built, evaluated on its own 4 domains (pipeline.evaluate, one job per target, 50 images each;
--quick: 8). Each Ray mode starts its own local cluster (`Engine(ray=True, num_cpus=workers)`, whose
workers import the pipeline as they start, as the CLI's do); that start, up to every worker being ready,
is timed apart: the build / evaluation columns exclude it and the end-to-end column includes it. Every
mode builds the replayed source split itself, once, in the driver. Every mode must produce the same bytes
(adapters, centroids) and the same leave-one-out numbers, or the benchmark fails. Overhead: the wall time
per no-op task through Engine.map with 2 workers. Target: Ray with 2 workers >= 1.6x faster than serial
for 4 or more adapters on a 2-core machine.

    python benchmarks/bench_ray.py [--quick] [--json out.json]
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from common import fmt_s, fmt_x, parser, payload, setup, table, target_lines, write_json

import torch

from semla_lab.workflows import pipeline
from semla_lab.core.engine import Engine
from semla_lab.evaluation.config import EvalConfig
from semla_lab.library.index import AdapterLibrary
from semla_lab.training.train import AdapterConfig

DOMAINS = ["cityscapes", "acdc_fog", "nyu", "ade"]
METHODS = ("zero_shot", "uniform", "semla", "oracle")
OVERHEAD_TASKS = 40


def library_bytes(root: Path) -> dict[str, bytes]:
    lib = AdapterLibrary(root)
    files = {f"{n}/{p.name}": p.read_bytes() for n in lib.names() for p in sorted(lib.adapter_path(n).iterdir())}
    return {**files, "centroids": sorted(root.glob("centroids-*.safetensors"))[-1].read_bytes()}


def run_mode(workers: int | None, work: Path, cfg: AdapterConfig, eval_cfg: EvalConfig, device: str) -> dict:
    """Build the library and run leave-one-out in one mode (None: serial); times and outputs."""
    t0 = time.perf_counter()
    pipeline._replay.cache_clear()                           # every mode builds its replay split itself
    pipeline._load.cache_clear()
    with Engine(ray=workers is not None, num_cpus=workers, preload=pipeline.WORKER_PRELOAD) as engine:
        if workers is not None:
            list(engine.map(abs, range(workers)))          # workers started and preloaded before the clock
        ready = time.perf_counter()
        out = work / f"library-{workers or 'serial'}"
        models = pipeline.Models(device=device)
        pipeline.add_domains(DOMAINS, out, models, cfg, engine, progress=False)
        built = time.perf_counter()
        loo = pipeline.evaluate(DOMAINS, pipeline.Models(library=str(out), device=device), METHODS, eval_cfg,
                                engine=engine, progress=False)
        evaluated = time.perf_counter()
        overhead = None
        if workers == 2:
            o0 = time.perf_counter()
            list(engine.map(abs, range(OVERHEAD_TASKS)))
            overhead = (time.perf_counter() - o0) / OVERHEAD_TASKS
    return {"mode": "serial" if workers is None else f"ray, {workers} worker{'s' * (workers > 1)}",
            "startup_s": ready - t0 if workers else None, "build_s": built - ready, "loo_s": evaluated - built,
            "end_to_end_s": time.perf_counter() - t0, "overhead_per_task_s": overhead,
            "library": library_bytes(out), "results": loo["results"]}


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = setup(args)
    torch.set_grad_enabled(True)                                       # adapters train
    cfg = AdapterConfig(steps=3 if args.quick else 30)
    eval_cfg = EvalConfig(k=2, max_images=8 if args.quick else 50)
    print(f"Library build ({len(DOMAINS)} adapters, {cfg.steps} steps, batch {cfg.batch} + {cfg.replay} replayed) and "
          f"leave-one-out ({len(DOMAINS)} targets x {eval_cfg.max_images} images) on {device}, "
          f"{torch.get_num_threads()} torch thread(s) per process, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start.\n")
    with tempfile.TemporaryDirectory() as tmp:
        modes = [run_mode(w, Path(tmp), cfg, eval_cfg, str(device)) for w in (None, 1, 2)]
    serial = modes[0]
    for m in modes[1:]:
        if m["library"] != serial["library"]:
            raise AssertionError(f"{m['mode']}: the library differs from the serial build")
        if m["results"] != serial["results"]:
            raise AssertionError(f"{m['mode']}: leave-one-out numbers differ from the serial run")
    rows = [{k: v for k, v in m.items() if k not in ("library", "results")} for m in modes]
    for r in rows:
        r["build_speedup"] = serial["build_s"] / r["build_s"]
        r["loo_speedup"] = serial["loo_s"] / r["loo_s"]
        r["end_to_end_speedup"] = serial["end_to_end_s"] / r["end_to_end_s"]
    print(table(rows, [("mode", "mode", None), ("startup_s", "cluster start", fmt_s),
                       ("build_s", "build", fmt_s), ("build_speedup", "vs serial", fmt_x),
                       ("loo_s", "leave-one-out", fmt_s), ("loo_speedup", "vs serial", fmt_x),
                       ("end_to_end_s", "end to end", fmt_s), ("end_to_end_speedup", "vs serial", fmt_x)]))
    overhead = rows[2]["overhead_per_task_s"]
    print(f"\nRay overhead: {fmt_s(overhead)} per no-op task ({OVERHEAD_TASKS} tasks, 2 workers)")
    print("every mode: identical adapter and centroid bytes, identical leave-one-out numbers")
    targets = [{"name": f"library build of {len(DOMAINS)} adapters, Ray with 2 workers vs serial",
                "goal": ">= 1.6x faster", "measured": fmt_x(rows[2]["build_speedup"]),
                "met": rows[2]["build_speedup"] >= 1.6}]
    print("\n" + target_lines(targets))
    out = payload("ray", device, args.quick, rows, targets, adapters=len(DOMAINS), steps=cfg.steps,
                  load_average_end=os.getloadavg()[0])
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
