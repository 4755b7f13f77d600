"""SemLA retrieval math: distances to domain centroids, top-K selection, fusion weights.

Conventions: query embeddings (Q, D), library centroids (L, D), one name per centroid;
a "distance" is non-negative and smaller = nearer. The K retrieved adapters of a query are
sorted nearest first and get weights w = softmax((1 / d) / tau) over the K (paper and official code).

Beyond the paper (`DomainIndex`, notebook 10), three options of RetrievalConfig, each off by default:
  index="kmeans:P" | "gmm:P"   distance to a domain's nearest prototype, or its scaled GMM likelihood
                               (profiles.py), instead of the distance to its centroid.
  text_weight=lambda in [0, 1] d = (1 - lambda) d_image + lambda d_text, d_text = || t - v_l || between the
                               test-time vocabulary embedding t and domain l's vocabulary embedding v_l.
  fallback="coverage"          the base model enters the fusion as a null adapter. Each retrieved adapter k
                               keeps the share of its weight that its coverage allows,
                                   w'_k = w_k exp(-beta max(0, d_k / r_k - 1)),
                               d_k the image distance (of the index kind), r_k the domain's coverage radius,
                               beta = fallback_strength; the null adapter gets w_0 = 1 - sum_k w'_k. Inside
                               every radius nothing changes; an infinite radius or beta = 0 is plain SemLA.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .errors import UsageError
from .profiles import DomainProfile, kind_distances, parse_index, stack

METRICS = ("euclidean", "cosine")
WEIGHTINGS = ("softmax", "uniform")
FALLBACKS = ("none", "coverage")
EPS = 1e-8   # distances are clamped to this before 1/d, so an exact match gets ~all the weight


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise UsageError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not torch.isfinite(t).all():
        raise UsageError(f"{name} contains NaN or inf")


def distances(queries: torch.Tensor, centroids: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """(Q, L) distances from queries (Q, D) or one query (D,) to centroids (L, D).

    "euclidean": L2 distance (the paper's default). "cosine": 1 - cosine similarity, in [0, 2],
    so the most similar centroid is the nearest. (The official SemLA code sorts cosine
    similarities ascending like distances, i.e. picks the least similar; we do not.)
    """
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if queries.dim() == 1:
        queries = queries.unsqueeze(0)
    if queries.dim() != 2 or centroids.dim() != 2:
        raise UsageError(f"expected queries (Q, D) and centroids (L, D), got shapes "
                         f"{tuple(queries.shape)} and {tuple(centroids.shape)}")
    if centroids.shape[0] == 0:
        raise UsageError("empty library: centroids has L == 0 rows")
    if queries.shape[1] != centroids.shape[1]:
        raise UsageError(f"dimension mismatch: queries have D={queries.shape[1]}, "
                         f"centroids have D={centroids.shape[1]}")
    _check_finite(queries, "queries")
    _check_finite(centroids, "centroids")
    dtype = torch.promote_types(queries.dtype, centroids.dtype)
    queries, centroids = queries.to(dtype), centroids.to(dtype)
    if metric == "euclidean":
        return torch.cdist(queries, centroids, compute_mode="donot_use_mm_for_euclid_dist")
    for name, t in (("queries", queries), ("centroids", centroids)):
        if (t.norm(dim=1) == 0).any():
            raise UsageError(f"cosine distance undefined: {name} contains a zero vector")
    sim = F.normalize(queries, dim=1) @ F.normalize(centroids, dim=1).T
    return (1 - sim).clamp(0, 2)


def top_k(dist: torch.Tensor, k: int, exclude: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """K smallest distances per row of dist (Q, L), ascending: (values (Q, K), indices (Q, K)).

    ``exclude`` is a bool (L,) mask of entries that may not be chosen. Ties go to the lower index.
    """
    if dist.dim() != 2:
        raise UsageError(f"dist must be (Q, L), got shape {tuple(dist.shape)}")
    if dist.isnan().any():
        raise UsageError("dist contains NaN")
    n = dist.shape[1]
    if exclude is None:
        exclude = torch.zeros(n, dtype=torch.bool)
    if exclude.dtype != torch.bool or exclude.shape != (n,):
        raise UsageError(f"exclude must be a bool mask of shape ({n},), got {exclude.dtype} "
                         f"{tuple(exclude.shape)}")
    allowed = (~exclude).nonzero().squeeze(1).to(dist.device)
    if k <= 0 or k > allowed.numel():
        raise UsageError(f"k={k} must be in [1, {allowed.numel()}] (library entries not excluded)")
    values, pos = torch.sort(dist[:, allowed], dim=1, stable=True)
    return values[:, :k], allowed[pos[:, :k]]


def softmax_weights(d_topk: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """(Q, K) fusion weights softmax((1 / d) / tau) over the last dim; rows sum to 1.

    d is clamped to EPS first: an exact match (d == 0) takes ~all the weight, tied exact matches
    share it. Computed in float64, returned in the input dtype.
    """
    if not tau > 0:
        raise UsageError(f"tau must be > 0, got {tau}")
    _check_finite(d_topk, "d_topk")
    if (d_topk < 0).any():
        raise UsageError(f"distances must be >= 0, got min {float(d_topk.min())}")
    return _softmax_weights(d_topk, tau)


def _softmax_weights(d_topk: torch.Tensor, tau: float) -> torch.Tensor:
    """`softmax_weights` without input checks, for distances the caller computed itself."""
    logits = 1.0 / d_topk.double().clamp(min=EPS) / tau
    return torch.softmax(logits, dim=-1).to(d_topk.dtype)


def uniform_weights(q: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q, k) weights, all 1 / k."""
    if q < 0 or k < 1:
        raise UsageError(f"uniform_weights needs q >= 0 and k >= 1, got q={q}, k={k}")
    return torch.full((q, k), 1.0 / k, dtype=dtype)


@dataclass(frozen=True)
class RetrievalConfig:
    """k adapters per query, softmax temperature tau, distance metric, weighting scheme; and the options
    beyond the paper (module docstring), whose defaults are the paper."""
    k: int = 5
    tau: float = 0.05
    metric: str = "euclidean"
    weighting: str = "softmax"
    index: str = "centroid"          # or "kmeans:P", "gmm:P" (profiles.py)
    fallback: str = "none"           # or "coverage": the base model as a null adapter outside coverage
    fallback_strength: float = 1.0   # beta of the coverage fallback
    text_weight: float = 0.0         # lambda: share of the text distance (0 = the paper)

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise UsageError(f"k must be an int >= 1, got {self.k!r}")
        if not self.tau > 0:
            raise UsageError(f"tau must be > 0, got {self.tau}")
        if self.metric not in METRICS:
            raise UsageError(f"unknown metric {self.metric!r}; expected one of {METRICS}")
        if self.weighting not in WEIGHTINGS:
            raise UsageError(f"unknown weighting {self.weighting!r}; expected one of {WEIGHTINGS}")
        parse_index(self.index)
        if self.index != "centroid" and self.metric != "euclidean":
            raise UsageError(f"index {self.index!r} measures Euclidean distances; use metric 'euclidean'")
        if self.fallback not in FALLBACKS:
            raise UsageError(f"unknown fallback {self.fallback!r}; expected one of {FALLBACKS}")
        if not (isinstance(self.fallback_strength, (int, float)) and 0 <= self.fallback_strength < float("inf")):
            raise UsageError(f"fallback_strength must be a finite number >= 0, got {self.fallback_strength!r}")
        if not (isinstance(self.text_weight, (int, float)) and 0 <= self.text_weight <= 1):
            raise UsageError(f"text_weight (lambda) must lie in [0, 1], got {self.text_weight!r}")

    @property
    def is_paper(self) -> bool:
        """True when no option beyond the paper is on."""
        return self.index == "centroid" and self.fallback == "none" and self.text_weight == 0

    @property
    def label(self) -> str:
        """'semla', or 'semla+<options>' naming the options beyond the paper that are on."""
        parts = ([self.index] if self.index != "centroid" else []) + \
                ([f"coverage{self.fallback_strength:g}"] if self.fallback == "coverage" else []) + \
                ([f"text{self.text_weight:g}"] if self.text_weight else [])
        return "+".join(["semla", *parts])


@dataclass
class Retrieval:
    """Result for Q queries: indices (Q, K) long into the library, nearest first; weights (Q, K);
    distances (Q, L) to every library entry; names (L,) in library order. With the coverage fallback,
    base_weights (Q,) is the null adapter's (the base model's) weight, and weights sum to 1 - base_weights."""
    indices: torch.Tensor
    weights: torch.Tensor
    distances: torch.Tensor
    names: list[str]
    base_weights: torch.Tensor | None = None

    def chosen(self, q: int) -> list[tuple[str, float, float]]:
        """(name, distance, weight) of the adapters retrieved for query q, nearest first."""
        return [(self.names[i], float(self.distances[q, i]), float(w))
                for i, w in zip(self.indices[q].tolist(), self.weights[q])]


def retrieve(queries: torch.Tensor, centroids: torch.Tensor, names: Sequence[str],
             config: RetrievalConfig = RetrievalConfig(), exclude: Iterable[str] = ()) -> Retrieval:
    """Top-K library entries and their fusion weights for queries (Q, D) or (D,).

    ``exclude`` names library entries that may not be chosen (leave-one-out evaluation);
    a single string is taken as one name.
    """
    names = list(names)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    if len(names) != centroids.shape[0]:
        raise UsageError(f"got {len(names)} names for {centroids.shape[0]} centroids")
    if len(set(names)) != len(names):
        raise UsageError(f"library names must be unique, got {names}")
    mask = torch.zeros(len(names), dtype=torch.bool)
    for name in exclude:
        if name not in names:
            raise UsageError(f"cannot exclude unknown library entry {name!r}; known: {names}")
        mask[names.index(name)] = True
    dist = distances(queries, centroids, config.metric)
    d_topk, indices = top_k(dist, config.k, mask)
    if config.weighting == "softmax":
        weights = softmax_weights(d_topk, config.tau)
    else:
        weights = uniform_weights(*indices.shape, dtype=dist.dtype).to(dist.device)
    return Retrieval(indices=indices, weights=weights, distances=dist, names=names)


def checked_exclusion(names: Sequence[str], exclude: Iterable[str] | str, k: int) -> tuple[list[str], int]:
    """The excluded names as a list and how many library entries remain; a UsageError for unknown names or a
    k outside [1, remaining]."""
    excluded = [exclude] if isinstance(exclude, str) else list(exclude)
    unknown = [n for n in excluded if n not in names]
    if unknown:
        raise UsageError(f"cannot exclude unknown library entries {unknown[:3]}")
    available = len(names) - len(set(excluded))
    if not 1 <= k <= available:
        raise UsageError(f"k={k} must be in [1, {available}]: {available} library entries are available "
                         "(not excluded)")
    return excluded, available


class CentroidIndex:
    """A library's centroids validated once and searched many times (libraries of thousands).

    Per query: one GEMM gives approximate squared distances, the K + MARGIN nearest are re-measured
    exactly and stable-sorted, so indices, tie-breaking and weights equal `retrieve` (Euclidean);
    `distances` outside the candidates are the GEMM approximation. Other metrics use `retrieve`.
    The centroids are stored column-major, (D, L): a single query's GEMV then reads them in one
    sequential pass (3x faster on a CPU than over the (L, D) rows at D=512)."""

    MARGIN = 8

    def __init__(self, centroids: torch.Tensor, names: Sequence[str]):
        _check_finite(centroids, "centroids")
        self.names = list(names)
        if len(self.names) != centroids.shape[0] or len(set(self.names)) != len(self.names):
            raise UsageError(f"need one unique name per centroid, got {len(self.names)} names for "
                             f"{centroids.shape[0]} centroids")
        self._columns = centroids.T.contiguous()                                        # (D, L)
        self.sq_norms = (self._columns * self._columns).sum(0)                          # (L,)

    @property
    def centroids(self) -> torch.Tensor:
        """(L, D), a view of the stored columns."""
        return self._columns.T

    def search(self, queries: torch.Tensor, config: RetrievalConfig = RetrievalConfig(),
               exclude: Iterable[str] = ()) -> Retrieval:
        if config.metric != "euclidean":
            return retrieve(queries, self.centroids, self.names, config, exclude)
        q = queries.unsqueeze(0) if queries.dim() == 1 else queries
        _check_finite(q, "queries")
        if q.shape[1] != self.centroids.shape[1]:
            raise UsageError(f"query dimension {q.shape[1]} != centroid dimension {self.centroids.shape[1]}")
        excluded, available = checked_exclusion(self.names, exclude, config.k)
        scores = torch.addmm(self.sq_norms, q, self._columns, alpha=-2)    # squared distance - |q|^2: same order
        if excluded:
            scores[:, [self.names.index(n) for n in excluded]] = float("inf")
        m = min(available, config.k + self.MARGIN)
        cand = torch.topk(scores, m, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
        exact = (q[:, None, :] - self.centroids[cand]).pow(2).sum(-1).sqrt()          # (Q, m)
        vals, pos = exact.sort(dim=1, stable=True)                                      # ties -> lower index
        indices, d_topk = cand.gather(1, pos)[:, :config.k], vals[:, :config.k]
        weights = (_softmax_weights(d_topk, config.tau) if config.weighting == "softmax"
                   else uniform_weights(*indices.shape, dtype=q.dtype).to(q.device))
        d2 = scores.add_((q * q).sum(1, keepdim=True)).clamp_min_(0)
        return Retrieval(indices=indices, weights=weights, distances=d2.sqrt_(), names=self.names)


class DomainIndex:
    """A library's domains as retrieval sees them: centroids (L, D) and, for domains that have one, their
    profile (profiles.py). `search` follows a RetrievalConfig; with the paper's options it is `retrieve`.

    With other options, search works like CentroidIndex: one GEMM over all prototypes (stored column-major,
    (D, L P)) gives approximate distances, the K + MARGIN nearest domains are re-measured exactly (float64 for
    the GMM) and stable-sorted; `distances` outside those candidates keep the approximation."""

    MARGIN = 8

    def __init__(self, centroids: torch.Tensor, names: Sequence[str], profiles: dict[str, DomainProfile] | None = None,
                 where: str = "this library"):
        self.centroids, self.names, self.where = centroids, list(names), where
        if len(self.names) != centroids.shape[0] or len(set(self.names)) != len(self.names):
            raise UsageError(f"need one unique name per centroid, got {len(self.names)} names for "
                             f"{centroids.shape[0]} centroids")
        self.profiles = {n: p for n, p in (profiles or {}).items() if n in self.names}
        self._cache: dict[tuple, object] = {}

    @classmethod
    def from_library(cls, library, names: Sequence[str] | None = None) -> "DomainIndex":
        names = library.names() if names is None else list(names)
        return cls(library.centroids(names), names, library.profiles(), f"library {library.root}")

    def _profiled(self, what: str, has) -> list[DomainProfile]:
        lacking = [n for n in self.names if n not in self.profiles or not has(self.profiles[n])]
        if lacking:
            raise UsageError(f"{self.where} has no {what} for domain(s) {lacking[:5]}" + (" ..." if len(lacking) > 5
                             else "") + "; add them with `semla-lab add-prototypes --library <folder> --index "
                             "<kinds>` (needs the domains' training data)")
        return [self.profiles[n] for n in self.names]

    def _cached(self, key: tuple, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _kind(self, kind: str) -> dict[str, torch.Tensor]:
        """The kind's stacked tensors (profiles.stack) plus what the GEMM pass needs."""
        def build():
            if kind == "centroid":
                st = {"means": self.centroids.float()[:, None]}
            else:
                st = stack(self._profiled(f"{kind!r} index", lambda p: kind in p.kinds), kind)
            n, p, d = st["means"].shape
            flat = st["means"].transpose(0, 1).reshape(p * n, d)     # prototype-major: block j = every domain's j-th
            if parse_index(kind)[0] != "gmm":
                st["columns"] = flat.T.contiguous()                                       # (D, P L)
                st["sq_norms"] = (flat * flat).sum(1)
            else:
                var = st["variances"].transpose(0, 1).reshape(p * n, d)
                inv = 1 / var
                st["inv_columns"] = inv.T.contiguous()
                st["mean_columns"] = (-2 * flat * inv).T.contiguous()
                log_norm = -0.5 * (d * math.log(2 * math.pi) + var.log().sum(-1))
                st["const"] = st["log_weights"].T.reshape(p * n) + log_norm - 0.5 * (flat * flat * inv).sum(1)
            return st
        return self._cached(("kind", kind), build)

    def image_distances(self, queries: torch.Tensor, config: RetrievalConfig = RetrievalConfig()) -> torch.Tensor:
        """(Q, L) exact image distances under config.index (and config.metric for centroids)."""
        if config.index == "centroid":
            return distances(queries, self.centroids, config.metric)
        return kind_distances(self._queries(queries), config.index, self._kind(config.index))

    def _queries(self, queries: torch.Tensor) -> torch.Tensor:
        q = queries.unsqueeze(0) if queries.dim() == 1 else queries
        _check_finite(q, "queries")
        if q.dim() != 2 or q.shape[1] != self.centroids.shape[1]:
            raise UsageError(f"queries must be (Q, {self.centroids.shape[1]}), got {tuple(q.shape)}")
        return q

    def _approx(self, q: torch.Tensor, kind: str) -> torch.Tensor:
        """(Q, L) image distances from one GEMM pass (float32 rounding)."""
        st = self._kind(kind)
        n, p = st["means"].shape[:2]
        if "columns" in st:
            d2 = torch.addmm(st["sq_norms"], q, st["columns"], alpha=-2).view(len(q), p, n)
            d2 = d2[:, 0] if p == 1 else torch.minimum(d2[:, 0], d2[:, 1]) if p == 2 else d2.amin(1)
            return d2.add_((q * q).sum(1, keepdim=True)).clamp_min_(0).sqrt_()
        maha = torch.addmm(q @ st["mean_columns"], q * q, st["inv_columns"])
        nll = -torch.logsumexp((st["const"] - 0.5 * maha).view(len(q), p, n), dim=1)
        return (2 * st["scale2"].view(1, -1) * (nll - st["nll_floor"].view(1, -1)).clamp_min(0)).sqrt()

    def _exact(self, q: torch.Tensor, kind: str, cand: torch.Tensor) -> torch.Tensor:
        """(Q, m) exact image distances of each query to its candidate domains cand (Q, m)."""
        st = self._kind(kind)
        if "columns" in st:
            return (q[:, None, None, :] - st["means"][cand]).pow(2).sum(-1).sqrt().amin(-1)
        qd, mu, var = q.double()[:, None, None, :], st["means"][cand].double(), st["variances"][cand].double()
        log_comp = (st["log_weights"][cand].double() - 0.5 * (math.log(2 * math.pi) * q.shape[1] + var.log().sum(-1))
                    - 0.5 * ((qd - mu) ** 2 / var).sum(-1))
        excess = (-torch.logsumexp(log_comp, -1) - st["nll_floor"].view(-1)[cand].double()).clamp_min(0)
        return (2 * st["scale2"].view(-1)[cand].double() * excess).sqrt().to(q.dtype)

    def radii(self, kind: str) -> torch.Tensor:
        """(L,) coverage radii of the index kind."""
        return self._cached(("radii", kind), lambda: torch.tensor(
            [p.coverage[kind] for p in self._profiled(f"coverage radius of {kind!r}", lambda p: kind in p.coverage)]))

    def text_distances(self, class_text: torch.Tensor) -> torch.Tensor:
        """(L,) distances from the vocabulary embedding of class-name embeddings (T, D) to each domain's."""
        from .profiles import vocabulary_embedding
        vocab = self._cached(("vocabulary",), lambda: torch.stack(
            [p.vocabulary for p in self._profiled("vocabulary embedding", lambda p: p.vocabulary is not None)]))
        return (vocab - vocabulary_embedding(class_text)).norm(dim=1)

    def search(self, queries: torch.Tensor, config: RetrievalConfig = RetrievalConfig(), exclude: Iterable[str] = (),
               class_text: torch.Tensor | None = None) -> Retrieval:
        """Top-K domains and fusion weights for queries (Q, D) or (D,); `class_text` (T, D) are the test-time
        class-name embeddings, needed when config.text_weight > 0."""
        if config.is_paper:
            return retrieve(queries, self.centroids, self.names, config, exclude)
        q = self._queries(queries)
        excluded, available = checked_exclusion(self.names, exclude, config.k)
        lam = config.text_weight
        if lam > 0 and class_text is None:
            raise UsageError("text_weight > 0 needs the test-time class names (class_text)")
        text = self.text_distances(class_text).to(q.dtype) if lam > 0 else None
        mix = (lambda image, txt: image) if text is None else (lambda image, txt: (1 - lam) * image + lam * txt)
        if config.index == "centroid":                       # exact for every domain (also the cosine metric)
            d_image = distances(q, self.centroids, config.metric)
            cand = torch.arange(len(self.names)).expand(len(q), -1)
        else:
            d_image = self._approx(q, config.index)
        dist = mix(d_image, text)
        scores = dist
        if excluded:
            scores = dist.clone()
            scores[:, [self.names.index(n) for n in excluded]] = float("inf")
        if config.index == "centroid":
            exact_image, exact = d_image, scores
        else:
            m = min(available, config.k + self.MARGIN)
            cand = torch.topk(scores, m, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
            exact_image = self._exact(q, config.index, cand)
            exact = mix(exact_image, None if text is None else text[cand])
            dist.scatter_(1, cand, exact)
        vals, pos = exact.sort(dim=1, stable=True)                                   # ties -> lower index
        indices, d_topk = cand.gather(1, pos)[:, :config.k], vals[:, :config.k]
        weights = (_softmax_weights(d_topk, config.tau) if config.weighting == "softmax"
                   else uniform_weights(*indices.shape, dtype=q.dtype))
        base = None
        if config.fallback == "coverage":
            d_k = exact_image.gather(1, pos[:, :config.k])
            over = (d_k / self.radii(config.index)[indices].to(d_k) - 1).clamp_min(0)
            weights = weights * torch.exp(-config.fallback_strength * over)
            base = (1 - weights.sum(1)).clamp_min(0)
        return Retrieval(indices=indices, weights=weights, distances=dist, names=self.names, base_weights=base)
