"""Retrieval: latency per query of semla_lab.core.retrieval.retrieve (one query, and a batch of 64) and memory
(centroid matrix bytes, peak RSS growth) for synthetic libraries of 10 ... 100,000 unit-norm centroids at
D=64 (the tiny CLIP) and D=512 (ViT-B/16 CLIP), K=5, euclidean distance. Target: < 1 ms per single query at
10,000 centroids on a CPU.

Where retrieve() spends its time at 10,000 centroids is broken down, next to the path for large libraries,
semla_lab.core.retrieval.CentroidIndex (centroids validated once, one GEMM + top-(K+8) preselection, exact
distances for the candidates: same indices and weights), which the target is measured on. Then opening a library of 1,000 adapters lazily (index + centroids) against
loading every adapter's weights eagerly, in time and memory.

    python benchmarks/bench_retrieval.py [--quick] [--device cuda] [--json out.json]
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import tracemalloc
from pathlib import Path

from common import (PeakRSS, fmt_bytes, fmt_s, fmt_x, measure, parser, payload, setup, table, target_lines,
                    write_json)

import torch
import torch.nn.functional as F

from semla_lab.core.retrieval import (CentroidIndex, RetrievalConfig, _check_finite, distances, retrieve, softmax_weights,
                                 top_k)

SIZES = (10, 100, 1_000, 10_000, 100_000)
DIMS = (64, 512)
BATCH = 64
TARGET_S, TARGET_L = 1e-3, 10_000
CONFIG = RetrievalConfig(k=5, tau=0.05)


def library(n: int, dim: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1).to(device), [f"domain{i:06d}" for i in range(n)]


def queries(q: int, dim: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(q, dim, generator=g), dim=-1).to(device)


def timed(fn, device: torch.device, budget: float, first: float | None = None) -> float:
    """Median seconds of `fn()`: a first call (or its given time `first`) tells its cost, then runs filling
    about `budget` seconds (at least 5; 3 for calls over 0.5 s or the small --quick budget; at most 200),
    after one more warm-up call for the fast ones."""
    first = measure(fn, device, 1, 0).median if first is None else first
    reps = int(min(200, max(3 if budget < 0.1 or first > 0.5 else 5, budget / max(first, 1e-6))))
    return measure(fn, device, reps, 1 if first < 0.5 else 0).median



# ---- latency and memory -------------------------------------------------------------------------------------

def measure_size(n: int, dim: int, device: torch.device, budget: float) -> dict:
    with PeakRSS() as build_mem:
        c, names = library(n, dim, device)
    q1, qb = queries(1, dim, device), queries(BATCH, dim, device)
    t1 = timed(lambda: retrieve(q1, c, names, CONFIG), device, budget)
    with PeakRSS() as call_mem:     # the first batch call: its memory, and its time tells timed() the cost
        first = measure(lambda: retrieve(qb, c, names, CONFIG), device, 1, 0).median
    tb = timed(lambda: retrieve(qb, c, names, CONFIG), device, budget, first)
    index = CentroidIndex(c, names)
    tp = timed(lambda: index.search(q1, CONFIG), device, budget)
    tpb = timed(lambda: index.search(qb, CONFIG), device, budget)
    return {"n_centroids": n, "dim": dim, "single_query_s": t1, "batch64_per_query_s": tb / BATCH,
            "batch64_s": tb, "proposed_single_query_s": tp, "proposed_batch64_per_query_s": tpb / BATCH,
            "proposed_speedup": t1 / tp, "centroid_bytes": c.numel() * c.element_size(),
            "peak_rss_build_bytes": build_mem.delta, "peak_rss_batch64_call_bytes": call_mem.delta}


def breakdown(dim: int, device: torch.device, budget: float, n: int = TARGET_L) -> list[dict]:
    """retrieve() at n centroids, one query, split into its steps; then the proposed path and its variants."""
    c, names = library(n, dim, device)
    q = queries(1, dim, device)
    d = distances(q, c)
    vals, idx = top_k(d, CONFIG.k)
    steps = {
        "retrieve() total": lambda: retrieve(q, c, names, CONFIG),
        "  validation: isfinite over all centroids (every call)": lambda: _check_finite(c, "centroids"),
        "  validation: names unique, exclude mask (every call)":
            lambda: (len(set(names)), torch.zeros(n, dtype=torch.bool)),
        "  distances(): validation + exact cdist": lambda: distances(q, c),
        "    of which torch.cdist(donot_use_mm) alone":
            lambda: torch.cdist(q, c, compute_mode="donot_use_mm_for_euclid_dist"),
        "  top_k(): full stable sort of L distances": lambda: top_k(d, CONFIG.k),
        "  softmax_weights()": lambda: softmax_weights(vals, CONFIG.tau),
    }
    columns = c.T.contiguous()
    steps["bandwidth floor: one pass over the centroids, q @ C^T with C^T stored (D, L)"] = lambda: q @ columns
    index = CentroidIndex(c, names)
    steps["proposed: CentroidIndex.search (GEMM + top-(K+8) + exact)"] = lambda: index.search(q, CONFIG)
    t = {name: timed(fn, device, budget) for name, fn in steps.items()}
    total = t["retrieve() total"]
    # the fast path must give retrieve()'s answer: check on 256 queries
    qs = queries(256, dim, device, seed=7)
    ref = retrieve(qs, c, names, CONFIG)
    fast = index.search(qs, CONFIG)
    agree = bool(torch.equal(fast.indices, ref.indices) and torch.allclose(fast.weights, ref.weights, atol=1e-6))
    rows = [{"dim": dim, "n_centroids": n, "step": name, "time_s": s, "share_of_retrieve": s / total,
             "speedup_vs_retrieve": total / s if name.startswith("proposed") else None} for name, s in t.items()]
    for r in rows:
        if r["step"].startswith("proposed"):
            r["same_result_256_queries"] = agree
    return rows


# ---- lazy library open --------------------------------------------------------------------------------------

def prototype_adapter(folder: Path) -> None:
    """One real peft adapter folder for the tiny segmenter (r=8, alpha=16 on LORA_TARGETS)."""
    from peft import LoraConfig, get_peft_model
    from common import segmenter as make_segmenter
    from semla_lab.models.segmenter import LORA_TARGETS
    seg, _, _ = make_segmenter("tiny", torch.device("cpu"))
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=False)
    get_peft_model(copy.deepcopy(seg), cfg).save_pretrained(folder, save_embedding_layers=False)


def write_library(root: Path, n: int, dim: int = 64) -> int:
    """A library folder in library/index.py's on-disk layout with `n` copies of one real adapter (written directly:
    AdapterLibrary.add rewrites the index on every call). Returns the bytes written."""
    from safetensors.torch import save_file
    from semla_lab.models.segmenter import LORA_TARGETS
    proto = root.parent / "prototype"
    prototype_adapter(proto)
    names = [f"domain{i:04d}" for i in range(n)]
    (root / "adapters").mkdir(parents=True)
    for name in names:
        shutil.copytree(proto, root / "adapters" / name)
    centroids, _ = library(n, dim, torch.device("cpu"))
    save_file({name: centroids[i].clone() for i, name in enumerate(names)}, root / "centroids-1.safetensors")
    index = {"format": 1, "version": 1, "embedder": {"model": "semla-tiny-clip", "pretrained": "random",
                                                      "image_size": 64, "normalize": True, "dim": dim},
             "base_model": None, "lora": {"r": 8, "lora_alpha": 16, "target_modules": LORA_TARGETS},
             "centroids_file": "centroids-1.safetensors",
             "domains": [{"name": name, "num_images": 100, "metadata": {}, "adapter": f"adapters/{name}"}
                         for name in names]}
    (root / "index.json").write_text(json.dumps(index, indent=2))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def open_lazy(root: Path):
    from semla_lab.library.index import AdapterLibrary
    return AdapterLibrary(root)


def open_eager(root: Path):
    lib = open_lazy(root)
    return lib, {name: lib.load_adapter_state(name) for name in lib.names()}


def lazy_vs_eager(n: int, device: torch.device, quick: bool) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="semla-bench-") as tmp:
        root = Path(tmp) / "library"
        disk = write_library(root, n)
        lib = open_lazy(root)
        assert len(lib) == n and lib.centroids().shape == (n, 64) and lib.load_adapter_state(lib.names()[0])
        t_lazy = measure(lambda: open_lazy(root), device, 3 if quick else 7).median
        t_eager = measure(lambda: open_eager(root), device, 1 if quick else 3, 0).median   # page cache is warm
        rows = []
        for name, fn, t in (("open lazily: AdapterLibrary(root) (index + centroids)", open_lazy, t_lazy),
                            ("open eagerly: AdapterLibrary(root) + load_adapter_state() for every adapter",
                             open_eager, t_eager)):
            tracemalloc.start()
            with PeakRSS() as mem:
                obj = fn(root)
            py_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            tensors = obj[1] if isinstance(obj, tuple) else {}
            weight_bytes = sum(t.numel() * t.element_size() for s in tensors.values() for t in s.values())
            rows.append({"n_adapters": n, "measured": name, "time_s": t, "ratio_to_lazy": t / t_lazy,
                         "peak_rss_bytes": mem.delta, "retained_rss_bytes": mem.retained,
                         "python_heap_peak_bytes": py_peak, "adapter_weight_bytes": weight_bytes,
                         "library_disk_bytes": disk})
            del obj, tensors
    return rows


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device = setup(args)
    sizes = (100, TARGET_L) if args.quick else SIZES
    budget = 0.03 if args.quick else 0.4           # seconds of timed runs per measurement
    print(f"Retrieval on {device} ({torch.get_num_threads()} torch thread(s)), K={CONFIG.k}, euclidean; "
          "medians after warm-up.\n")
    rows = [measure_size(n, dim, device, budget) for dim in DIMS for n in sizes]
    print(table(rows, [("n_centroids", "centroids", lambda v: f"{v:,}"), ("dim", "D", None),
                       ("single_query_s", "1 query", fmt_s), ("batch64_per_query_s", "per query (batch 64)", fmt_s),
                       ("proposed_single_query_s", "1 query, proposed", fmt_s),
                       ("proposed_speedup", "speed-up", fmt_x),
                       ("proposed_batch64_per_query_s", "per query (batch 64), proposed", fmt_s),
                       ("centroid_bytes", "centroid matrix", fmt_bytes),
                       ("peak_rss_build_bytes", "peak RSS +, build", fmt_bytes),
                       ("peak_rss_batch64_call_bytes", "peak RSS +, batch-64 call", fmt_bytes)],
                title="retrieve() latency and memory") + "\n")
    steps = [r for dim in DIMS for r in breakdown(dim, device, budget)]
    print(table(steps, [("step", f"where retrieve() spends its time, {TARGET_L:,} centroids, 1 query", None),
                        ("dim", "D", None), ("time_s", "time", fmt_s),
                        ("share_of_retrieve", "of retrieve()", lambda v: f"{v:.0%}"),
                        ("speedup_vs_retrieve", "speed-up", fmt_x),
                        ("same_result_256_queries", "same top-K + weights", None)]) + "\n")
    targets = []
    for dim in DIMS:
        r = next(r for r in rows if r["n_centroids"] == TARGET_L and r["dim"] == dim)
        prop = next(s for s in steps if s["dim"] == dim and s["step"].startswith("proposed: "))
        targets.append({"name": f"CentroidIndex.search single query, {TARGET_L:,} centroids, D={dim}, {device.type}",
                        "goal": "< 1 ms", "measured": fmt_s(prop["time_s"]) +
                        f" (plain retrieve(), validating every call: {fmt_s(r['single_query_s'])})",
                        "value": prop["time_s"], "met": prop["time_s"] < TARGET_S})
    n_lib = 100 if args.quick else 1000
    lib_rows = lazy_vs_eager(n_lib, device, args.quick)
    print(table(lib_rows, [("measured", f"library of {n_lib:,} adapters (tiny segmenter, r=8; disk "
                            f"{fmt_bytes(lib_rows[0]['library_disk_bytes'])}; warm page cache)", None),
                           ("time_s", "time", fmt_s), ("ratio_to_lazy", "x lazy", fmt_x),
                           ("peak_rss_bytes", "peak RSS +", fmt_bytes),
                           ("retained_rss_bytes", "retained RSS +", fmt_bytes),
                           ("python_heap_peak_bytes", "python heap peak", fmt_bytes),
                           ("adapter_weight_bytes", "weights in memory", fmt_bytes)]) + "\n")
    print(target_lines(targets))
    out = payload("retrieval", device, args.quick, rows, targets, breakdown=steps, library_open=lib_rows,
                  k=CONFIG.k, batch=BATCH)
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
