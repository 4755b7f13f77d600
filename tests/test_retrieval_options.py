"""The options beyond the paper end to end on the shipped artifacts: an old (profile-less) library evaluates as
before, evaluate/ablate/predictor take the options, add-prototypes fills a library, beyond.json is consistent."""
from __future__ import annotations

import json
import shutil

import pytest

from semla_lab.library.assets import load_segmenter
from semla_lab.evaluation.retrieval_options import beyond_table, deltas, worst_below_zero_shot
from semla_lab.cli import main
from semla_lab.models.clip import load_clip
from semla_lab.evaluation.config import EvalConfig
from semla_lab.evaluation.benchmark import run_benchmark
from semla_lab.library.index import PROFILES, AdapterLibrary
from semla_lab.library.predictor import SemLAPredictor
from semla_lab.core.retrieval import RetrievalConfig
from semla_lab.core.runtime import assets_dir

OPTIONS = dict(index="kmeans:4", fallback="coverage", fallback_strength=2.0, text_weight=0.3)


@pytest.fixture(scope="module")
def bundle():
    clip = load_clip(device="cpu")
    return load_segmenter(clip=clip, device="cpu"), clip, AdapterLibrary(assets_dir() / "library")


@pytest.fixture(scope="module")
def old_library(tmp_path_factory):
    """The shipped library as it was before profiles: the same folder without the profile files."""
    root = tmp_path_factory.mktemp("old") / "library"
    shutil.copytree(assets_dir() / "library", root,
                    ignore=shutil.ignore_patterns(PROFILES, "profiles-*.safetensors"))
    return AdapterLibrary(root)


def test_shipped_library_carries_profiles_beside_an_unchanged_index(bundle):
    _, _, lib = bundle
    profiles = lib.profiles()
    assert list(profiles) == lib.names()
    assert all({"kmeans:4", "gmm:4"} <= set(p.kinds) and p.vocabulary is not None for p in profiles.values())
    index = json.loads((lib.root / "index.json").read_text())
    assert set(index) == {"format", "version", "embedder", "base_model", "lora", "centroids_file", "domains"}


def test_old_library_evaluates_unchanged(bundle, old_library):
    """Without profiles, the paper's methods give the numbers of the shipped results.json (nyu, all 100 images)."""
    seg, clip, _ = bundle
    assert old_library.profiles() == {}
    payload = run_benchmark(seg, clip, old_library, ["nyu"], ["zero_shot", "semla"], EvalConfig(), device="cpu",
                            progress=False)
    shipped = json.loads((assets_dir() / "benchmark" / "results.json").read_text())["results"]
    for m in ("zero_shot", "semla"):
        assert payload["results"][m]["per_domain"]["nyu"] == pytest.approx(shipped[m]["per_domain"]["nyu"], abs=0.05)
    with pytest.raises(ValueError, match="no 'kmeans:4' index .*add-prototypes"):
        run_benchmark(seg, clip, old_library, ["nyu"], ["semla"], EvalConfig(max_images=2, index="kmeans:4"),
                      device="cpu", progress=False)


def test_evaluate_with_options_adds_a_method_column(bundle, tmp_path):
    seg, clip, lib = bundle
    cfg = EvalConfig(max_images=4, batch_size=4, **OPTIONS)
    payload = run_benchmark(seg, clip, lib, ["nyu"], ["zero_shot", "semla"], cfg, tmp_path, device="cpu",
                            progress=False)
    label = "semla+kmeans:4+coverage2+text0.3"
    assert list(payload["results"]) == ["zero_shot", "semla", label]
    assert payload["config"]["index"] == "kmeans:4" and payload["config"]["text_weight"] == 0.3
    record = json.loads((tmp_path / "selections.jsonl").read_text().splitlines()[0])
    assert "nyu" not in record[label]["chosen"] and sum(record[label]["weights"]) <= 1 + 1e-6
    # with the options off the extra column is absent and semla is the paper
    plain = run_benchmark(seg, clip, lib, ["nyu"], ["semla"], EvalConfig(max_images=4, batch_size=4), device="cpu",
                          progress=False)
    assert list(plain["results"]) == ["semla"]
    assert plain["results"]["semla"] == payload["results"]["semla"]


def test_ablate_command_takes_the_options(capsys, tmp_path):
    argv = ["ablate", "--targets", "nyu", "--max-images", "2", "--batch-size", "2", "--quiet", "--out", str(tmp_path),
            "--index", "centroid,kmeans:4", "--fallback", "none,coverage", "--text-weight", "0,0.3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "semla+kmeans:4+coverage1+text0.3" in out
    import pandas as pd
    table = pd.read_csv(tmp_path / "ablation.csv")
    assert len(table) == 8 and set(table["index"]) == {"centroid", "kmeans:4"}
    assert set(table["method"]) >= {"semla", "semla+kmeans:4", "semla+coverage1", "semla+text0.3"}


@pytest.mark.parametrize("argv, message", [
    (["--index", "kmeans:0"], "P (prototypes per domain) must be >= 1"),
    (["--text-weight", "1.5"], "text_weight (lambda) must lie in [0, 1]"),
    (["--index", "gmm:3"], "has no 'gmm:3' index"),
    (["--fallback", "always"], "unknown fallback"),
])
def test_bad_options_print_one_line_and_exit_2(capsys, argv, message):
    code = main(["evaluate", "--targets", "nyu", "--max-images", "1", "--quiet", "--methods", "semla", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_predictor_with_text_and_fallback_explains_the_base_weight(bundle):
    seg, clip, lib = bundle
    from semla_lab.data.sources import load_target
    target = load_target("nyu", 1)
    p = SemLAPredictor(seg, clip, lib, RetrievalConfig(**OPTIONS), device="cpu")
    assert p.set_image(target.images[0], exclude=["nyu"]) is None           # text-aware: waits for class names
    with pytest.raises(RuntimeError, match="predict"):
        p.explain()
    p.predict(target.class_names)
    chosen = p.explain()
    assert chosen[-1][0] == "base model" and "nyu" not in [c[0] for c in chosen[:-1]]
    assert sum(c[2] for c in chosen) == pytest.approx(1, abs=1e-5)
    paper = SemLAPredictor(seg, clip, lib, RetrievalConfig(text_weight=0.0), device="cpu")
    paper.set_image(target.images[0], exclude=["nyu"])
    assert all(c[0] != "base model" for c in paper.explain())


def test_add_prototypes_fills_a_library(capsys, old_library, tmp_path):
    root = tmp_path / "lib"
    shutil.copytree(old_library.root, root)
    assert main(["add-prototypes", "--library", str(root), "--index", "kmeans:2", "--domains", "nyu", "ade",
                 "--quiet"]) == 0
    assert "stored profiles of 2 domains" in capsys.readouterr().out
    profiles = AdapterLibrary(root).profiles()
    assert list(profiles) == ["ade", "nyu"] and profiles["nyu"].kinds == ["centroid", "kmeans:2"]
    assert profiles["ade"].coverage["kmeans:2"] < profiles["ade"].coverage["centroid"]   # ade: several sub-scenes
    assert main(["add-prototypes", "--library", str(root), "--index", "kmeans:0", "--domains", "nyu"]) == 2


def test_shipped_beyond_json_is_consistent():
    payload = json.loads((assets_dir() / "benchmark" / "beyond.json").read_text())
    assert len(payload["seeds"]) == 3
    for split in ("loo", "heldout"):
        table = beyond_table(payload, split)
        assert {"zero_shot", "uniform", "semla"} <= set(table.index)
        assert set(payload["variants"]) <= set(table.index)
        for m in table.index:
            h = [payload["seeds"][s][split][m]["hmean"] for s in payload["seeds"]]
            assert table.loc[m, "h-mean"] == pytest.approx(sum(h) / 3, abs=0.01)
        assert (deltas(payload, split).index == [m for m in table.index if m.startswith("semla+")]).all()
    assert worst_below_zero_shot(payload, "loo", "semla")[1] < 0


def test_shipped_knobs_are_what_the_choice_rule_picks_from_the_shipped_val_rows():
    from semla_lab.evaluation.retrieval_options import CHOICE_RULE, choose_options
    payload = json.loads((assets_dir() / "benchmark" / "beyond.json").read_text())
    tuning = payload["tuning"]
    assert tuning["rule"] == CHOICE_RULE and choose_options(tuning["val"]) == tuning["options"]
    assert {EvalConfig(**o).extra_method: o for o in tuning["options"]} == payload["chosen"]


def test_choice_rule_branches():
    from semla_lab.evaluation.retrieval_options import choose_options, val_rows
    scores = {"semla": (40, -3), "semla+kmeans:2": (41, -3), "semla+kmeans:4": (40.5, -3), "semla+gmm:2": (39, -3),
              "semla+coverage0.5": (39, -2), "semla+coverage8": (35, -1.5), "semla+text0.3": (39.5, -3)}
    results = {"zero_shot": {"hmean": 30.0, "per_domain": {"a": 30.0, "b": 30.0}},   # (h-mean, gap on domain b)
               **{m: {"hmean": h, "per_domain": {"a": 31.0, "b": 30.0 + g}} for m, (h, g) in scores.items()}}
    rows = val_rows(results)
    assert rows["semla+coverage8"] == {"hmean": 35, "worst_vs_zero_shot": -1.5, "worst_domain": "b"}
    kmeans, gmm, fallback, text, combo = choose_options(rows)
    assert kmeans == {"index": "kmeans:2"} and gmm == {"index": "gmm:2"} and text == {"text_weight": 0.3}
    assert fallback == {"fallback": "coverage", "fallback_strength": 8.0}          # none safe: the best worst domain
    assert combo == {"index": "kmeans:2", **fallback}                              # text lost to SemLA: left out
    rows["semla+coverage0.5"]["worst_vs_zero_shot"] = -0.5
    assert choose_options(rows)[2]["fallback_strength"] == 0.5                      # the smallest safe beta
