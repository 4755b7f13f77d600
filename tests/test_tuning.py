"""The held-out protocol for tau and K: a stratified, seeded split; selection on val images of the
selection domains only; the pick and the default reported on test images of the report domains only."""
import json

import pytest

from semla_lab.evaluation import tuning
from semla_lab.library.assets import load_segmenter
from semla_lab.cli import main
from semla_lab.models.clip import load_clip
from semla_lab.core.errors import UsageError
from semla_lab.evaluation.config import EvalConfig
from semla_lab.evaluation.ablation import ablation_grid
from semla_lab.library.index import AdapterLibrary
from semla_lab.core.runtime import assets_dir
from semla_lab.evaluation.tuning import canonical, held_out_tuning, split_domains
from semla_lab.data.world.generate import get_domain, target_domains

SCENES = {"s1": {"street": 1.0}, "s2": {"street": 1.0}, "s3": {"street": 1.0}, "s4": {"street": 1.0},
          "i1": {"indoor": 1.0}, "m1": {"street": 0.5, "park": 0.5}, "m2": {"indoor": 0.5, "park": 0.5},
          "m3": {"street": 0.4, "indoor": 0.3, "park": 0.3}}


def test_split_is_stratified_by_scene_kind_seeded_and_reports_every_kind():
    split = split_domains(SCENES)
    assert set(split.selection) | set(split.report) == set(SCENES) and not set(split.selection) & set(split.report)
    assert sum(n.startswith("s") for n in split.selection) == 2          # half of the 4 street domains
    assert sum(n.startswith("m") for n in split.selection) == 1          # round-down(1.5) of the mixed ones
    assert "i1" in split.report                                         # a lone kind stays in the report set
    assert set(split.selection) == set(split_domains(dict(reversed(SCENES.items()))).selection)   # order does not choose
    splits = {split_domains(SCENES, seed=s).selection for s in range(6)}
    assert len(splits) > 1                                             # the seed does
    assert list(split.report) == [n for n in SCENES if n in split.report]


def test_the_shipped_split_balances_street_and_mixed_domains():
    split = split_domains({d: get_domain(d).scene for d in target_domains()})
    kinds = lambda names: [tuning.scene_kind(get_domain(d).scene) for d in names]
    assert kinds(split.selection).count("street") == 8 and kinds(split.selection).count("mixed") == 1
    assert set(kinds(split.report)) == {"street", "indoor", "mixed"}


def test_bad_fractions_and_too_few_domains_are_one_clear_error():
    with pytest.raises(UsageError, match="fraction"):
        split_domains(SCENES, fraction=1.0)
    with pytest.raises(UsageError, match="no selection domain"):
        split_domains({"i1": {"indoor": 1.0}, "m1": {"street": 0.5, "park": 0.5}})


def test_canonical_drops_tau_where_it_cannot_matter():
    assert canonical(EvalConfig(k=1, tau=0.2)) == EvalConfig(k=1)
    assert canonical(EvalConfig(k=3, tau=0.2, weighting="uniform")) == EvalConfig(k=3, weighting="uniform")
    assert canonical(EvalConfig(k=3, tau=0.2)) == EvalConfig(k=3, tau=0.2)


@pytest.fixture(scope="module")
def bundle():
    clip = load_clip(device="cpu")
    return load_segmenter(clip=clip, device="cpu"), clip, AdapterLibrary(assets_dir() / "library")


def test_selection_sees_only_val_images_of_selection_domains_and_report_only_test(bundle, monkeypatch):
    loads = []
    real = tuning.load_target
    monkeypatch.setattr(tuning, "load_target", lambda name, n, size, split: loads.append((name, split)) or real(name, n, size, split=split))
    domains = ["acdc_fog", "bdd", "cityscapes", "nyu"]
    grid = ablation_grid(k=[1, 3], tau=[0.01, 1.0])
    r = held_out_tuning(*bundle, domains, grid, selection_images=4, report_images=4, progress=False)
    sel, rep = r["split"]["selection"], r["split"]["report"]
    assert len(sel) == 1 and "nyu" in rep and set(sel) | set(rep) == set(domains)
    assert {(d, "val") for d in sel} | {(d, "test") for d in rep} == set(loads)
    assert len(r["selection"]) == 4                        # default, K=1 once, K=3 at two taus
    best = max(row["hmean"] for row in r["selection"])
    pick_row = next(row for row in r["selection"] if all(row[k] == v for k, v in r["pick"].items()))
    assert pick_row["hmean"] == best and set(pick_row["per_domain"]) == set(sel)
    assert set(r["report"]["default"]["per_domain"]) == set(rep) and r["default"]["k"] == 5
    if r["report"]["bootstrap"] is None:
        assert r["pick"] == r["default"] and r["report"]["pick"] == r["report"]["default"]
    else:
        assert r["report"]["bootstrap"]["hmean"]["delta"] == pytest.approx(
            r["report"]["pick"]["hmean"] - r["report"]["default"]["hmean"], abs=0.011)
    assert r["protocol"]["selection_split"] == "val" and r["protocol"]["report_split"] == "test"


def test_ties_go_to_the_default(bundle):
    domains = ["acdc_fog", "bdd", "nyu"]
    r = held_out_tuning(*bundle, domains, [EvalConfig(k=5, tau=0.05)], selection_images=2, report_images=2,
                        progress=False)
    assert r["pick"] == r["default"] and r["report"]["bootstrap"] is None and len(r["selection"]) == 1


def test_cli_tune_writes_its_result(capsys, tmp_path):
    code = main(["tune", "--targets", "acdc_fog", "bdd", "nyu", "--k", "3,5", "--tau", "0.05", "--selection-images",
                 "2", "--max-images", "2", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "selection domains (2 val images each)" in out and "report domains" in out
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert {row["k"] for row in saved["selection"]} == {3, 5} and saved["protocol"]["report_images"] == 2


def test_cli_tune_searches_the_options_beyond_the_paper(capsys, tmp_path):
    code = main(["tune", "--targets", "acdc_fog", "bdd", "nyu", "--k", "3", "--tau", "0.05", "--text-weight", "0.5",
                 "--index", "kmeans:4", "--selection-images", "2", "--max-images", "2", "--out", str(tmp_path),
                 "--quiet"])
    assert code == 0
    saved = json.loads((tmp_path / "tune.json").read_text())
    grid = [(row["k"], row["index"], row["text_weight"]) for row in saved["selection"]]
    assert grid == [(5, "centroid", 0.0), (3, "kmeans:4", 0.5)]          # the default, then the grid
    assert saved["default"]["index"] == "centroid" and saved["default"]["text_weight"] == 0.0
    if saved["pick"]["k"] == 3:
        assert "semla+kmeans:4+text0.5" in capsys.readouterr().out
