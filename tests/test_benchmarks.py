"""Smoke test of benchmarks/: `run_all.py --quick` exits 0 and writes every benchmark's JSON with the expected
keys (the numbers themselves depend on the machine and are not checked, except that they are finite and the
fused and official paths agree). About 30 s on an idle 2-core machine."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = {"benchmark", "env", "quick", "rows", "targets"}
EXTRA = {"adaptation": {"embedder", "fusion", "profile", "candidates"}, "hetero_batch": {"notes"},
         "embedding": set(), "retrieval": {"breakdown", "library_open"}, "prototypes": {"k", "prototypes", "dim"},
         "ray": {"adapters", "steps"}, "analyze": set()}
ROW = {"adaptation": {"model", "batch", "measured", "median_s", "per_image_s", "ratio_to_base", "how"},
       "hetero_batch": {"model", "n", "method", "total_s", "per_image_s", "images_per_s", "fused_batch_speedup",
                        "max_abs_diff"},
       "embedding": {"model", "image_size", "n_images", "mode", "total_s", "images_per_s",
                     "speedup_vs_one_per_call"},
       "retrieval": {"n_centroids", "dim", "index", "single_query_s", "single_query_cpu_s"},
       "prototypes": {"n_domains", "queries", "index", "wall_s", "cpu_s", "cpu_ratio_to_centroid",
                      "same_as_exhaustive"},
       "ray": {"mode", "startup_s", "build_s", "build_speedup", "loo_s", "loo_speedup", "end_to_end_s",
               "overhead_per_task_s"},
       "analyze": {"task", "mode", "n_images", "total_s", "images_per_s", "speedup_vs_one_per_call",
                   "max_abs_diff_weights", "mask_pixels_equal"}}
TIME = {"adaptation": "median_s", "hetero_batch": "total_s", "embedding": "total_s", "retrieval": "single_query_s",
        "prototypes": "cpu_s", "ray": "build_s", "analyze": "total_s"}


@pytest.mark.slow
def test_run_all_quick_writes_every_json(tmp_path):
    env = {**os.environ, "SEMLA_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "benchmarks/run_all.py", "--quick", "--device", "cpu",
                           "--json-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TARGET" in proc.stdout
    for name, extra in EXTRA.items():
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert TOP | extra <= set(data), f"{name}: missing {TOP | extra - set(data)}"
        assert data["benchmark"] == name and data["quick"] is True and data["env"]["device"] == "cpu"
        assert data["rows"], f"{name}: no rows"
        for row in data["rows"]:
            assert ROW[name] <= set(row), f"{name}: row lacks {ROW[name] - set(row)}"
            assert math.isfinite(row[TIME[name]]) and row[TIME[name]] > 0
        for target in data["targets"]:
            assert {"name", "goal", "measured", "met"} <= set(target)
    hetero = json.loads((tmp_path / "hetero_batch.json").read_text())["rows"]
    assert all(r["max_abs_diff"] is None or r["max_abs_diff"] < 1e-3 for r in hetero), \
        "one fused batch must give what one image at a time and the official peft path give"
    analyze = json.loads((tmp_path / "analyze.json").read_text())["rows"]
    assert all(r["max_abs_diff_weights"] < 1e-4 and (r["mask_pixels_equal"] or 1) > 0.9999 for r in analyze), \
        "batched analysis must give what one image per call gives"
    retrieval = json.loads((tmp_path / "retrieval.json").read_text())["rows"]
    assert all(r.get("same_result_256_queries", True) for r in retrieval), "search must equal exhaustive retrieval"
    assert {r["index"] for r in retrieval} == {"centroid", "kmeans:4"}
    prototypes = json.loads((tmp_path / "prototypes.json").read_text())["rows"]
    assert all(r["same_as_exhaustive"] is not False for r in prototypes), "search must find the exhaustive top-K"
    adaptation = json.loads((tmp_path / "adaptation.json").read_text())
    assert {t["name"] for t in adaptation["targets"]} >= {"fusion step tiny batch 1", "fusion step tiny batch 16"}


def test_cuda_timing_synchronises_before_and_after_each_run(monkeypatch):
    """On a GPU, kernels run asynchronously: every timed call must wait for queued work before the clock
    starts and for its own work before it stops. Checked here with a recording stand-in for the CUDA sync."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device))))
    cuda = torch.device("cuda")
    common.measure(lambda: events.append("run"), cuda, reps=2, warmup=1)
    assert events == ["run"] + [("sync", "cuda"), "run", ("sync", "cuda")] * 2
    events.clear()
    common.measure_interleaved({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, cuda, 1, 0)
    assert events == [("sync", "cuda"), "a", ("sync", "cuda"), ("sync", "cuda"), "b", ("sync", "cuda")]
    events.clear()
    common.measure(lambda: events.append("run"), torch.device("cpu"), reps=1, warmup=0)
    assert events == ["run"], "no CUDA calls on the CPU"
