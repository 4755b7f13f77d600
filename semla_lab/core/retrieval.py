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
                               A radius of 0 (a one-image domain, or kmeans:P fitted on P images) covers
                               distance 0 only.

`distances`, `top_k` and `softmax_weights` are the checked building blocks, one step each (notebook 05 retrieves
by hand with them). `DomainIndex.search` is the one path that runs (SemLAPredictor, evaluation, `retrieve`):
it validates a library's centroids once, when built, and gives the same indices and weights as those blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Callable, Iterable, Sequence

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


class Retrieval:
    """Result for Q queries: indices (Q, K) long into the library, nearest first; weights (Q, K); distances
    (Q, L) to every library entry (excluded ones too); names (L,) in library order. With the coverage fallback,
    base_weights (Q,) is the null adapter's (the base model's) weight, and weights sum to 1 - base_weights.
    `distances` may be given as a function: it is then computed on first access (a prediction needs only
    indices and weights; evaluation records and reports read every distance)."""

    def __init__(self, indices: torch.Tensor, weights: torch.Tensor,
                 distances: torch.Tensor | Callable[[], torch.Tensor], names: list[str],
                 base_weights: torch.Tensor | None = None):
        self.indices, self.weights, self.names, self.base_weights = indices, weights, names, base_weights
        self._distances = distances

    @property
    def distances(self) -> torch.Tensor:
        if callable(self._distances):
            self._distances = self._distances()
        return self._distances

    def __getstate__(self) -> dict:
        """Pickled (Ray, multiprocessing) with its distances computed."""
        return {**self.__dict__, "_distances": self.distances}

    def chosen(self, q: int) -> list[tuple[str, float, float]]:
        """(name, distance, weight) of the adapters retrieved for query q, nearest first."""
        return [(self.names[i], float(self.distances[q, i]), float(w))
                for i, w in zip(self.indices[q].tolist(), self.weights[q])]


def coverage_fallback(weights: torch.Tensor, d: torch.Tensor, radii: torch.Tensor, strength: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The coverage fallback (module docstring): weights (Q, K) of adapters at image distances d (Q, K) with
    coverage radii (Q, K) -> (kept weights w'_k (Q, K), the base model's weight w_0 (Q,)). A radius of 0 (a
    one-image domain) covers only distance 0: beyond it the adapter's weight goes to the base model entirely.
    strength = 0 keeps every weight as it is (plain SemLA, w_0 = 0)."""
    if strength == 0:
        return weights, torch.zeros(len(weights), dtype=weights.dtype, device=weights.device)
    over = torch.where(d <= radii, torch.zeros_like(d), d / radii - 1)      # d > r = 0: inf, exp(-inf) = 0
    kept = weights * torch.exp(-strength * over)
    return kept, (1 - kept.sum(1)).clamp_min(0)


def _euclidean(queries: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """cdist of queries (Q, D) to points (N, D), or each query q to its own points (Q, N, D) -> (Q, N), in the
    promoted dtype, exactly as `distances` computes them (bitwise: the same kernel, pair by pair)."""
    dtype = torch.promote_types(queries.dtype, points.dtype)
    q, p = queries.to(dtype), points.to(dtype)
    if p.dim() == 2:
        return torch.cdist(q, p, compute_mode="donot_use_mm_for_euclid_dist")
    return torch.cdist(q[:, None], p, compute_mode="donot_use_mm_for_euclid_dist")[:, 0]


class DomainIndex:
    """A library's domains as retrieval sees them: centroids (L, D) and, for domains that have one, their
    profile (profiles.py). `search` is the one retrieval path: SemLAPredictor, evaluation and `retrieve` call it.

    The centroids are validated when the index is built, never per query. Per query: one GEMM over every
    prototype (stored column-major, (D, L P), so a single query reads them in one pass) gives approximate
    distances; the K + MARGIN nearest domains not excluded are re-measured exactly (the same cdist as
    `distances`, float64 for the GMM; every domain for the cosine metric, itself one GEMM) and stable-sorted,
    so indices, ties (to the lower index) and weights are those of sorting exact distances to every domain.
    Excluded domains are never chosen and keep their distances. The returned distances (Q, L) are exact and
    computed on first access."""

    MARGIN = 8

    def __init__(self, centroids: torch.Tensor, names: Sequence[str], profiles: dict[str, DomainProfile] | None = None,
                 where: str = "this library"):
        self.centroids, self.names, self.where = centroids, list(names), where
        if centroids.dim() != 2:
            raise UsageError(f"centroids must be (L, D), got shape {tuple(centroids.shape)}")
        if len(self.names) != centroids.shape[0] or len(set(self.names)) != len(self.names):
            raise UsageError(f"need one unique name per centroid, got {len(self.names)} names for "
                             f"{centroids.shape[0]} centroids")
        _check_finite(centroids, "centroids")
        self._position = {n: i for i, n in enumerate(self.names)}
        self.profiles = {n: p for n, p in (profiles or {}).items() if n in self._position}
        self._cache: dict[tuple, object] = {}

    @classmethod
    def from_library(cls, library, names: Sequence[str] | None = None) -> DomainIndex:
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
                st = {"means": self.centroids[:, None]}
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

    def _unit_rows(self) -> torch.Tensor:
        """(L, D) L2-normalised centroids for the cosine metric, checked once."""
        def build():
            if (self.centroids.norm(dim=1) == 0).any():
                raise UsageError("cosine distance undefined: centroids contains a zero vector")
            return F.normalize(self.centroids, dim=1)
        return self._cached(("unit",), build)

    def _cosine(self, q: torch.Tensor) -> torch.Tensor:
        """(Q, L) cosine distances, computed as `distances` does."""
        if (q.norm(dim=1) == 0).any():
            raise UsageError("cosine distance undefined: queries contains a zero vector")
        rows = self._unit_rows()
        dtype = torch.promote_types(q.dtype, rows.dtype)
        return (1 - F.normalize(q.to(dtype), dim=1) @ rows.to(dtype).T).clamp(0, 2)

    def image_distances(self, queries: torch.Tensor, config: RetrievalConfig = RetrievalConfig()) -> torch.Tensor:
        """(Q, L) exact image distances to every domain under config.index (and config.metric for centroids)."""
        q = self._queries(queries)
        if config.index != "centroid":
            return kind_distances(q, config.index, self._kind(config.index))
        return self._cosine(q) if config.metric == "cosine" else _euclidean(q, self.centroids)

    def _queries(self, queries: torch.Tensor) -> torch.Tensor:
        q = queries.unsqueeze(0) if queries.dim() == 1 else queries
        _check_finite(q, "queries")
        if q.dim() != 2 or q.shape[1] != self.centroids.shape[1]:
            raise UsageError(f"queries must be (Q, {self.centroids.shape[1]}), got {tuple(q.shape)}")
        if not self.names:
            raise UsageError(f"{self.where} is empty: no domain to retrieve")
        return q

    def _excluded(self, exclude: Iterable[str] | str, k: int) -> list[int]:
        """Positions of the excluded names; a UsageError for unknown names or a k outside [1, remaining]."""
        excluded = [exclude] if isinstance(exclude, str) else list(exclude)
        unknown = [n for n in excluded if n not in self._position]
        if unknown:
            raise UsageError(f"cannot exclude unknown library entries {unknown[:3]}")
        positions = sorted({self._position[n] for n in excluded})
        available = len(self.names) - len(positions)
        if not 1 <= k <= available:
            raise UsageError(f"k={k} must be in [1, {available}]: {available} library entries are available "
                             "(not excluded)")
        return positions

    def _approx(self, q: torch.Tensor, config: RetrievalConfig, ranking: bool = False) -> torch.Tensor:
        """(Q, L) image distances from one GEMM pass (rounding of the GEMM; exact for the cosine metric). With
        `ranking`, Euclidean kinds may return any increasing function of them (squared distances - |q|^2)."""
        if config.index == "centroid" and config.metric == "cosine":
            return self._cosine(q)
        st = self._kind(config.index)
        n, p = st["means"].shape[:2]
        if "columns" in st:
            qc = q.to(st["columns"].dtype)
            d2 = torch.addmm(st["sq_norms"], qc, st["columns"], alpha=-2).view(len(q), p, n)
            d2 = d2[:, 0] if p == 1 else torch.minimum(d2[:, 0], d2[:, 1]) if p == 2 else d2.amin(1)
            return d2 if ranking else d2.add_((qc * qc).sum(1, keepdim=True)).clamp_min_(0).sqrt_()
        maha = torch.addmm(q @ st["mean_columns"], q * q, st["inv_columns"])
        nll = -torch.logsumexp((st["const"] - 0.5 * maha).view(len(q), p, n), dim=1)
        return (2 * st["scale2"].view(1, -1) * (nll - st["nll_floor"].view(1, -1)).clamp_min(0)).sqrt()

    def _exact(self, q: torch.Tensor, config: RetrievalConfig, cand: torch.Tensor, approx: torch.Tensor
               ) -> torch.Tensor:
        """(Q, m) exact image distances of each query to its candidate domains cand (Q, m)."""
        if config.index == "centroid" and config.metric == "cosine":
            return approx.gather(1, cand)
        st = self._kind(config.index)
        if "columns" in st:
            means = st["means"][cand]                                                   # (Q, m, P, D)
            return _euclidean(q, means.flatten(1, 2)).view(cand.shape + means.shape[2:3]).amin(-1)
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
        """Top-K domains and fusion weights for queries (Q, D) or (D,). `exclude` names domains that may not be
        chosen (leave-one-out; a single string is one name); `class_text` (T, D) are the test-time class-name
        embeddings, needed when config.text_weight > 0."""
        q = self._queries(queries)
        excluded = self._excluded(exclude, config.k)
        lam, k = config.text_weight, config.k
        if lam > 0 and class_text is None:
            raise UsageError("text_weight > 0 needs the test-time class names (class_text)")
        text = self.text_distances(class_text).to(q.dtype) if lam > 0 else None
        mix = (lambda image, txt: image) if text is None else (lambda image, txt: (1 - lam) * image + lam * txt)
        approx = self._approx(q, config, ranking=text is None)
        scores = mix(approx, text)
        if excluded:
            scores = scores.clone() if scores is approx else scores
            scores[:, excluded] = float("inf")
        m = min(len(self.names) - len(excluded), k + self.MARGIN)
        cand = torch.topk(scores, m, dim=1, largest=False, sorted=False).indices.sort(dim=1).values      # (Q, m)
        exact_image = self._exact(q, config, cand, approx)
        exact = mix(exact_image, None if text is None else text[cand])
        vals, pos = exact.sort(dim=1, stable=True)                                   # ties -> lower index
        indices, d_topk = cand.gather(1, pos)[:, :k], vals[:, :k]
        weights = (_softmax_weights(d_topk, config.tau) if config.weighting == "softmax"
                   else uniform_weights(*indices.shape, dtype=d_topk.dtype).to(d_topk.device))
        base = None
        if config.fallback == "coverage":
            d_k = exact_image.gather(1, pos[:, :k])
            weights, base = coverage_fallback(weights, d_k, self.radii(config.index)[indices].to(d_k),
                                              config.fallback_strength)

        def every_distance() -> torch.Tensor:
            full = self.image_distances(q, config)
            return mix(full.to(exact.dtype), text).scatter_(1, cand, exact)
        return Retrieval(indices, weights, every_distance, self.names, base)


def retrieve(queries: torch.Tensor, centroids: torch.Tensor, names: Sequence[str],
             config: RetrievalConfig = RetrievalConfig(), exclude: Iterable[str] = ()) -> Retrieval:
    """Top-K library entries and their fusion weights for queries (Q, D) or (D,), in one call: builds a
    DomainIndex (validating the centroids) and searches it. To search one library many times, build the
    index once (SemLAPredictor and evaluation do)."""
    return DomainIndex(centroids, names).search(queries, config, exclude)
