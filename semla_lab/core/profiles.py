"""Domain profiles: what retrieval may know about a library domain beyond its centroid (notebook 10).

The paper indexes each domain by one vector, the mean CLIP embedding of its training images. A profile adds,
fitted on the same embeddings (N, D):

  index kinds (how far is a query x from the domain?)
    centroid   ||x - c||, the paper's distance
    kmeans:P   P k-means prototypes m_1..m_P (sklearn KMeans): min_p ||x - m_p||
    gmm:P      a P-component diagonal-covariance Gaussian mixture (sklearn GaussianMixture), its negative
               log-likelihood rescaled to a Euclidean-equivalent length:
                   d(x) = sqrt(2 s^2 max(0, NLL(x) - NLL*))
               s^2 the mixture's mean variance (components weighted by their mixing weights, averaged over
               dimensions), NLL* the smallest NLL at a component mean. With one isotropic component of
               variance s^2, d(x) = ||x - mu|| exactly, so gmm distances live on the centroid's scale and
               SemLA's softmax(1 / d / tau) weights keep their meaning.
  coverage     per index kind, the `quantile` (default 0.95) of the domain's own training images' distances:
               the radius inside which the domain's adapter was trained (coverage fallback, retrieval.py).
  vocabulary   the mean of the domain's L2-normalised class-name embeddings, re-normalised (D,): the text
               side of text-aware retrieval.

Pure math on tensors; library/index.py stores profiles, retrieval.py searches them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError

KINDS = ("centroid", "kmeans", "gmm")
COVERAGE_QUANTILE = 0.95
GMM_REG_COVAR = 1e-4       # variance floor added by sklearn to each diagonal entry (embeddings are unit-norm)
_KIND = re.compile(r"(centroid|kmeans|gmm)(?::(-?\d+))?")


def parse_index(kind: object) -> tuple[str, int]:
    """'centroid' -> ('centroid', 1); 'kmeans:4' -> ('kmeans', 4); 'gmm:4' -> ('gmm', 4)."""
    m = _KIND.fullmatch(kind) if isinstance(kind, str) else None
    if m is None or (m.group(1) == "centroid") != (m.group(2) is None):
        raise UsageError(f"unknown index kind {kind!r}; expected 'centroid', 'kmeans:P' or 'gmm:P' (P prototypes "
                         "per domain, e.g. kmeans:4)")
    p = int(m.group(2) or 1)
    if p <= 0:
        raise UsageError(f"index {kind!r}: P (prototypes per domain) must be >= 1, got {p}")
    return m.group(1), p


@dataclass
class DomainProfile:
    """One domain's profile. `centroid` (D,) is the library centroid it was fitted with (a profile whose
    centroid differs from the library's is stale); `models[kind]` holds that kind's tensors; `coverage[kind]`
    its radius; `vocabulary` (D,) or None."""
    centroid: torch.Tensor
    num_images: int
    models: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    coverage: dict[str, float] = field(default_factory=dict)
    vocabulary: torch.Tensor | None = None

    @property
    def kinds(self) -> list[str]:
        return ["centroid", *self.models]


def fit_kmeans(embeddings: torch.Tensor, p: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """{'means': (P, D)} k-means prototypes of embeddings (N, D)."""
    from sklearn.cluster import KMeans
    x = embeddings.double().numpy()
    km = KMeans(n_clusters=p, n_init=4, random_state=seed).fit(x)
    return {"means": torch.from_numpy(km.cluster_centers_).float()}


def fit_gmm(embeddings: torch.Tensor, p: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A diagonal-covariance mixture of embeddings (N, D): means and variances (P, D), log_weights (P,), and
    the rescaling constants scale2 (s^2) and nll_floor (NLL*) of the module docstring, each (1,)."""
    from sklearn.mixture import GaussianMixture
    x = embeddings.double().numpy()
    gm = GaussianMixture(p, covariance_type="diag", reg_covar=GMM_REG_COVAR, random_state=seed).fit(x)
    params = {"means": torch.from_numpy(gm.means_).float(), "variances": torch.from_numpy(gm.covariances_).float(),
              "log_weights": torch.from_numpy(np.log(gm.weights_)).float()}
    scale2 = float((gm.weights_[:, None] * gm.covariances_).sum(0).mean())
    nll = gmm_nll(params["means"], {k: v[None] for k, v in params.items()})[:, 0]   # at each component mean
    params.update(scale2=torch.tensor([scale2]), nll_floor=nll.min().reshape(1))
    return params


def gmm_nll(queries: torch.Tensor, stacked: dict[str, torch.Tensor]) -> torch.Tensor:
    """(Q, L) negative log-likelihood of queries (Q, D) under L diagonal mixtures: means and variances
    (L, P, D), log_weights (L, P). Expanded as sum x^2 / v - 2 x (m / v) + sum m^2 / v: three matmuls."""
    q = queries.double()
    mu, var, logw = stacked["means"].double(), stacked["variances"].double(), stacked["log_weights"].double()
    n, p, d = mu.shape
    inv = (1 / var).reshape(n * p, d)                                                   # (LP, D)
    maha = (q * q) @ inv.T - 2 * q @ (mu.reshape(n * p, d) * inv).T + (mu * mu).reshape(n * p, d).mul(inv).sum(1)
    log_norm = -0.5 * (d * math.log(2 * math.pi) + var.log().sum(-1)).reshape(n * p)   # (LP,)
    log_comp = (logw.reshape(n * p) + log_norm - 0.5 * maha.clamp_min(0)).view(len(q), n, p)
    return -torch.logsumexp(log_comp, dim=-1).to(queries.dtype)


def kind_distances(queries: torch.Tensor, kind: str, stacked: dict[str, torch.Tensor]) -> torch.Tensor:
    """(Q, L) distances from queries (Q, D) to L domains of one index kind, from their stacked tensors
    (means (L, P, D), and the gmm parameters)."""
    name, _ = parse_index(kind)
    means = stacked["means"]
    if name == "gmm":
        excess = (gmm_nll(queries, stacked) - stacked["nll_floor"].reshape(1, -1)).clamp_min(0)
        return (2 * stacked["scale2"].reshape(1, -1) * excess).sqrt()
    n, p, d = means.shape
    flat = torch.cdist(queries, means.reshape(n * p, d).to(queries.dtype), compute_mode="donot_use_mm_for_euclid_dist")
    return flat.view(len(queries), n, p).amin(-1)


def vocabulary_embedding(text: torch.Tensor) -> torch.Tensor:
    """(D,) the mean of L2-normalised class-name embeddings (T, D), re-normalised: a vocabulary as one vector."""
    return F.normalize(F.normalize(text.float(), dim=-1).mean(0), dim=0)


def fit_profile(embeddings: torch.Tensor, centroid: torch.Tensor, kinds=(), quantile: float = COVERAGE_QUANTILE,
                vocabulary: torch.Tensor | None = None, seed: int = 0) -> DomainProfile:
    """A domain's profile from its training embeddings (N, D) and library centroid (D,): the models of `kinds`
    (e.g. ['kmeans:4', 'gmm:4']), each kind's coverage radius (the centroid's too) at `quantile`, and the
    vocabulary embedding of its class-name embeddings (T, D) when given."""
    if not 0 < quantile <= 1:
        raise UsageError(f"coverage quantile must be in (0, 1], got {quantile}")
    x = embeddings.float()
    profile = DomainProfile(centroid.float().clone(), len(x))
    for kind in ["centroid", *kinds]:
        name, p = parse_index(kind)
        if p > len(x):
            raise UsageError(f"index {kind!r} needs at least {p} images per domain, got {len(x)}")
        if name == "kmeans":
            profile.models[kind] = fit_kmeans(x, p, seed)
        elif name == "gmm":
            profile.models[kind] = fit_gmm(x, p, seed)
        own = (torch.cdist(x, centroid.float()[None])[:, 0] if name == "centroid" else
               kind_distances(x, kind, {k: v[None] for k, v in profile.models[kind].items()})[:, 0])
        profile.coverage[kind] = float(torch.quantile(own.double(), quantile))
    if vocabulary is not None:
        profile.vocabulary = vocabulary_embedding(vocabulary)
    return profile


def stack(profiles: list[DomainProfile], kind: str) -> dict[str, torch.Tensor]:
    """One index kind's tensors of L profiles stacked along a new first dim (means (L, P, D), ...)."""
    if kind == "centroid":
        return {"means": torch.stack([p.centroid for p in profiles])[:, None]}
    return {key: torch.stack([p.models[kind][key] for p in profiles]) for key in profiles[0].models[kind]}
