"""Where jobs run: one after the other in this process, or as Ray tasks on a local or remote cluster.

A job is a plain function of one item (train one adapter, evaluate one target); the serial loop and
the Ray path call the same function, Ray only wraps it (`ray.remote(...).options(max_retries=...)`)
and `ray.wait` hands results back as they complete:

    with Engine(ray=True, num_cpus=2) as engine:          # Engine() runs serially, without Ray
        for item, result in engine.map(train_one, domains, gpus=1.0 if cuda else 0.0):
            commit(item, result)                           # the driver is the single writer

- `Engine(ray=True)` with no address (and no $RAY_ADDRESS) starts a local cluster of its own for the command
  (Ray's `address="local"`: a cluster file left by an earlier `ray start` is ignored), with `num_cpus` CPUs
  (default: all), no dashboard and usage stats off, listening on 127.0.0.1 only (an unauthenticated port on
  the network runs anyone's code), and shuts it down on exit.
- `address=...` or $RAY_ADDRESS joins a running cluster, which is only disconnected from on exit:
  `"auto"` is the cluster `ray start` last started on this machine (with its token); `"host:port"` the
  address `ray start --head` printed, with RAY_AUTH_MODE=token (and the cluster's token in ~/.ray/auth_token
  or $RAY_AUTH_TOKEN) when the cluster uses token authentication, Ray's default. A head started on loopback
  (`ray start --head --node-ip-address 127.0.0.1`) is joined at `127.0.0.1:port`; Ray itself would rewrite
  that address to the machine's network address, where such a head does not listen.
  A Ray session already open in this process (a test's) is reused, not shut down.
- Environment variables Ray sets as a session starts (RAY_USAGE_STATS_ENABLED, RAY_AUTH_MODE,
  PYTHONBREAKPOINT) get their values back once it has started.
- Each task reserves as many CPUs as the driver's torch thread count, which it runs with (so its numbers are
  those of the serial run), and `gpus` GPUs (Ray then sets CUDA_VISIBLE_DEVICES: use device "cuda" in the
  job, not "cuda:N"). A task whose worker dies (killed, out of memory) is rerun up to `retries` times;
  an exception raised by the job is not retried and reaches the caller as itself. Tasks not yet finished
  when the caller stops reading results (a break, an error) are cancelled.
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
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from .errors import UsageError
from .runtime import configure_threads, scoped_env

Item = TypeVar("Item")
Result = TypeVar("Result")
INSTALL = "pip install 'semla_lab[cluster]'"
PRELOAD_VAR = "SEMLA_RAY_PRELOAD"
LOOPBACK = "127.0.0.1"
RAY_SETS = ("RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE", "PYTHONBREAKPOINT")   # what ray.init writes into os.environ


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


def on_loopback(address: str | None) -> bool:
    """Whether a Ray address (host:port) names this machine's loopback interface."""
    host = (address or "").removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


@contextmanager
def kept_on_loopback(ray) -> Iterator[None]:
    """While a Ray session on this machine starts or joins: keep a loopback node address as it is. Ray on
    Linux replaces 127.0.0.1 by the machine's network address unless its multi-machine mode is off
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by ray as it is imported and by the processes it starts)."""
    constants = ray._private.ray_constants
    saved = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        with scoped_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"):
            yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved


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
            kept = {name: os.environ.get(name) for name in RAY_SETS}
            if self.address:
                with scoped_env(**kept), kept_on_loopback(ray) if on_loopback(self.address) else nullcontext():
                    ray.init(address=self.address, logging_level="WARNING", runtime_env=env)
            else:
                with scoped_env(**{**kept, "RAY_USAGE_STATS_ENABLED": kept["RAY_USAGE_STATS_ENABLED"] or "0"}), \
                        kept_on_loopback(ray):
                    ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False,
                             _node_ip_address=LOOPBACK, logging_level="WARNING", runtime_env=env)
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
        at once; Ray schedules them; those still pending when the caller stops reading are cancelled."""
        items = list(items)
        extra = () if shared is None else (shared,)
        if not self.ray:
            for item in items:
                yield item, fn(item, *extra)
            return
        if self._ray is None:
            raise UsageError("Engine(ray=True).map runs inside `with Engine(...) as engine:`")
        ray = self._ray
        threads = torch.get_num_threads()
        largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
        if threads > largest:
            raise UsageError(f"each Ray task reserves as many CPUs as the {threads} torch threads it runs with, but "
                             f"no node of the cluster has more than {largest:g}; lower --threads or SEMLA_THREADS")
        task = ray.remote(_run_job).options(num_cpus=threads, num_gpus=gpus, max_retries=retries,
                                            retry_exceptions=False)
        stored = tuple(ray.put(value) for value in extra)          # once; tasks receive the value itself
        refs = {task.remote(fn, item, threads, *stored): item for item in items}
        pending = list(refs)
        try:
            while pending:
                if ordered:
                    done, pending = pending[:1], pending[1:]
                else:
                    done, pending = ray.wait(pending, num_returns=1)
                yield refs[done[0]], self._get(done[0])
        finally:
            for ref in pending:
                ray.cancel(ref)

    def _get(self, ref):
        """ray.get, with a job's own exception raised as itself (not wrapped in RayTaskError)."""
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, Exception):
                raise e.cause from None
            raise
