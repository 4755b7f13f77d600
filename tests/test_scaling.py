"""The library-scaling study (`semla-lab scale`, scaling.py) on a tiny schedule: nested ordinary libraries,
reuse on rerun, the Ray path giving the serial numbers, and clear errors."""
import json
import shutil

import pytest

from semla_lab.cli import main
from semla_lab.core.engine import Engine
from semla_lab.core.errors import UsageError
from semla_lab.evaluation.config import EvalConfig
from semla_lab.library.index import WEIGHTS, AdapterLibrary
from semla_lab.workflows.scaling import ScaleConfig, curve_summary, run_scale, scaling_table
from semla_lab.training.train import AdapterConfig

TARGETS = ["data_manifests/heldout/office_night.yaml", "data_manifests/heldout/park_snow_dusk.yaml"]
TINY = ["--sizes", "2,3", "--orders", "2", "--k", "2", "--max-images", "4", "--query-images", "4", "--steps", "2",
        "--quiet", "--targets", *TARGETS]


def scale(capsys, out, *extra):
    code = main(["scale", "--out", str(out), *TINY, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def adapter_mtimes(root):
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted(root.rglob(WEIGHTS))}


def test_scale_builds_nested_ordinary_libraries_and_reuses_them_on_rerun(capsys, tmp_path):
    out = tmp_path / "study"
    code, text, err = scale(capsys, out)
    assert code == 0, err
    payload = json.loads((out / "scaling.json").read_text())
    assert payload["timing"]["adapters_trained"] == 3 + 2 and payload["timing"]["evaluations_run"] == 4 + 1
    assert (out / "scaling.png").stat().st_size > 10_000 and "5 adapters trained, 5 evaluations" in text
    orders = payload["orders"]
    assert set(orders) == {"random-0", "random-1", "active"}
    pool = AdapterLibrary(out / "pool-library")
    assert sorted(pool.names()) == sorted(orders["active"]) == sorted(p.stem for p in (out / "pool").glob("pool*.yaml"))
    for order, names in orders.items():                      # nested: the size-2 library is the order's first two
        small = AdapterLibrary(out / "libraries" / f"{order}-002")
        assert small.names() == names[:2]
        assert all(small.get(n).centroid.equal(pool.get(n).centroid) for n in names[:2])
    assert sorted(AdapterLibrary(out / "libraries" / "full-003").names()) == sorted(pool.names())
    table = scaling_table(payload)
    assert set(table.method) == {"zero_shot", "uniform", "semla"} and set(table["size"]) == {2, 3}
    assert table[table.method == "zero_shot"].hmean.nunique() == 1, "zero-shot does not depend on the library"
    summary = curve_summary(table)
    assert summary.loc[("semla", 2), "random count"] == 2 and "active" in summary
    assert payload["oracle"]["per_domain"].keys() == payload["targets"].keys()

    # an ordinary library: `semla-lab evaluate` opens it
    code = main(["evaluate", "--library", str(out / "libraries" / "active-002"), "--targets", TARGETS[0],
                 "--methods", "zero_shot", "semla", "--k", "2", "--max-images", "4", "--quiet"])
    assert code == 0 and "semla" in capsys.readouterr().out

    before = adapter_mtimes(out)
    code, text, err = scale(capsys, out)
    assert code == 0, err
    again = json.loads((out / "scaling.json").read_text())
    assert again["timing"]["adapters_trained"] == 0 and again["timing"]["evaluations_run"] == 0
    assert adapter_mtimes(out) == before, "a rerun must not retrain or rewrite any adapter"
    assert again["runs"] == payload["runs"] and again["orders"] == orders

    shutil.rmtree(out / "evaluations" / "random-0-002")           # only what is missing is evaluated again
    code, _, err = scale(capsys, out)
    assert code == 0 and json.loads((out / "scaling.json").read_text())["timing"]["evaluations_run"] == 1


@pytest.mark.parametrize("extra, message", [
    (["--pool-seed", "1"], "holds another pool"),
    (["--steps", "3"], "holds adapters trained with another recipe"),
])
def test_a_rerun_with_other_settings_is_refused_in_one_line(capsys, tmp_path, extra, message):
    out = tmp_path / "study"
    assert scale(capsys, out, "--no-oracle", "--orders", "1", "--no-active")[0] == 0
    code, _, err = scale(capsys, out, "--no-oracle", "--orders", "1", "--no-active", *extra)
    assert code == 2 and message in err.strip().splitlines()[-1]


@pytest.mark.parametrize("cfg, targets, message", [
    (dict(sizes=(3, 2)), TARGETS, "increasing"),
    (dict(sizes=(2, 9), pool_size=5), TARGETS, "exceeds the pool"),
    (dict(sizes=(2,), pool_size=3, random_orders=0, active=False), TARGETS, "at least one order"),
    (dict(sizes=(1, 2), pool_size=2), TARGETS, "below SemLA's k=2"),
    (dict(sizes=(2,), pool_size=2), TARGETS[:1], "two or more targets"),
    (dict(sizes=(2,), pool_size=2), ["real:acdc_fog", TARGETS[0]], "mini-world domains"),
])
def test_bad_designs_fail_before_any_work(tmp_path, cfg, targets, message):
    with pytest.raises(UsageError, match=message):
        run_scale(tmp_path / "s", ScaleConfig(**cfg), targets, AdapterConfig(steps=1), EvalConfig(k=2), progress=False,
                  log=lambda _: None)
    assert not (tmp_path / "s" / "pool-library").exists()


def test_ray_gives_the_serial_numbers(tmp_path, monkeypatch):
    """The same tiny study on a local 2-CPU Ray cluster (no dashboard, usage stats off, shut down by the
    engine) and serially: the same orders, coverage and scores."""
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    args = (ScaleConfig(sizes=(2, 3), pool_size=3, random_orders=1, oracle=False, query_images=4), TARGETS,
            AdapterConfig(steps=2, batch=8, replay=4), EvalConfig(k=2, max_images=4))
    serial = run_scale(tmp_path / "serial", *args, engine=Engine(), progress=False, log=lambda _: None)
    remote = run_scale(tmp_path / "ray", *args, engine=Engine(ray=True, num_cpus=2), progress=False, log=lambda _: None)
    assert not ray.is_initialized(), "the engine shuts down the cluster it started"
    assert "ray" in remote["timing"]["engine"] and remote["timing"]["adapters_trained"] == 3
    for key in ("orders", "coverage", "runs"):
        assert remote[key] == serial[key], key
