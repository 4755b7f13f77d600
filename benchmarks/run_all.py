"""Run every benchmark, print each table, and with --json-dir write <dir>/<name>.json per benchmark.

    python benchmarks/run_all.py                      # full run (CPU: ~5 min on 2 cores)
    python benchmarks/run_all.py --quick              # smoke run (< 1 min)
    python benchmarks/run_all.py --device cuda --json-dir benchmarks/results

The benchmarks run in this one process (torch, open_clip and peft take ~10 s to import on a busy 2-core
machine; paying that once keeps --quick under a minute). Each script also runs on its own.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("adaptation", "hetero_batch", "embedding", "retrieval", "ray")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="passed to every benchmark (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    p.add_argument("--json-dir", type=Path, default=None,
                   help="write <dir>/<name>.json for each benchmark (e.g. benchmarks/results)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="run these only")
    args = p.parse_args(argv)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    failed, started = [], time.perf_counter()
    for name in args.only:
        bench_argv = (["--quick"] if args.quick else []) + (["--device", args.device] if args.device else [])
        if args.json_dir is not None:
            bench_argv += ["--json", str(args.json_dir / f"{name}.json")]
        print(f"\n######## {name} ({' '.join(bench_argv) or 'full run'}) ########\n", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(f"bench_{name}").main(bench_argv)
        except Exception:          # report, run the others, fail at the end
            traceback.print_exc()
            failed.append(name)
        print(f"\n[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    print(f"\nall benchmarks: {time.perf_counter() - started:.0f} s" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
