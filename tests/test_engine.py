"""engine.Engine: the serial and Ray paths give the same results (also with a shared input); a Ray task
whose worker dies is rerun; a job's own error reaches the caller as itself; preloaded modules are
imported as workers start; without Ray, --ray says how to install it. An Engine's own cluster listens on
loopback only, ignores a stray cluster file and leaves the environment as it was; an Engine joins a cluster
that `ray start` put on loopback; a task reserves the CPUs it uses; tasks a caller no longer waits for are
cancelled."""
from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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


def assigned_cpus(item: int) -> tuple[float, int]:
    """The CPUs Ray reserved for the task running this, and the torch threads it runs with."""
    import ray
    return ray.get_runtime_context().get_assigned_resources().get("CPU"), torch.get_num_threads()


def waits_for(go: Path, item: int) -> int:
    """Item 0 returns at once; the others wait until `go` exists."""
    while item and not go.exists():
        time.sleep(0.05)
    return item


def short_temp_dir() -> Path:
    """A folder of our own for Ray's files (RAY_TMPDIR), short enough for its socket paths (107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))


def listening_addresses() -> set[str]:
    """The addresses the TCP sockets of this process's children (a local Ray cluster) listen on."""
    import psutil
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            found |= {c.laddr.ip for c in child.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return found


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
    for name in ("RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE", "PYTHONBREAKPOINT"):   # what ray.init sets
        monkeypatch.delenv(name, raising=False)
    tmp = short_temp_dir()
    (tmp / "ray").mkdir()
    (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")   # left by a `ray start` whose processes died
    monkeypatch.setenv("RAY_TMPDIR", str(tmp))
    before = dict(os.environ)
    try:
        with Engine(ray=True, num_cpus=2, preload=("wave",)) as engine:
            assert dict(os.environ) == before, "the variables Ray set as it started have their values back"
            assert ray.cluster_resources()["CPU"] == 2
            assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
            listening = listening_addresses()
            assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
            assert dict(engine.map(seeded_sum, [5])) == dict(Engine().map(seeded_sum, [5]))
            assert dict(engine.map(imported, ["wave"])) == {"wave": True}, "preloaded as the worker started"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert not ray.is_initialized(), "runs before the module's ray_session fixture starts a cluster"
    assert dict(os.environ) == before


JOINS = """
import sys
import ray
from semla_lab.core.engine import Engine
from semla_lab.core.runtime import configure_threads
configure_threads(1)          # as the semla-lab command does: each task then reserves one CPU
with Engine(address=sys.argv[1]) as engine:
    print(ray.cluster_resources()["CPU"], dict(engine.map(abs, [-3])))
"""


def test_an_engine_joins_a_cluster_that_ray_start_put_on_loopback():
    """`ray start --head --node-ip-address 127.0.0.1` (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from
    rewriting loopback to the network address), then Engine(address="127.0.0.1:PORT"). Only the processes
    of that cluster (found by its own temp folder) are stopped at the end. The driver is a new process, as a
    user's command is: Ray reads RAY_AUTH_MODE as it is imported."""
    import psutil
    importable_ray()
    tmp = short_temp_dir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    head = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--node-ip-address", "127.0.0.1",
            "--port", str(port), "--num-cpus", "1", "--num-gpus", "0", "--include-dashboard", "false"]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=180)
        driver = subprocess.run([sys.executable, "-c", JOINS, f"127.0.0.1:{port}"], capture_output=True, text=True,
                                timeout=300, env={**os.environ, "RAY_AUTH_MODE": "token",   # a head's default
                                                  "PYTHONPATH": str(Path(__file__).parents[1])})
        assert driver.returncode == 0 and driver.stdout.split() == ["1.0", "{-3:", "3}"], driver.stderr[-3000:]
    finally:
        ours = [p for p in psutil.process_iter(["cmdline"]) if str(tmp) in " ".join(p.info["cmdline"] or [])]
        for p in ours:
            p.terminate()
        psutil.wait_procs(ours, timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


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


def test_a_task_reserves_as_many_cpus_as_the_threads_it_runs(ray_session):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with Engine(ray=True) as engine:
            assert dict(engine.map(assigned_cpus, [0])) == {0: (2.0, 2)}
            torch.set_num_threads(3)
            with pytest.raises(UsageError, match="no node of the cluster has more than 2; lower --threads"):
                list(engine.map(assigned_cpus, [0]))
    finally:
        torch.set_num_threads(threads)


def test_tasks_pending_when_the_caller_stops_reading_are_cancelled(ray_session, tmp_path):
    """Tasks 1-3 wait for a file that never comes; once the caller stops after the first result, both CPUs
    are free again (a task that needs both runs), which they would never be without the cancel."""
    go = tmp_path / "go"
    try:
        with Engine(ray=True) as engine:
            results = engine.map(functools.partial(waits_for, go), [0, 1, 2, 3], ordered=True)
            assert next(results)[0] == 0
            results.close()
            both_cpus = ray_session.remote(lambda: "ran").options(num_cpus=2)
            assert ray_session.get(both_cpus.remote(), timeout=120) == "ran"
    finally:
        go.touch()                                          # lets uncancelled tasks end


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
