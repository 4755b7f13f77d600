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


def test_replace_path_swaps_files_and_folders(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a").write_text("new")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "a").write_text("old")
    assets.replace_path(tmp_path / "new", tmp_path / "dest")
    assert (tmp_path / "dest" / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    (tmp_path / "f.new").write_text("1")
    assets.replace_path(tmp_path / "f.new", tmp_path / "dest" / "a")
    assert (tmp_path / "dest" / "a").read_text() == "1"
