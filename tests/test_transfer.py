"""The transfer diagnostic: summary figures from a hand-made payload, one real target, the CLI."""
import json

import pytest
import torch

from semla_lab.library.assets import load_segmenter
from semla_lab.models.clip import load_clip
from semla_lab.evaluation.config import EvalConfig
from semla_lab.evaluation.outputs import format_table
from semla_lab.data.sources import load_target
from semla_lab.evaluation.benchmark import run_benchmark
from semla_lab.library.index import AdapterLibrary
from semla_lab.core.metrics import harmonic_mean
from semla_lab.library.predictor import LibraryModel
from semla_lab.core.runtime import assets_dir
from semla_lab.evaluation.transfer import format_transfer, summarize_transfer, target_transfer, transfer_matrix


def _payload():
    """Three targets, three adapters: b harms a by 5, c harms b by 1 (within the margin)."""
    targets = {
        "a": {"zero_shot": 30.0, "uniform": 28.5, "top1": 31.0, "adapters": {"a": 40.0, "b": 25.0, "c": 33.0},
              "top1_domains": {"b": 3, "c": 1}},
        "b": {"zero_shot": 20.0, "uniform": 22.0, "top1": 21.0, "adapters": {"a": 21.0, "b": 30.0, "c": 19.0},
              "top1_domains": {"a": 4}},
        "c": {"zero_shot": 50.0, "uniform": 50.0, "top1": 48.0, "adapters": {"a": 50.5, "b": 49.0, "c": 55.0},
              "top1_domains": {"b": 2, "a": 2}},
    }
    scenes = {"a": {"indoor": 1.0}, "b": {"street": 1.0}, "c": {"street": 0.5, "park": 0.5}}
    return {"targets": targets, "scenes": scenes}


def test_summary_figures_follow_their_definitions():
    s = summarize_transfer(_payload())
    assert s["off_domain_pairs"] == 6
    assert s["harm"] == pytest.approx(1 / 6, abs=1e-3)              # only (a, b): 25 - 30 = -5 < -2
    assert s["uniform_minus_zero_shot"] == {"a": -1.5, "b": 2.0, "c": 0.0}
    assert s["worst_uniform"] == ("a", -1.5)
    assert s["regret_per_target"] == {"a": 2.0, "b": 0.0, "c": 2.5}  # best other single minus top-1
    assert s["regret"] == pytest.approx(1.5)
    assert s["first_choice"] == {"a": "b", "b": "a", "c": "b"}        # the most frequent first choice (tie: first seen)
    assert s["first_choice_regret_per_target"] == {"a": 8.0, "b": 0.0, "c": 1.5}   # best other minus that adapter alone
    assert s["first_choice_regret"] == pytest.approx(9.5 / 3, abs=0.01)
    assert s["indoor_to_street"] == {"a": "b"}                     # indoor-only a retrieved street-only b first
    assert s["oracle_hmean"] == pytest.approx(harmonic_mean([40, 30, 55]), abs=0.01)
    assert s["oracle_gain"] == pytest.approx(s["oracle_hmean"] - harmonic_mean([30, 20, 50]), abs=0.01)
    assert summarize_transfer(_payload(), margin=0.5)["harm"] == pytest.approx(3 / 6, abs=1e-3)


def test_the_worst_uniform_target_is_printed_with_its_interval():
    """The interval travels from a target to the summary and the printout; payloads without one still print."""
    payload = _payload()
    payload["targets"]["a"]["uniform_interval"] = {"delta": -1.5, "low": -2.3, "high": -0.6}
    s = summarize_transfer(payload)
    assert s["uniform_interval"] == {"a": {"delta": -1.5, "low": -2.3, "high": -0.6}}
    assert "worst -1.5 (a; 95% paired bootstrap over its images -2.3 to -0.6)" in format_transfer(s)
    assert "worst -1.5 (a)\n" in format_transfer(summarize_transfer(_payload()))


def test_matrix_is_adapter_minus_zero_shot():
    m = transfer_matrix(_payload())
    assert m.loc["a", "b"] == -5.0 and m.loc["c", "c"] == 5.0 and list(m.index) == ["a", "b", "c"]


@pytest.fixture(scope="module")
def bundle():
    clip = load_clip(device="cpu")
    return load_segmenter(clip=clip, device="cpu"), clip, AdapterLibrary(assets_dir() / "library")


def test_one_target_agrees_with_the_benchmark(bundle):
    """zero-shot, uniform and the oracle of the diagnostic equal those of `evaluate` on the same images."""
    seg, clip, lib = bundle
    engine = LibraryModel(seg, lib, "cpu")
    target = load_target("acdc_fog", 8)
    got = target_transfer(engine, clip, target, batch_size=4)
    bench = run_benchmark(seg, clip, lib, ["acdc_fog"], ["zero_shot", "uniform", "oracle"],
                          EvalConfig(max_images=8, batch_size=4), device="cpu", progress=False)["results"]
    assert got["zero_shot"] == bench["zero_shot"]["per_domain"]["acdc_fog"]
    assert got["uniform"] == bench["uniform"]["per_domain"]["acdc_fog"]
    assert got["adapters"]["acdc_fog"] == bench["oracle"]["per_domain"]["acdc_fog"]
    assert set(got["adapters"]) == set(lib.names()) and sum(got["top1_domains"].values()) == 8
    assert "acdc_fog" not in got["top1_domains"]
    ci = got["uniform_interval"]
    assert ci["delta"] == pytest.approx(got["uniform"] - got["zero_shot"], abs=0.011)
    assert ci["low"] <= ci["delta"] <= ci["high"] and ci["low"] < ci["high"]


def test_val_and_test_splits_differ():
    a, b = load_target("nyu", 4, split="val"), load_target("nyu", 4, split="test")
    assert not torch.equal(a.images, b.images) and a.scene == {"indoor": 1.0}


def test_cli_writes_json_and_heatmap(tmp_path, capsys):
    from semla_lab.cli import main
    assert main(["transfer", "--targets", "nyu", "acdc_fog", "--max-images", "4", "--out", str(tmp_path),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "off-domain harm" in out and "retrieval regret" in out
    saved = json.loads((tmp_path / "transfer.json").read_text())
    assert set(saved["targets"]) == {"nyu", "acdc_fog"} and saved["config"]["split"] == "test"
    assert (tmp_path / "transfer.png").stat().st_size > 10_000


def test_by_default_every_test_image_and_a_fixed_number_of_val_images(bundle, tmp_path, monkeypatch, capsys):
    """Like `evaluate`, the diagnostic reads a target's whole test split; val, drawn on demand, VAL_IMAGES."""
    import yaml
    from semla_lab.data.world.generate import mini_dir
    from semla_lab.cli import main
    from semla_lab.evaluation import transfer
    seg, clip, lib = bundle
    spec = yaml.safe_load((mini_dir() / "nyu.yaml").read_text())
    spec.update(name="tiny_rooms", splits={"train": 2, "test": 3})
    (tmp_path / "tiny_rooms.yaml").write_text(yaml.safe_dump(spec))
    target = str(tmp_path / "tiny_rooms.yaml")
    test = transfer.run_transfer(seg, clip, lib, [target], device="cpu", progress=False)
    assert test["targets"]["tiny_rooms"]["num_images"] == 3 and test["config"]["max_images"] is None
    with pytest.raises(SystemExit):
        main(["transfer", "--help"])
    assert f"{transfer.VAL_IMAGES} val images" in " ".join(capsys.readouterr().out.split())   # the help's default
    monkeypatch.setattr(transfer, "VAL_IMAGES", 2)
    val = transfer.run_transfer(seg, clip, lib, [target], split="val", device="cpu", progress=False)
    assert val["targets"]["tiny_rooms"]["num_images"] == 2 and val["config"]["max_images"] == 2


def test_benchmark_table_has_domains_as_rows_and_fits_120_columns(bundle):
    seg, clip, lib = bundle
    results = run_benchmark(seg, clip, lib, ["acdc_fog", "nyu"], ["zero_shot", "uniform", "semla", "semla_late",
                            "uniform_late", "oracle"], EvalConfig(max_images=4), device="cpu",
                            progress=False)["results"]
    lines = format_table(results).splitlines()
    assert max(map(len, lines)) <= 120
    assert lines[0].split() == ["zero_shot", "uniform", "semla", "semla_late", "uniform_late", "oracle"]
    assert [ln.split()[0] for ln in lines[1:3]] == ["acdc_fog", "nyu"]
    assert lines[-1].startswith("gap closed") and lines[-2].startswith("h-mean")


def test_class_ious_average_to_the_models_miou(bundle):
    from semla_lab.evaluation.scoring import evaluate_model
    from semla_lab.models.lora import load_adapter
    from semla_lab.evaluation.transfer import class_ious
    seg, clip, lib = bundle
    target = load_target("ade", 6)
    adapted = load_adapter(seg, lib.adapter_path("cityscapes"))
    ious = class_ious({"zero_shot": seg, "cityscapes": adapted}, clip, target, batch_size=4)
    assert list(ious.index) == target.class_names and list(ious.columns) == ["zero_shot", "cityscapes"]
    assert ious["zero_shot"].mean() == pytest.approx(evaluate_model(seg, clip, target), abs=1e-6)   # NaNs skipped
    assert ious["cityscapes"].mean() == pytest.approx(evaluate_model(adapted, clip, target), abs=1e-6)


def test_vocabulary_effect_marks_concepts_the_adapter_was_trained_on():
    import pandas as pd
    from semla_lab.evaluation.transfer import vocabulary_effect
    ious = pd.DataFrame({"zero_shot": [50.0, 40.0, float("nan")], "a": [55.0, 30.0, 10.0]},
                        index=["road", "tree", "sofa"])
    table = vocabulary_effect(ious, {"road": "road", "vegetation": "tree", "sofa": "sofa"},
                              {"a": {"road": "road", "vegetation": "vegetation"}})
    assert table["class"].tolist() == ["road", "tree"]                     # sofa: NaN at zero-shot, left out
    assert table["in_vocabulary"].tolist() == [True, True] and table["same_name"].tolist() == [True, False]
    assert table["change"].tolist() == [5.0, -10.0]
