"""engine.Engine: the serial and Ray paths give the same results (also with a shared input); a Ray task
whose worker dies is rerun; a job's own error reaches the caller as itself; preloaded modules are
imported as workers start; without Ray, --ray says how to install it."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

from semla_lab.core.engine import INSTALL, Engine
from semla_lab.core.errors import UsageError


def seeded_sum(seed: int) -> tuple[float, int]:
    """A small torch computation and the thread count it ran with."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 64, generator=gen)
    return float((x @ x).sum()), torch.get_num_threads()


def dies_once(marker: Path, item: int) -> int:
    """Kills its own worker process the first time it runs (no marker yet), then returns 10 * item."""
    if item == 1 and not marker.exists():
        marker.touch()
        os._exit(1)
    return 10 * item


def shifted(item: int, shared: torch.Tensor) -> list[int]:
    return (shared + item).tolist()


def imported(name: str) -> bool:
    """Whether the process running this has already imported module `name`."""
    return name in sys.modules


def refuses(item: int) -> int:
    raise UsageError(f"item {item} is not allowed")


def importable_ray():
    """ray, with this module's jobs pickled by value (Ray workers cannot import test modules)."""
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray


# First in the file: the ray_session fixture below keeps a cluster open for the tests after it.
def test_an_engine_starts_and_stops_its_own_local_cluster(monkeypatch):
    ray = importable_ray()
    assert not ray.is_initialized(), "runs before the module's ray_session fixture starts a cluster"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with Engine(ray=True, num_cpus=2, preload=("wave",)) as engine:
        assert ray.cluster_resources()["CPU"] == 2
        assert dict(engine.map(seeded_sum, [5])) == dict(Engine().map(seeded_sum, [5]))
        assert dict(engine.map(imported, ["wave"])) == {"wave": True}, "preloaded as the worker started"
    assert not ray.is_initialized(), "runs before the module's ray_session fixture starts a cluster"


@pytest.fixture(scope="module")
def ray_session():
    """A local 2-CPU Ray cluster for this module, shut down at its end."""
    ray = importable_ray()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_serial_runs_in_order_without_ray():
    with Engine() as engine:
        assert [item for item, _ in engine.map(seeded_sum, [3, 1, 2])] == [3, 1, 2]
        assert repr(engine) == "Engine(serial)"


def test_ray_results_equal_serial_with_the_driver_thread_count(ray_session):
    serial = dict(Engine().map(seeded_sum, range(4)))
    with Engine(ray=True) as engine:
        remote = dict(engine.map(seeded_sum, range(4)))
        assert [i for i, _ in engine.map(seeded_sum, range(4), ordered=True)] == [0, 1, 2, 3]
    assert remote == serial
    assert {threads for _, threads in remote.values()} == {torch.get_num_threads()}
    assert ray_session.is_initialized(), "an Engine must not shut down a session it did not start"


def test_workers_import_only_what_they_need_without_preload(ray_session):
    with Engine(ray=True) as engine:
        assert dict(engine.map(imported, ["wave"])) == {"wave": False}


def test_a_shared_value_reaches_every_job_as_in_the_serial_run(ray_session):
    shared = torch.arange(3)
    serial = dict(Engine().map(shifted, [0, 10], shared=shared))
    with Engine(ray=True) as engine:
        assert dict(engine.map(shifted, [0, 10], shared=shared)) == serial == {0: [0, 1, 2], 10: [10, 11, 12]}


def test_a_task_whose_worker_dies_is_retried(ray_session, tmp_path):
    marker = tmp_path / "died"
    with Engine(ray=True) as engine:
        results = dict(engine.map(functools.partial(dies_once, marker), [0, 1, 2], retries=2))
    assert marker.exists(), "the task never killed its worker: the test proves nothing"
    assert results == {0: 0, 1: 10, 2: 20}


def test_a_jobs_own_error_is_raised_as_itself(ray_session):
    with Engine(ray=True) as engine, pytest.raises(UsageError, match="item 0 is not allowed"):
        list(engine.map(refuses, [0]))


def test_map_outside_the_context_is_a_usage_error():
    with pytest.raises(UsageError, match="inside `with Engine"):
        list(Engine(ray=True).map(seeded_sum, [0]))


def test_without_ray_the_error_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)      # import ray -> ImportError
    with pytest.raises(UsageError, match=r"semla_lab\[cluster\]"):
        Engine(ray=True).__enter__()
    assert "semla_lab[cluster]" in INSTALL
