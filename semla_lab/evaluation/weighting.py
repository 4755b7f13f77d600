"""SemLA's fusion weights under K and tau (notebook 05): the weights softmax((1/d)/tau) over tau
(`weights_vs_tau`), the effective number of adapters 1/sum(w^2), and one image's choice and mask at any K and
tau with the predictor's other retrieval options (`semla_with`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..core.retrieval import softmax_weights
from .methods import masks_miou


def weights_vs_tau(d_topk: torch.Tensor, taus: Sequence[float], names: Sequence[str] | None = None) -> pd.DataFrame:
    """SemLA weights softmax((1/d)/tau) of K retrieved distances (K,) for each tau:
    rows tau, columns the K names (default rank 1..K)."""
    d = torch.as_tensor(d_topk, dtype=torch.float64).reshape(1, -1)
    cols = list(names) if names is not None else [f"rank {i + 1}" for i in range(d.shape[1])]
    rows = [softmax_weights(d, float(t))[0].numpy() for t in taus]
    return pd.DataFrame(rows, index=pd.Index(list(taus), name="tau"), columns=cols)


def effective_number(weights: torch.Tensor | np.ndarray | pd.DataFrame) -> np.ndarray:
    """1 / sum(w^2) along the last axis: 1 for hard selection, K for uniform weights over K."""
    w = np.asarray(weights, dtype=np.float64)
    return 1.0 / (w ** 2).sum(-1)


def semla_with(predictor, image, class_names: Sequence[str], k: int, tau: float, exclude: Sequence[str] = (),
               label: torch.Tensor | None = None) -> dict:
    """SemLA on one image with K adapters and temperature tau (the predictor's other settings kept, and
    restored after): {"chosen": [(domain, distance, weight)], "mask": (H, W), "n_eff": effective number of
    adapters, "miou": mIoU against `label` (None without)}."""
    saved = predictor.config
    predictor.config = dataclasses.replace(saved, k=k, tau=tau)
    try:
        predictor.set_image(image, exclude=exclude)
        chosen, mask = predictor.explain(), predictor.predict(list(class_names))
    finally:
        predictor.config = saved
    miou = None if label is None else float(masks_miou({"SemLA": mask}, label, len(class_names))["SemLA"])
    return {"chosen": chosen, "mask": mask, "n_eff": float(effective_number([w for _, _, w in chosen])), "miou": miou}
