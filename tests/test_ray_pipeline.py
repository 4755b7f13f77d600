"""Library builds on a local Ray cluster (2 CPUs, no dashboard, usage stats off, shut down at the end):
the Ray build equals the serial one byte for byte, a task whose worker dies is retried and the library
ends complete, a driver killed mid-build leaves a library that a rerun completes, and a driver without a
GPU sends GPU jobs to Ray."""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from semla_lab.workflows import pipeline
from semla_lab.core.engine import Engine
from semla_lab.library.index import AdapterLibrary
from semla_lab.training.train import AdapterConfig

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

DOMAINS = ["cityscapes", "nyu", "acdc_fog", "ade"]
RECIPE = AdapterConfig(steps=2, batch=4, replay=4)
BUILD = dict(max_images=8, progress=False)


def library_bytes(root: Path) -> dict[str, bytes]:
    """Every adapter file and the current centroids file of a library, by relative path."""
    lib = AdapterLibrary(root)
    files = {f"{n}/{p.name}": p.read_bytes() for n in lib.names() for p in sorted(lib.adapter_path(n).iterdir())}
    centroids = sorted(root.glob("centroids-*.safetensors"))[-1]
    return {**files, "centroids": centroids.read_bytes()}


def dies_once(marker: Path, job, item, *shared):
    """Run `job(item, *shared)`, but kill the worker process the first time any task gets here."""
    if not marker.exists():
        marker.touch()
        os._exit(1)
    return job(item, *shared)


class DyingOnce(Engine):
    """An Engine whose first task kills its own worker once (Ray must retry it)."""
    marker: Path

    def map(self, fn, items, **kwargs):
        return super().map(functools.partial(dies_once, self.marker, fn), items, **kwargs)


@pytest.fixture(scope="module")
def ray_session():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import test modules
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def serial_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "library"
    pipeline.add_domains(DOMAINS, out, pipeline.Models(), RECIPE, **BUILD)
    return out


def test_ray_build_is_byte_identical_to_the_serial_build(ray_session, serial_build, tmp_path):
    out = tmp_path / "library"
    with Engine(ray=True) as engine:
        built = pipeline.add_domains(DOMAINS, out, pipeline.Models(), RECIPE, engine, **BUILD)
    assert list(built["added"]) == DOMAINS and AdapterLibrary(out).names() == DOMAINS
    assert library_bytes(out) == library_bytes(serial_build)


def test_a_task_that_kills_its_worker_is_retried_and_the_library_completes(ray_session, serial_build, tmp_path):
    out = tmp_path / "library"
    with DyingOnce(ray=True) as engine:
        engine.marker = tmp_path / "died"
        pipeline.add_domains(DOMAINS[:2], out, pipeline.Models(), RECIPE, engine, **BUILD)
    assert engine.marker.exists(), "no worker died: the test proves nothing"
    assert AdapterLibrary(out).names() == DOMAINS[:2]
    assert library_bytes(out).keys() <= library_bytes(serial_build).keys()
    assert not list(tmp_path.glob(".library.staging-*")), "the staging folder is removed"


STOPPED_DRIVER = """
import sys, threading
from pathlib import Path
from semla_lab.cli import main
from semla_lab.workflows import pipeline

committed, real_commit = Path(sys.argv[1]), pipeline.commit_staged


def commit_staged(library, staged):
    real_commit(library, staged)
    committed.touch()
    threading.Event().wait()            # after the first commit: wait here to be killed


pipeline.commit_staged = commit_staged
sys.exit(main(sys.argv[2:]))
"""


def test_a_driver_killed_mid_build_leaves_a_library_that_a_rerun_completes(ray_session, serial_build, tmp_path):
    """The driver stops after its first commit until it is SIGKILLed there, so the kill always lands
    mid-build, whatever the machine's load."""
    out, committed = tmp_path / "library", tmp_path / "committed"
    address = ray.get_runtime_context().gcs_address
    argv = ["build-library", "--out", str(out), "--domains", *DOMAINS, "--steps", "2", "--max-images", "8",
            "--quiet", "--ray-address", address, "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(pipeline.__file__).parents[2])}
    env.pop("SEMLA_ASSETS", None)
    driver = subprocess.Popen([sys.executable, "-c", STOPPED_DRIVER, str(committed), *argv], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not committed.exists():
            assert driver.poll() is None and time.time() < deadline, driver.stderr.read() if driver.poll() else "slow"
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait()
    assert AdapterLibrary(out).names() == DOMAINS[:1]          # opens: what was committed, complete
    with Engine(ray=True) as engine:
        rerun = pipeline.add_domains(DOMAINS, out, pipeline.Models(), AdapterConfig(steps=2), engine, **BUILD)
    assert rerun["skipped"] == DOMAINS[:1] and AdapterLibrary(out).names() == DOMAINS


class Recording(Engine):
    """A Ray engine that records what each job asks for instead of running it."""
    asked: list

    def map(self, fn, items, **kwargs):
        self.asked = [(item.models.device, kwargs["gpus"]) for item in items]
        return iter(())


def test_a_driver_without_a_gpu_sends_gpu_jobs_to_ray(tmp_path, monkeypatch):
    """On Ray the GPU is the workers' business: a driver with no CUDA loads on the CPU and asks Ray for one GPU
    per job, which then runs on "cuda" (the driver used to resolve CUDA itself and fail)."""
    monkeypatch.setattr(pipeline.torch.cuda, "is_available", lambda: False)
    engine = Recording(ray=True)
    pipeline.add_domains(["nyu", "ade"], tmp_path / "library", pipeline.Models(device="cuda"), RECIPE, engine, **BUILD)
    assert engine.asked == [("cuda", 1.0), ("cuda", 1.0)]


def test_ray_leave_one_out_equals_serial(ray_session, serial_build):
    from semla_lab.evaluation.config import EvalConfig
    models = pipeline.Models(library=str(serial_build))
    cfg = EvalConfig(k=2, max_images=4)
    serial = pipeline.evaluate(DOMAINS[:3], models, cfg=cfg, progress=False)
    with Engine(ray=True) as engine:
        remote = pipeline.evaluate(DOMAINS[:3], models, cfg=cfg, engine=engine, progress=False)
    assert remote["results"] == serial["results"] and remote["bootstrap"] == serial["bootstrap"]
