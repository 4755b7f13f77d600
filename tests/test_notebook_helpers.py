"""The notebooks' per-image and table helpers: one_at_a_time slices an ablation table, method_masks and
masks_miou score one image per method."""
import copy

import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model

from semla_lab.evaluation.methods import masks_miou, method_masks
from semla_lab.evaluation.ablation import one_at_a_time
from semla_lab.evaluation.config import EvalConfig
from semla_lab.library.index import AdapterLibrary
from semla_lab.library.predictor import SemLAPredictor
from semla_lab.core.retrieval import RetrievalConfig
from semla_lab.models.segmenter import LORA_TARGETS


def test_one_at_a_time_slices_an_ablation_table():
    rows = [{"k": k, "tau": t, "metric": "euclidean", "weighting": "softmax", "fusion": "cat",
             "method": "semla", "hmean": 10 * k + t} for k in (5, 1, 3) for t in (0.05, 0.2)]
    rows.append({**rows[0], "metric": "cosine"})
    table = pd.DataFrame(rows)
    ks = one_at_a_time(table, "k")
    assert ks["k"].tolist() == [1, 3, 5] and (ks["tau"] == 0.05).all()
    taus = one_at_a_time(table, "tau", method="semla")
    assert taus["tau"].tolist() == [0.05, 0.2] and (taus["k"] == 5).all()
    assert one_at_a_time(table, "metric")["metric"].tolist() == ["euclidean", "cosine"]
    assert len(one_at_a_time(table, "k", defaults=EvalConfig(tau=0.2))) == 3
    with pytest.raises(ValueError):
        one_at_a_time(table, "batch_size")


def test_one_at_a_time_with_two_knobs():
    rows = [{"k": k, "tau": 0.05, "metric": "euclidean", "weighting": wt, "fusion": "cat", "method": "semla",
             "hmean": k} for k in (3, 1) for wt in ("softmax", "uniform")]
    rows.append({**rows[0], "fusion": "linear"})
    grid = one_at_a_time(pd.DataFrame(rows), ["k", "weighting"])
    assert len(grid) == 4 and grid["k"].tolist() == [1, 1, 3, 3]
    assert grid.pivot(index="k", columns="weighting", values="hmean").shape == (2, 2)


def test_masks_miou_scores_each_mask():
    label = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    masks = {"perfect": label.clamp(max=1), "swapped": 1 - label.clamp(max=1), "half": torch.zeros(2, 4)}
    scores = masks_miou(masks, label, 2)
    assert list(scores.index) == ["perfect", "swapped", "half"]
    assert scores["perfect"] == pytest.approx(100.0) and scores["swapped"] == pytest.approx(0.0)
    assert scores["half"] == pytest.approx(50 * 4 / 7)            # class 0: 4/7, class 1: 0/3


def test_method_masks_zero_shot_semla_and_oracle(tiny_segmenter, tiny_clip_random, tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False)
    lib = AdapterLibrary.create(tmp_path / "lib", tiny_clip_random.identity(True), None,
                                {"r": 2, "lora_alpha": 4, "target_modules": LORA_TARGETS})
    for i, name in enumerate(["d0", "d1", "d2"]):
        torch.manual_seed(i)
        model = get_peft_model(copy.deepcopy(tiny_segmenter), cfg)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.3)
        model.save_pretrained(tmp_path / name, save_embedding_layers=False)
        lib.add(name, tmp_path / name, torch.nn.functional.normalize(torch.randn(64), dim=0), 10)
    predictor = SemLAPredictor(tiny_segmenter, tiny_clip_random, lib, RetrievalConfig(k=1), device="cpu")
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    classes = ["road", "sky", "car"]
    predictor.set_image(image, exclude=["d0"])
    masks = method_masks(predictor, classes, oracle="d0")
    assert list(masks) == ["zero-shot", "SemLA", "oracle"]
    assert all(m.shape == (64, 64) for m in masks.values())
    assert torch.equal(masks["zero-shot"], predictor.predict(classes, adapt=False))
    chosen = predictor.explain()[0][0]                                   # k=1: SemLA == that domain's oracle
    assert chosen != "d0"
    assert torch.equal(masks["SemLA"], method_masks(predictor, classes, oracle=chosen)["oracle"])
    assert list(method_masks(predictor, classes)) == ["zero-shot", "SemLA"]
