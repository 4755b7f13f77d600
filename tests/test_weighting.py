"""weighting.py: weights over tau, and one image at any K and tau (notebook 05)."""

import numpy as np
import pytest
import torch

from semla_lab.evaluation.weighting import effective_number, semla_with, weights_vs_tau
from semla_lab.core.retrieval import RetrievalConfig


def test_weights_vs_tau_goes_from_hard_to_uniform():
    d = torch.tensor([0.30, 0.32, 0.40, 0.50])
    table = weights_vs_tau(d, [0.01, 0.05, 1.0, 1e4], names=list("wxyz"))
    assert list(table.columns) == list("wxyz") and list(table.index) == [0.01, 0.05, 1.0, 1e4]
    assert np.allclose(table.sum(axis=1), 1.0)
    assert table.loc[0.01, "w"] > 0.999                        # logit gap (1/0.30 - 1/0.32) / 0.01 = 20.8
    assert (np.diff(table.loc[0.05].values) < 0).all()         # nearer always weighs more
    assert np.allclose(table.loc[1e4].values, 0.25, atol=1e-3)
    n_eff = effective_number(table)
    assert n_eff[0] == pytest.approx(1.0, abs=1e-3) and n_eff[-1] == pytest.approx(4.0, abs=1e-2)
    assert (np.diff(n_eff) > 0).all()
    assert list(weights_vs_tau(d[:2], [0.1]).columns) == ["rank 1", "rank 2"]


def test_semla_with_keeps_the_predictors_other_retrieval_options():
    """Only K and tau change for the call: index, fallback and text weight stay; the config is restored."""
    class Recorder:
        config = RetrievalConfig(index="kmeans:4", fallback="coverage", fallback_strength=2.0, text_weight=0.3)
        seen = []

        def set_image(self, image, exclude=()):
            self.seen.append(self.config)

        def explain(self):
            return [("d0", 0.1, 1.0)]

        def predict(self, class_names):
            return torch.zeros(2, 2, dtype=torch.long)

    predictor = Recorder()
    saved = predictor.config
    out = semla_with(predictor, None, ["road"], k=3, tau=0.2)
    assert predictor.seen == [RetrievalConfig(3, 0.2, index="kmeans:4", fallback="coverage", fallback_strength=2.0,
                                              text_weight=0.3)]
    assert predictor.config is saved and out["n_eff"] == 1.0 and out["miou"] is None
