"""Where jobs run: one after the other in this process, or as Ray tasks on a local or remote cluster.

A job is a plain function of one item (train one adapter, evaluate one target); the serial loop and
the Ray path call the same function, Ray only wraps it (`ray.remote(...).options(max_retries=...)`)
and `ray.wait` hands results back as they complete:

    with Engine(ray=True, num_cpus=2) as engine:          # Engine() runs serially, without Ray
        for item, result in engine.map(train_one, domains, gpus=1.0 if cuda else 0.0):
            commit(item, result)                           # the driver is the single writer

- `Engine(ray=True)` with no address (and no $RAY_ADDRESS) starts a local cluster for the command, with
  `num_cpus` CPUs (default: all), no dashboard and usage stats off, and shuts it down on exit.
  `address="auto"`, `address="ray://host:10001"` or $RAY_ADDRESS joins a running cluster, which is only
  disconnected from on exit. A Ray session already open in this process (a test's) is reused, not
  shut down.
- Each task takes one CPU and `gpus` GPUs (Ray then sets CUDA_VISIBLE_DEVICES: use device "cuda" in
  the job, not "cuda:N"). It runs with the driver's torch thread count, so its numbers are those of
  the serial run. A task whose worker dies (killed, out of memory) is rerun up to `retries` times;
  an exception raised by the job is not retried and reaches the caller as itself.
- Jobs must be picklable (module-level functions or functools.partial of them) and should take and
  return small values (paths, configs, seeds), writing large results to files. A large input that every
  job reads (the replayed source images) is `map(..., shared=value)`: the job is called `fn(item, value)`,
  and Ray puts the value in its object store once instead of every worker rebuilding it.
- `Engine(preload=("package.module",))` imports those modules in every Ray worker of the command as it
  starts (Ray's worker_process_setup_hook), while the driver loads its own models and data, instead of
  in each worker's first task; it applies when the Engine opens the Ray session itself.
Ray is the optional extra `pip install 'semla_lab[cluster]'`; without it `Engine(ray=True)` is a
UsageError saying so.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from .errors import UsageError
from .runtime import configure_threads

Item = TypeVar("Item")
Result = TypeVar("Result")
INSTALL = "pip install 'semla_lab[cluster]'"
PRELOAD_VAR = "SEMLA_RAY_PRELOAD"


def import_ray():
    """The ray module, or a UsageError naming the install command."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray, which is not installed; install it with `{INSTALL}`") from None
    return ray


def preload_modules() -> None:
    """Ray worker setup hook: import the modules named (comma-separated) in $SEMLA_RAY_PRELOAD."""
    for name in filter(None, os.environ.get(PRELOAD_VAR, "").split(",")):
        importlib.import_module(name)


def _run_job(fn: Callable, item, threads: int, *shared):
    """The body of every Ray task: the driver's torch thread count, then the job."""
    configure_threads(threads)
    return fn(item, *shared)


class Engine:
    """Runs `fn(item)` jobs serially (default) or as Ray tasks; use it as a context manager."""

    def __init__(self, ray: bool = False, address: str | None = None, num_cpus: int | None = None,
                 preload: tuple[str, ...] = ()):
        self.ray = bool(ray or address)
        self.address = address or (os.environ.get("RAY_ADDRESS") if self.ray else None)
        self.num_cpus = num_cpus
        self.preload = tuple(preload)
        self._ray = None
        self._owns_session = False

    def __enter__(self) -> "Engine":
        if not self.ray:
            return self
        ray = import_ray()
        if not ray.is_initialized():
            env = {"env_vars": {PRELOAD_VAR: ",".join(self.preload)},
                   "worker_process_setup_hook": f"{__name__}.preload_modules"} if self.preload else None
            if self.address:
                ray.init(address=self.address, logging_level="WARNING", runtime_env=env)
            else:
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, logging_level="WARNING", runtime_env=env)
            self._owns_session = True
        self._ray = ray
        return self

    def __exit__(self, *exc) -> None:
        if self._owns_session:
            self._ray.shutdown()
        self._ray, self._owns_session = None, False

    def __repr__(self) -> str:
        where = f"ray at {self.address}" if self.address else "ray, local cluster" if self.ray else "serial"
        return f"Engine({where})"

    def map(self, fn: Callable[..., Result], items: Iterable[Item], *, gpus: float = 0.0, retries: int = 3,
            ordered: bool = False, shared=None) -> Iterator[tuple[Item, Result]]:
        """(item, fn(item)) for every item, or (item, fn(item, shared)) when `shared` is given: serially in
        input order, or on Ray as tasks complete (in input order with `ordered`). All tasks are submitted
        at once; Ray schedules them."""
        items = list(items)
        extra = () if shared is None else (shared,)
        if not self.ray:
            for item in items:
                yield item, fn(item, *extra)
            return
        if self._ray is None:
            raise UsageError("Engine(ray=True).map runs inside `with Engine(...) as engine:`")
        ray = self._ray
        task = ray.remote(_run_job).options(num_cpus=1, num_gpus=gpus, max_retries=retries, retry_exceptions=False)
        threads = torch.get_num_threads()
        stored = tuple(ray.put(value) for value in extra)          # once; tasks receive the value itself
        refs = {task.remote(fn, item, threads, *stored): item for item in items}
        pending = list(refs)
        while pending:
            if ordered:
                done, pending = pending[:1], pending[1:]
            else:
                done, pending = ray.wait(pending, num_returns=1)
            yield refs[done[0]], self._get(done[0])

    def _get(self, ref):
        """ray.get, with a job's own exception raised as itself (not wrapped in RayTaskError)."""
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, Exception):
                raise e.cause from None
            raise
