"""End to end on the shipped artifacts: benchmark files, leave-one-out, oracle, predictor, CLI."""
import json

import pytest
import torch

from semla_lab.library.assets import load_segmenter
from semla_lab.models.clip import load_clip
from semla_lab.evaluation.methods import METHODS
from semla_lab.evaluation.config import EvalConfig
from semla_lab.evaluation.ablation import ablation_grid, run_ablation
from semla_lab.evaluation.outputs import format_table, gap_closed
from semla_lab.data.sources import load_target
from semla_lab.evaluation.benchmark import run_benchmark
from semla_lab.library.index import AdapterLibrary
from semla_lab.library.predictor import LibraryModel, SemLAPredictor
from semla_lab.core.runtime import assets_dir

TARGETS = ["acdc_fog", "nyu"]


@pytest.fixture(scope="module")
def bundle():
    clip = load_clip(device="cpu")
    return load_segmenter(clip=clip, device="cpu"), clip, AdapterLibrary(assets_dir() / "library")


@pytest.fixture(scope="module")
def small_run(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    seg, clip, lib = bundle
    payload = run_benchmark(seg, clip, lib, TARGETS, METHODS, EvalConfig(max_images=6, batch_size=4), out,
                            device="cpu", progress=False)
    return out, payload


def test_results_json_schema(small_run):
    out, payload = small_run
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    assert set(saved["results"]) == set(METHODS)
    for method, r in saved["results"].items():
        assert set(r) == {"per_domain", "mean", "hmean", "num_images"}
        assert set(r["per_domain"]) == set(TARGETS)
        assert all(0 <= v <= 100 for v in r["per_domain"].values())
        assert r["num_images"] == {t: 6 for t in TARGETS}
    boot = saved["bootstrap"]
    assert set(boot) == {"semla - uniform", "semla - zero_shot"}
    for pair, b in boot.items():
        a, c = pair.split(" - ")
        assert set(b["per_domain"]) == set(TARGETS) and b["resamples"] == 1000 and b["level"] == 0.95
        for d in TARGETS:
            r = b["per_domain"][d]
            assert r["delta"] == pytest.approx(saved["results"][a]["per_domain"][d] - saved["results"][c]["per_domain"][d],
                                               abs=0.011)
            assert r["low"] <= r["delta"] <= r["high"]
        assert b["hmean"]["delta"] == pytest.approx(saved["results"][a]["hmean"] - saved["results"][c]["hmean"], abs=0.011)
    cfg = saved["config"]
    assert cfg["k"] == 5 and cfg["tau"] == 0.05 and cfg["methods"] == list(METHODS)
    assert set(saved["gap_closed"]) == set(METHODS)


def test_selections_are_per_image_and_leave_one_out(small_run, bundle):
    out, _ = small_run
    lines = [json.loads(line) for line in (out / "selections.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and len({r["image_id"] for r in lines}) == 12
    names = bundle[2].names()
    for r in lines:
        assert r["target"] not in r["chosen"], "the target's own adapter must be excluded"
        assert len(r["chosen"]) == 5 and abs(sum(r["weights"]) - 1) < 1e-3
        assert set(r["distances"]) == set(names)
        assert {"embed", "retrieve", "predict_semla"} <= set(r["ms"])


def test_oracle_is_the_targets_own_adapter(bundle):
    seg, clip, lib = bundle
    engine = LibraryModel(seg, lib, "cpu")
    target = load_target("acdc_fog", 4)
    from semla_lab.models.clip import embed_class_names
    text = embed_class_names(clip, target.class_names)
    x = target.images.float() / 255
    own = engine.logits(x, text, torch.full((4, 1), engine.names.index("acdc_fog")), torch.ones(4, 1))
    other = engine.logits(x, text, torch.full((4, 1), engine.names.index("nyu")), torch.ones(4, 1))
    from semla_lab.evaluation.scoring import evaluate_target
    scores, _ = evaluate_target(engine, clip, target, ["oracle", "zero_shot"], EvalConfig(batch_size=4))
    from semla_lab.core.metrics import MIoU
    meter = MIoU(len(target.class_names))
    meter.update(own.argmax(1), target.labels.long())
    assert scores["oracle"] == pytest.approx(meter.compute()["miou"])
    assert not torch.allclose(own, other)


def test_unseen_target_has_no_oracle(bundle, tmp_path):
    import yaml
    from semla_lab.data.world.generate import mini_dir
    spec = yaml.safe_load((mini_dir() / "cityscapes.yaml").read_text())
    spec.update(name="unseen_dusk_fog", factors={"dusk": 0.6, "fog": 0.5})
    (tmp_path / "unseen.yaml").write_text(yaml.safe_dump(spec))
    seg, clip, lib = bundle
    payload = run_benchmark(seg, clip, lib, [str(tmp_path / "unseen.yaml")], ["zero_shot", "semla", "oracle"],
                            EvalConfig(max_images=4), device="cpu", progress=False)
    assert "oracle" not in payload["results"] and "semla" in payload["results"]


def test_table_and_gap(small_run):
    _, payload = small_run
    text = format_table(payload["results"])
    assert "h-mean" in text and "semla" in text and "gap closed" in text
    gaps = gap_closed(payload["results"])
    assert gaps["zero_shot"] == 0 and gaps["oracle"] == 1


def test_ablation_grid_and_csv(bundle, tmp_path):
    seg, clip, lib = bundle
    grid = ablation_grid(k=[1, 3], tau=[0.05], max_images=[4])
    assert len(grid) == 2
    with pytest.raises(ValueError, match="unknown knob"):
        ablation_grid(temperature=[1])
    table = run_ablation(seg, clip, lib, ["nyu"], grid, ["semla"], tmp_path, device="cpu", progress=False)
    assert list(table["k"]) == [1, 3] and (tmp_path / "ablation_tidy.csv").is_file()


def test_predictor_explains_its_choice(bundle):
    seg, clip, lib = bundle
    p = SemLAPredictor(seg, clip, lib, device="cpu")
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(["road"])
    target = load_target("acdc_night", 1)
    p.set_image(target.images[0], exclude=["acdc_night"])
    mask = p.predict(target.class_names)
    assert mask.shape == (64, 64) and mask.max() < len(target.class_names)
    chosen = p.explain()
    assert len(chosen) == 5 and "acdc_night" not in [c[0] for c in chosen]
    assert chosen[0][1] <= chosen[-1][1] and chosen[0][2] >= chosen[-1][2]
    assert not torch.equal(p.logits(target.class_names), p.logits(target.class_names, adapt=False))


def test_segmenter_transfers_to_names_it_never_trained_with(bundle):
    """Open vocabulary: held-out synonyms (never used in base training, only seen by CLIP in
    captions) work far better than chance and than the same names assigned to the wrong classes."""
    from semla_lab.evaluation.scoring import evaluate_model
    from semla_lab.data.world.concepts import HELD_OUT_NAMES
    from semla_lab.data.world.generate import generate
    from semla_lab.data.world.spec import validate_spec
    seg, clip, _ = bundle
    held_out = {"road": "roadway", "sidewalk": "footpath", "building": "facade", "grass": "lawn",
                "car": "automobile", "person": "human", "sky": "sky", "vegetation": "bush", "pole": "post"}
    assert {"roadway", "footpath", "facade", "lawn", "automobile", "human"} <= HELD_OUT_NAMES
    base = {"name": "synonyms", "dataset": "x", "scene": "street", "seed": 7, "vocabulary": held_out}
    right = generate(validate_spec(base), "test", 48)
    names = list(held_out.values())
    shuffled = dict(zip(held_out, names[3:] + names[:3]))      # every concept gets another's name
    wrong = generate(validate_spec({**base, "vocabulary": shuffled}), "test", 48)
    right_miou, wrong_miou = evaluate_model(seg, clip, right), evaluate_model(seg, clip, wrong)
    chance = 100 / len(names) / 2        # IoU of uniform random guessing is below 1/(2T) per class
    assert right_miou > 3 * chance and right_miou > wrong_miou + 10, (right_miou, wrong_miou)


def test_dataset_folder_is_a_target(bundle, tmp_path):
    """Any dataset folder in the shared format (here written from a mini-world domain) can be evaluated."""
    from semla_lab.data.datasets import write_dataset
    from semla_lab.data.world.generate import generate, shipped_domains
    spec = shipped_domains()["acdc_rain"]
    data = generate(spec, "test", 4)
    write_dataset(tmp_path / "mine", "mine", spec.class_names,
                  [{"id": data.ids[i], "image": data.images[i], "label": data.labels[i], "split": "test",
                    "domain": "mine"} for i in range(4)])
    seg, clip, lib = bundle
    payload = run_benchmark(seg, clip, lib, [str(tmp_path / "mine")], ["zero_shot", "semla"], EvalConfig(),
                            device="cpu", progress=False)
    assert payload["results"]["semla"]["num_images"] == {"mine": 4}
    assert payload["leave_one_out"] == {"mine": False}              # no library domain: nothing to leave out
    direct = run_benchmark(seg, clip, lib, ["acdc_rain"], ["zero_shot"], EvalConfig(max_images=4, batch_size=4),
                           device="cpu", progress=False)
    assert payload["results"]["zero_shot"]["per_domain"]["mine"] == direct["results"]["zero_shot"]["per_domain"]["acdc_rain"]


def test_evaluate_command_prints_table_intervals_and_gap(capsys):
    from semla_lab.cli import main
    assert main(["evaluate", "--targets", "nyu", "acdc_fog", "--max-images", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "95% paired bootstrap intervals over test images (1000 resamples):" in out
    header = next(line for line in out.splitlines() if "semla - uniform" in line)
    assert header.split() == ["semla", "-", "uniform", "semla", "-", "zero_shot"]
    assert "% of the zero-shot -> oracle h-mean gap (paper: 68%)" in out
    assert "nothing was left out" not in out


def test_evaluate_says_when_a_target_is_no_library_domain(capsys, tmp_path):
    from semla_lab.cli import main
    from semla_lab.data.world.generate import mini_dir
    spec = (mini_dir() / "cityscapes.yaml").read_text().replace("name: cityscapes", "name: unseen_city")
    assert "unseen_city" in spec
    (tmp_path / "unseen.yaml").write_text(spec)
    assert main(["evaluate", "--targets", "nyu", str(tmp_path / "unseen.yaml"), "--methods", "zero_shot", "semla",
                 "--max-images", "2", "--quiet", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "not library domains, so nothing was left out (retrieval saw the whole library): unseen_city" in out
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["leave_one_out"] == {"nyu": True, "unseen_city": False}


def test_in_process_and_pipeline_benchmarks_are_one_runner(bundle, monkeypatch):
    """run_benchmark (loaded models) and pipeline.evaluate (models by name) both run benchmark.benchmark and
    give the same payload; so do run_ablation and pipeline.ablate through ablation.ablation."""
    from semla_lab.evaluation import ablation, benchmark
    from semla_lab.workflows import pipeline
    calls = []
    for module, name in ((benchmark, "benchmark"), (pipeline, "benchmark"), (ablation, "ablation"),
                         (pipeline, "ablation")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    seg, clip, lib = bundle
    cfg = EvalConfig(max_images=2, batch_size=2)
    here = run_benchmark(seg, clip, lib, ["nyu"], ["zero_shot", "semla"], cfg, device="cpu", progress=False)
    named = pipeline.evaluate(["nyu"], pipeline.Models(library=str(lib.root)), ["zero_shot", "semla"], cfg,
                              progress=False)
    assert here == named
    grid = ablation_grid(k=[1, 2], max_images=[2])
    assert run_ablation(seg, clip, lib, ["nyu"], grid, device="cpu", progress=False).equals(
        pipeline.ablate(["nyu"], pipeline.Models(library=str(lib.root)), grid, progress=False))
    assert calls == ["benchmark", "benchmark", "ablation", "ablation"]

