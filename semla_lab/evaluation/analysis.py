"""Analysis helpers for notebooks 04-06: the CLIP embedding space of the domains, retrieval weights,
LoRA fusion by hand, and slicing ablation tables.

Embedding space: embed_domains -> group_means (centroids) -> pca_project / umap_project (2-D views),
distance_matrix, nearest_centroid_confusion, top_confusions, compare_centroids.
Retrieval: weights_vs_tau, effective_number.
Fusion: lora_modules, lora_factors, fuse_by_hand (the reference dW = sum_i w_i s_i B_i A_i),
linear_cross_terms, fused_layer_delta (the package's FusedAdapters), peft_layer_delta (peft).
Predictions: method_masks (methods.py's registry on one image), masks_miou, semla_with (one image at
any K and tau: notebook 05's explorer).
Ablations: one_at_a_time.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..core.errors import UnknownNameError, UsageError
from ..core.retrieval import distances, softmax_weights


# ---- embedding space ------------------------------------------------------------------------------

def embed_domains(clip, domains: Sequence[str], split: str = "train", count: int = 60,
                  normalize: bool = True) -> tuple[torch.Tensor, list[str]]:
    """The first `count` images of `split` of each shipped domain, embedded by `clip`.
    Returns embeddings (N, D) (L2-normalised when `normalize`) and one domain name per row."""
    from ..models.clip import embed_images
    from ..data.world.generate import generate, get_domain
    embs, labels = [], []
    for name in domains:
        embs.append(embed_images(clip, generate(get_domain(name), split, count).images, normalize=normalize))
        labels += [name] * len(embs[-1])
    return torch.cat(embs), labels


def group_means(embeddings: torch.Tensor, labels: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Per-label mean of embeddings (N, D): names in order of first appearance and centroids (L, D).
    Like the library, centroids are the plain mean (not re-normalised)."""
    if len(labels) != len(embeddings):
        raise UsageError(f"got {len(labels)} labels for {len(embeddings)} embeddings")
    names = list(dict.fromkeys(labels))
    lab = np.asarray(labels)
    return names, torch.stack([embeddings[torch.from_numpy(lab == n)].mean(0) for n in names])


def pca_project(points: torch.Tensor, extra: torch.Tensor | None = None, k: int = 2
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """PCA fitted on points (N, D) by SVD: (points (N, k), extra projected the same way (M, k) or None,
    explained-variance ratio of the k components (k,)). Component signs are fixed (largest loading
    positive) so the picture does not flip between runs."""
    x = points.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = vh[:k]
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * sign
    ratio = (s[:k] ** 2 / (s ** 2).sum()).numpy()
    proj = lambda t: ((t.double() - mean) @ comps.T).numpy()
    return proj(x), None if extra is None else proj(extra), ratio


def umap_project(points: torch.Tensor, extra: torch.Tensor | None = None, n_neighbors: int = 15,
                 min_dist: float = 0.1, random_state: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """2-D UMAP of points (N, D) and `extra` (M, D) (e.g. centroids), fitted jointly on both.
    Deterministic (fixed random_state, one thread). The first call in a process compiles numba
    code (~20 s); NUMBA_CACHE_DIR is pointed at a writable folder before umap is imported."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "semla_numba_cache"))
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*overridden.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        import umap
        x = points if extra is None else torch.cat([points, extra])
        reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist,
                            random_state=random_state, n_jobs=1)
        out = reducer.fit_transform(x.double().numpy())
    return out[:len(points)], None if extra is None else out[len(points):]


def distance_matrix(a: torch.Tensor, names_a: Sequence[str], b: torch.Tensor | None = None,
                    names_b: Sequence[str] | None = None, metric: str = "euclidean") -> pd.DataFrame:
    """Distances between rows of a (L, D) and b (M, D) (default: a itself) as a labelled DataFrame."""
    b, names_b = (a, names_a) if b is None else (b, names_b)
    d = distances(a, b, metric).numpy()
    return pd.DataFrame(d, index=list(names_a), columns=list(names_b))


def nearest_centroid_confusion(queries: torch.Tensor, query_labels: Sequence[str], centroids: torch.Tensor,
                               names: Sequence[str], metric: str = "euclidean") -> tuple[float, pd.DataFrame]:
    """Assign each query (Q, D) to its nearest centroid. Returns the accuracy (fraction of queries
    whose nearest centroid carries their own label) and the confusion matrix as row fractions
    (rows: true domain, columns: nearest centroid; rows in order of first appearance)."""
    names = list(names)
    pred = distances(queries, centroids, metric).argmin(1).numpy()
    truth = list(dict.fromkeys(query_labels))
    conf = pd.DataFrame(0.0, index=truth, columns=names)
    for lab, p in zip(query_labels, pred):
        conf.loc[lab, names[p]] += 1
    hits = sum(names[p] == lab for lab, p in zip(query_labels, pred))
    return hits / len(pred), conf.div(conf.sum(axis=1), axis=0)


def top_confusions(confusion: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """The n largest off-diagonal entries of a confusion DataFrame: columns true, predicted, fraction."""
    rows = [(t, p, float(confusion.loc[t, p])) for t in confusion.index for p in confusion.columns
            if t != p and confusion.loc[t, p] > 0]
    rows.sort(key=lambda r: (-r[2], r[0], r[1]))
    return pd.DataFrame(rows[:n], columns=["true", "predicted", "fraction"])


def compare_centroids(ours: torch.Tensor, reference: torch.Tensor, names: Sequence[str],
                      metric: str = "euclidean") -> pd.DataFrame:
    """Per domain: distance from our centroid to the reference centroid of the same domain, and to
    the nearest reference centroid of another domain (a small `to own` next to a large `to nearest
    other` means the two estimates agree well enough for retrieval)."""
    d = distances(ours, reference, metric)
    names = list(names)
    own = d.diagonal()
    other = d + torch.diag(torch.full((len(names),), float("inf")))
    return pd.DataFrame({"to own": own.numpy(), "to nearest other": other.min(1).values.numpy(),
                         "nearest other": [names[i] for i in other.argmin(1).tolist()]}, index=names)


# ---- retrieval weights ----------------------------------------------------------------------------

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


# ---- LoRA fusion ----------------------------------------------------------------------------------

def lora_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Module paths (e.g. 'visual.transformer.resblocks.0.attn.in_proj') of a peft LoRA state dict."""
    from ..core.fusion import _module_path
    return sorted({_module_path(k)[0] for k in state})


def lora_factors(state: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) of one module from a peft LoRA state dict."""
    from ..core.fusion import _module_path
    found = {}
    for key, t in state.items():
        path, which = _module_path(key)
        if path == module:
            found[which] = t.float()
    if set(found) != {"A", "B"}:
        raise UnknownNameError(f"no LoRA factors for module {module!r}; modules: {lora_modules(state)[:4]} ...")
    return found["A"], found["B"]


def _stack(As, Bs, weights, scalings):
    A, B = torch.stack([a.double() for a in As]), torch.stack([b.double() for b in Bs])   # (K, r, in), (K, out, r)
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    s = torch.as_tensor(scalings, dtype=torch.float64).reshape(-1).expand_as(w)
    if not len(w) == len(A) == len(B):
        raise UsageError(f"got {len(A)} A's, {len(B)} B's and {len(w)} weights")
    return A, B, w * s


def fuse_by_hand(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights, scalings,
                 fusion: str = "cat") -> torch.Tensor:
    """Reference weight delta (out, in), float64, of K adapters on one Linear.
    cat (SemLA, peft "cat"): dW = sum_i w_i s_i B_i A_i.
    linear (peft "linear"): dW = (sum_i sqrt(w_i s_i) B_i) (sum_j sqrt(w_j s_j) A_j) (w_i s_i >= 0)."""
    A, B, c = _stack(As, Bs, weights, scalings)
    if fusion == "cat":
        return torch.einsum("k,kor,kri->oi", c, B, A)
    if fusion == "linear":
        root = c.abs().sqrt()
        return torch.einsum("k,kor->or", root, B) @ torch.einsum("k,kri->ri", root * c.sign(), A)
    raise UsageError(f"unknown fusion {fusion!r}; expected 'cat' or 'linear'")


def linear_cross_terms(As, Bs, weights, scalings) -> dict[str, torch.Tensor]:
    """Split peft's linear delta into its 'diagonal' part sum_i w_i s_i B_i A_i (= cat) and the cross
    terms sum_{i != j} sqrt(w_i s_i w_j s_j) B_i A_j that cat does not have: {'diagonal', 'cross',
    'linear'} (out, in) each, with linear = diagonal + cross."""
    A, B, c = _stack(As, Bs, weights, scalings)
    root = c.sqrt()
    pair = torch.einsum("aor,bri->aboi", B, A)                                # (K, K, out, in): B_a A_b
    coef = root[:, None] * root[None, :]                                      # (K, K)
    eye = torch.eye(len(c), dtype=torch.bool)
    diagonal = torch.einsum("ab,aboi->oi", coef * eye, pair)
    cross = torch.einsum("ab,aboi->oi", coef * ~eye, pair)
    return {"diagonal": diagonal, "cross": cross, "linear": diagonal + cross}


def fused_layer_delta(fused, module: str, indices: Sequence[int], weights: Sequence[float],
                      fusion: str = "cat") -> torch.Tensor:
    """The weight delta (out, in) that the package's FusedAdapters applies on one layer for one image
    with adapters `indices` (K,) and `weights` (K,): the layer is probed with the identity matrix,
    dW^T = layer(I) - base(I)."""
    layer = fused.model.get_submodule(module)
    eye = torch.eye(layer.base.in_features, device=layer.A.device)[None]       # (1, in, in)
    idx = torch.as_tensor(list(indices)).view(1, -1)
    w = torch.as_tensor(list(weights), dtype=torch.float32).view(1, -1)
    with fused.select(idx, w, fusion), torch.no_grad():
        delta = layer(eye) - layer.base(eye)                                  # (1, in, out)
    return delta[0].T.cpu()


def peft_layer_delta(peft_model, adapters: Sequence[str], weights: Sequence[float], module: str,
                     combination_type: str = "cat") -> torch.Tensor:
    """peft's own weight delta (out, in) on one layer after add_weighted_adapter(adapters, weights,
    combination_type); the temporary adapter is deleted again."""
    name = "_probe"
    peft_model.add_weighted_adapter(list(adapters), [float(w) for w in weights], name,
                                    combination_type=combination_type)
    try:
        with torch.no_grad():
            return peft_model.base_model.model.get_submodule(module).get_delta_weight(name).detach().cpu()
    finally:
        peft_model.delete_adapter(name)


# ---- predictions -------------------------------------------------------------------------------

def method_masks(predictor, class_names: Sequence[str], oracle: str | None = None,
                 methods: Sequence[str] = ("zero_shot", "semla", "oracle")) -> dict[str, torch.Tensor]:
    """(H, W) predictions of `methods` (methods.py) for a SemLAPredictor's current image (after
    set_image), keyed by display label ("zero-shot", "SemLA", ...), with its retrieval and fusion; the
    oracle uses the adapter of the library domain `oracle` and is left out when that is None."""
    from ..models.clip import embed_class_names
    from .methods import LABELS, Batch, method_logits
    batch = Batch(predictor.model, predictor.image[None], embed_class_names(predictor.clip, list(class_names)),
                  predictor.retrieval, own=oracle, fusion=predictor.fusion)
    masks = {}
    for m in methods:
        logits = method_logits(m, batch)
        if logits is not None:
            masks[LABELS[m]] = logits[0].argmax(0).cpu()
    return masks


def masks_miou(masks: dict[str, torch.Tensor], label: torch.Tensor, num_classes: int) -> pd.Series:
    """mIoU (0-100) of each (H, W) mask against one label map (255 = ignore)."""
    from ..core.metrics import MIoU
    out = {}
    for name, mask in masks.items():
        meter = MIoU(num_classes)
        meter.update(mask.long(), label.long())
        out[name] = meter.compute()["miou"]
    return pd.Series(out, name="mIoU")


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


# ---- ablations ------------------------------------------------------------------------------------

def one_at_a_time(table: pd.DataFrame, knob: str | Sequence[str], defaults=None, method: str | None = None
                  ) -> pd.DataFrame:
    """Rows of a run_ablation table where every knob except `knob` (one name or several) keeps its
    default value (EvalConfig() unless given), sorted by the varied knob(s); optionally one method."""
    from .experiments import EvalConfig
    defaults = defaults or EvalConfig()
    varied = [knob] if isinstance(knob, str) else list(knob)
    knobs = [f.name for f in dataclasses.fields(defaults) if f.name not in ("batch_size", "max_images")]
    unknown = [k for k in varied if k not in knobs]
    if unknown:
        raise UsageError(f"unknown knob(s) {unknown}; knobs: {knobs}")
    keep = pd.Series(True, index=table.index)
    for k in knobs:
        if k not in varied and k in table:
            keep &= table[k] == getattr(defaults, k)
    if method is not None:
        keep &= table["method"] == method
    out = table[keep]
    numeric = [k for k in varied if pd.api.types.is_numeric_dtype(out[k])]
    if numeric:
        out = out.sort_values(numeric, kind="stable")
    return out.reset_index(drop=True)
