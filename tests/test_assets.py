"""Rebuilds are atomic: `semla-lab build` writes into a staging folder and replaces the artifacts only once
every stage has finished, so an interrupted rebuild leaves the previous ones intact; `build-library`
commits adapter by adapter, so an interrupted one leaves a library of what was committed and a rerun
completes it."""
import json

import pytest

from semla_lab.library import assets
from semla_lab.workflows import pipeline
from semla_lab.cli import main
from semla_lab.library.index import AdapterLibrary
from semla_lab.library.fingerprints import adapter_fingerprints

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A quick `build all` (CLIP, segmenter, a 2-domain library) in a folder of its own."""
    root = tmp_path_factory.mktemp("assets") / "assets"
    assert main(["build", "all", "--quick", "--quiet", "--out", str(root)]) == 0
    return root


def test_the_built_library_holds_the_profiles_notebook_10_uses(built):
    profiles = AdapterLibrary(built / "library").profiles()
    assert list(profiles) == ["cityscapes", "acdc_fog"]
    assert all(p.kinds == ["centroid", *pipeline.SHIPPED_PROFILES] and p.vocabulary is not None
               for p in profiles.values())


def snapshot(root):
    return ({n: assets.file_digest(root / n) for n in ("tiny_clip.safetensors", "segmenter.safetensors",
                                                      "manifest.json")},
            adapter_fingerprints(AdapterLibrary(root / "library")).to_dict())


def interrupt_after_first_adapter(monkeypatch):
    real, calls = pipeline.train_adapter, []

    def train_adapter(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed during the second adapter")
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(pipeline, "train_adapter", train_adapter)


def no_leftovers(folder):
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.mark.parametrize("stage", ["library", "all"])
def test_interrupted_rebuild_leaves_previous_artifacts(built, monkeypatch, stage):
    before = snapshot(built)
    interrupt_after_first_adapter(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(["build", stage, "--quick", "--quiet", "--seed", "1", "--out", str(built)])
    assert snapshot(built) == before
    assert AdapterLibrary(built / "library").names() == ["cityscapes", "acdc_fog"]
    assert no_leftovers(built) == [] and no_leftovers(built / "library") == []


def test_completed_rebuild_replaces_the_library(built, capsys):
    (files, adapters) = snapshot(built)
    assert main(["build", "library", "--quick", "--quiet", "--seed", "1", "--out", str(built)]) == 0
    new_files, new_adapters = snapshot(built)
    assert new_adapters["sha256"] != adapters["sha256"]                         # seed 1: other adapters
    assert {k: new_files[k] for k in ("tiny_clip.safetensors", "segmenter.safetensors")} == \
        {k: files[k] for k in ("tiny_clip.safetensors", "segmenter.safetensors")}
    assert json.loads((built / "manifest.json").read_text())["library"]["config"]["seed"] == 1
    assert AdapterLibrary(built / "library").names() == ["cityscapes", "acdc_fog"]
    assert no_leftovers(built) == [] and no_leftovers(built / "library") == []


def test_interrupted_build_library_keeps_what_it_committed_and_resumes(monkeypatch, tmp_path, capsys):
    out = tmp_path / "lib"
    argv = ["build-library", "--out", str(out), "--domains", "nyu", "ade", "--steps", "1", "--quiet"]
    interrupt_after_first_adapter(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert AdapterLibrary(out).names() == ["nyu"] and no_leftovers(out) == []
    first = adapter_fingerprints(AdapterLibrary(out))
    monkeypatch.undo()
    assert main(argv) == 0
    assert "kept 1 already there" in capsys.readouterr().out
    assert AdapterLibrary(out).names() == ["nyu", "ade"] and no_leftovers(out) == []
    assert adapter_fingerprints(AdapterLibrary(out)).loc[["nyu"]].equals(first), "the resumed build left nyu alone"


BUILDER = """
import os, sys, time
from pathlib import Path
from semla_lab.cli import main
from semla_lab.workflows import pipeline

log, barrier = Path(sys.argv[1]), Path(sys.argv[2])
real_open, real_train = pipeline.open_library, pipeline.train_staged


def wait_for_both(stage):
    (barrier / f"{stage}-{os.getpid()}").touch()
    while len(list(barrier.glob(f"{stage}-*"))) < 2:
        time.sleep(0.01)


def open_library(*args, **kwargs):
    wait_for_both("open")              # both look for the library before either creates it
    library = real_open(*args, **kwargs)
    wait_for_both("opened")            # both hold it before either trains a domain
    return library


def train_staged(segmenter, clip, data, *args, **kwargs):
    with open(log, "a") as f:
        f.write(data.name + "\\n")
    return real_train(segmenter, clip, data, *args, **kwargs)


pipeline.open_library, pipeline.train_staged = open_library, train_staged
try:
    sys.exit(main(sys.argv[3:]))
finally:                               # a build that fails never keeps the other one waiting
    for stage in ("open", "opened"):
        (barrier / f"{stage}-{os.getpid()}").touch()
"""


def test_two_builds_of_one_library_at_once_train_each_domain_once(tmp_path):
    """Two `semla-lab build-library` processes, held at a barrier until both have looked for the library and
    then until both have opened it: both exit 0, and the library holds each domain, each trained once."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    out, log, barrier = tmp_path / "L", tmp_path / "trained.log", tmp_path / "barrier"
    barrier.mkdir()
    argv = ["build-library", "--out", str(out), "--domains", "acdc_fog", "nyu", "--steps", "1", "--max-images", "8",
            "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(pipeline.__file__).parents[2])}
    env.pop("SEMLA_ASSETS", None)
    builds = [subprocess.Popen([sys.executable, "-c", BUILDER, str(log), str(barrier), *argv], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [b.communicate(timeout=600)[0] for b in builds]
    assert [b.returncode for b in builds] == [0, 0], outputs
    assert sorted(log.read_text().split()) == ["acdc_fog", "nyu"], "a domain was trained twice"
    assert sorted(AdapterLibrary(out).names()) == ["acdc_fog", "nyu"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["L", "barrier", "trained.log"], "leftovers beside L"
