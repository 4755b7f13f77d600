"""Library builds on a local Ray cluster (2 CPUs, no dashboard, usage stats off, shut down at the end):
the Ray build equals the serial one byte for byte, a task whose worker dies is retried and the library
ends complete, and a driver killed mid-build leaves a library that a rerun completes."""
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


def test_a_driver_killed_mid_build_leaves_a_library_that_a_rerun_completes(ray_session, serial_build, tmp_path):
    """Twelve domains on two CPUs commit in six rounds, so the kill that follows the first commit lands mid-build
    even when the test process is slow to notice it (with four, a burst of commits once finished the build; with
    eight, on a machine loaded by another build, all four rounds did)."""
    domains = DOMAINS + ["bdd", "idd", "mapillary", "acdc_night", "acdc_rain", "acdc_snow", "coconut", "pascal_context"]
    out = tmp_path / "library"
    address = ray.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "semla_lab.cli", "build-library", "--out", str(out), "--domains", *domains,
            "--steps", "2", "--max-images", "8", "--quiet", "--ray-address", address, "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(pipeline.__file__).parents[1])}
    env.pop("SEMLA_ASSETS", None)
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            if (out / "index.json").is_file() and len(AdapterLibrary(out)) >= 1:
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the driver finished before it could be killed"
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait()
    committed = AdapterLibrary(out).names()          # opens: whatever was committed, complete
    assert 1 <= len(committed) < len(domains) and committed == domains[:len(committed)]
    with Engine(ray=True) as engine:
        rerun = pipeline.add_domains(domains, out, pipeline.Models(), AdapterConfig(steps=2), engine, **BUILD)
    assert rerun["skipped"] == committed and AdapterLibrary(out).names() == domains


def test_ray_leave_one_out_equals_serial(ray_session, serial_build):
    from semla_lab.evaluation.config import EvalConfig
    models = pipeline.Models(library=str(serial_build))
    cfg = EvalConfig(k=2, max_images=4)
    serial = pipeline.evaluate(DOMAINS[:3], models, cfg=cfg, progress=False)
    with Engine(ray=True) as engine:
        remote = pipeline.evaluate(DOMAINS[:3], models, cfg=cfg, engine=engine, progress=False)
    assert remote["results"] == serial["results"] and remote["bootstrap"] == serial["bootstrap"]
