"""Shared helpers of the benchmarks: argument parsing, timing (median after warm-up, CUDA-synchronised),
memory, tables, JSON output, and the models / random adapter libraries the benchmarks time.

Every benchmark script builds its rows as plain dicts, prints them with `table()` and, with `--json PATH`,
writes the same rows with `write_json()`.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # `python benchmarks/x.py` from anywhere imports the checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")   # random weights only; never reach a model hub

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from semla_lab.core.runtime import configure_threads, resolve_device  # noqa: E402

T_CLASSES = 19        # Cityscapes-like vocabulary size used by every segmentation timing
MODELS = {"tiny": "semla-tiny-clip (64 px)", "vitb16": "ViT-B-16 (224 px)"}


# ---- arguments and environment -------------------------------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:1 (default: semla_lab.core.runtime.resolve_device())")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test, < 1 min for all)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Threads from $SEMLA_THREADS (default 1), the device, a fixed seed, no autograd, quiet libraries."""
    configure_threads()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    logging.getLogger().setLevel(logging.ERROR)      # open_clip: "No pretrained weights loaded" (intended)
    warnings.filterwarnings("ignore", message=r"Adapter _fused was active")   # peft, after every delete
    return resolve_device(args.device)


def env_info(device: torch.device) -> dict:
    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "device": str(device), "platform": platform.platform(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---- timing ----------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall seconds (time.perf_counter) of each timed run, and the process CPU seconds
    (time.process_time) of the same runs. `median` (wall) is what the tables report; on a CPU with one
    torch thread the CPU time is the same work without the time other jobs' processes took the core."""
    runs: list[float]
    cpu_runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_runs)


def _timed_call(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def paired_ratio(a: Timing, b: Timing, cpu: bool = False) -> float:
    """Median over runs of a_i / b_i for two interleaved timings (wall, or CPU time with `cpu`): adjacent
    runs share the machine's load, so this is steadier than median(a) / median(b) on a busy machine."""
    xs, ys = (a.cpu_runs, b.cpu_runs) if cpu else (a.runs, b.runs)
    return statistics.median(x / max(y, 1e-12) for x, y in zip(xs, ys))


def paired_difference(a: Timing, b: Timing, cpu: bool = False) -> float:
    """Median over runs of a_i - b_i for two interleaved timings (wall, or CPU time with `cpu`)."""
    xs, ys = (a.cpu_runs, b.cpu_runs) if cpu else (a.runs, b.runs)
    return statistics.median(x - y for x, y in zip(xs, ys))


def measure(fn: Callable[[], object], device: torch.device, reps: int = 5, warmup: int = 1) -> Timing:
    """Times of `reps` calls of `fn()` after `warmup` untimed calls; CUDA work is synchronised before the
    clock starts and before it stops."""
    for _ in range(warmup):
        fn()
    runs = [_timed_call(fn, device) for _ in range(reps)]
    return Timing([w for w, _ in runs], [c for _, c in runs])


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, reps: int = 5,
                        warmup: int = 1) -> dict[str, Timing]:
    """Like `measure` for several functions whose ratio matters, run in turn (a, b, a, b, ...), so
    slow drifts of a shared machine's load hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            runs[name].append(_timed_call(fn, device))
    return {name: Timing([w for w, _ in r], [c for _, c in r]) for name, r in runs.items()}


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of `fn()` (torch.utils.flop_counter: matmuls, convolutions,
    attention; elementwise ops are not counted). Machine-independent: the ratio of two counts is the
    speed ratio a compute-bound device would reach."""
    from torch.utils.flop_counter import FlopCounterMode
    aten = torch.ops.aten
    matmul_ = lambda self_shape, a_shape, b_shape, out_shape=None, **_: 2 * math.prod(a_shape) * b_shape[-1]  # noqa: E731
    # torch counts addmm / baddbmm but not their in-place forms, which the fused layer uses
    counter = FlopCounterMode(display=False, custom_mapping={aten.addmm_: matmul_, aten.baddbmm_: matmul_})
    with counter:
        fn()
    return counter.get_total_flops()


@contextmanager
def quiet_stderr():
    """Silence C++-level stderr (torch.profiler's kineto prints start/stop lines) inside the block."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# ---- memory ----------------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakRSS:
    """Peak resident-memory growth of a `with` block, in bytes. On Linux the kernel's high-water mark is
    reset at entry (/proc/self/clear_refs = 5), so the number is this block's own peak minus the RSS at
    entry; elsewhere it falls back to the growth of ru_maxrss (0 when the block stays under an earlier peak)."""

    def __enter__(self) -> "PeakRSS":
        self.exact = True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.exact = False
        self.start = rss_bytes()
        self.start_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kb("VmHWM") if self.exact else None
        if hwm is not None:
            self.delta = max(0, hwm * 1024 - self.start)
        else:
            self.delta = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start_max)
        self.retained = rss_bytes() - self.start


# ---- formatting and output ------------------------------------------------------------------------

def fmt_s(seconds: float | None) -> str:
    """Seconds in a readable unit, 3 significant digits."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(seconds) >= scale or unit == "us":
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, Callable | None]], title: str = "") -> str:
    """A plain-text table: columns are (key, header, formatter or None for str())."""
    cells = [[(fmt or str)(r.get(key)) if r.get(key) is not None else "-" for key, _, fmt in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)  # noqa: E731
                                  for i, (v, w) in enumerate(zip(vals, widths)))
    out = [title, "=" * len(title)] if title else []
    out += [line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells]
    return "\n".join(out)


def target_lines(targets: Sequence[dict]) -> str:
    return "\n".join(f"TARGET {t['name']}: {t['goal']}; measured {t['measured']} -> "
                     f"{'MET' if t['met'] else 'MISSED'}" for t in targets)


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")


def payload(name: str, device: torch.device, quick: bool, rows: list[dict], targets: list[dict] | None = None,
            **extra) -> dict:
    """The JSON every benchmark writes: keys benchmark, env, quick, rows, targets (+ extras)."""
    return {"benchmark": name, "env": env_info(device), "quick": quick, "rows": rows,
            "targets": targets or [], **extra}


# ---- models and adapters --------------------------------------------------------------------------

def tiny_clip(device: torch.device):
    """The separate tiny CLIP used as the embedding model (random weights, 64 px, D = 64)."""
    from semla_lab.models.clip import load_clip
    torch.manual_seed(0)
    return load_clip(pretrained="random", device=device)


def clip_model(kind: str):
    """An open_clip CLIP model with random weights: "tiny" (semla-tiny-clip) or "vitb16" (ViT-B-16)."""
    import open_clip
    from semla_lab.models.clip import load_clip
    torch.manual_seed(0)
    if kind == "tiny":
        return load_clip(pretrained="random", device="cpu").model
    if kind == "vitb16":
        return open_clip.create_model("ViT-B-16", pretrained=None)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {list(MODELS)}")


_CACHE: dict = {}   # run_all runs every benchmark in one process: build each model / library once


def segmenter(kind: str, device: torch.device):
    """(segmenter in eval mode on `device`, input image size, text embedding dim); built once per process."""
    from semla_lab.models.segmenter import build_segmenter
    key = ("segmenter", kind, str(device))
    if key not in _CACHE:
        model = clip_model(kind)
        seg = build_segmenter(model).eval().to(device)
        _CACHE[key] = (seg, seg.image_size, int(model.visual.output_dim))
    return _CACHE[key]


def inputs(batch: int, size: int, dim: int, device: torch.device, seed: int = 0):
    """Random images (B, 3, size, size) in [0, 1] and L2-normalised text (T_CLASSES, dim)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    text = F.normalize(torch.randn(T_CLASSES, dim, generator=g), dim=-1)
    return images.to(device), text.to(device)


@dataclass
class RandomLibrary:
    """`n` random LoRA adapters (r=8, alpha=16 on LORA_TARGETS) for one segmenter, in two forms:
    a peft model carrying all of them (the official path) and a FusedAdapters model (SemLA's path)."""
    names: list[str]
    peft_model: object
    fused_model: torch.nn.Module
    fused: object
    centroids: torch.Tensor      # (n, 64): random unit vectors in the tiny CLIP's embedding space


def random_library(seg: torch.nn.Module, n: int, device: torch.device, r: int = 8, alpha: int = 16,
                   centroid_dim: int = 64, seed: int = 0) -> RandomLibrary:
    """Built once per (segmenter, n, ...) and process; the benchmarks leave it as they found it (peft's
    temporary "_fused" adapter is deleted after each use, a fused selection ends with its `with` block)."""
    key = ("library", id(seg), n, str(device), r, alpha, centroid_dim, seed)
    if key not in _CACHE:
        _CACHE[key] = _random_library(seg, n, device, r, alpha, centroid_dim, seed)
    return _CACHE[key]


def _random_library(seg, n, device, r, alpha, centroid_dim, seed) -> RandomLibrary:
    from peft import LoraConfig, get_peft_model
    from semla_lab.core.fusion import FusedAdapters
    from semla_lab.models.segmenter import LORA_TARGETS
    torch.manual_seed(seed)
    names = [f"domain{i:02d}" for i in range(n)]
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(seg).cpu(), cfg, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, cfg)
    for pname, p in peft_model.named_parameters():
        if "lora_B" in pname:
            p.data.normal_(0, 0.02)      # non-zero deltas, as trained adapters have
    peft_model = peft_model.to(device).eval()
    peft_model.base_model.disable_adapter_layers()
    # every adapter's LoRA tensors in one pass (get_peft_model_state_dict walks the model once per adapter):
    # "<path>.lora_A.<adapter>.weight" -> states[adapter]["<path>.lora_A.weight"], the key form peft saves
    states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for key, value in peft_model.state_dict().items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.([^.]+)\.weight", key)
        if m and m.group(3) in states:
            states[m.group(3)][f"{m.group(1)}.lora_{m.group(2)}.weight"] = value.detach().cpu()
    fused_model = copy.deepcopy(seg).to(device).eval()
    fused = FusedAdapters(fused_model, {name: (states[name], alpha / r) for name in names})
    centroids = F.normalize(torch.randn(n, centroid_dim), dim=-1)
    return RandomLibrary(names, peft_model, fused_model, fused, centroids)


def peft_merge_only(peft_model, names: list[str], weights: list[float]) -> None:
    """The official path's adapter bookkeeping without the forward: add_weighted_adapter(cat) + set +
    enable, then delete + disable (what `peft_weighted_forward` does around the model call)."""
    peft_model.add_weighted_adapter(names, weights, "_fused", combination_type="cat")
    peft_model.set_adapter("_fused")
    peft_model.base_model.enable_adapter_layers()
    peft_model.delete_adapter("_fused")
    peft_model.base_model.disable_adapter_layers()
