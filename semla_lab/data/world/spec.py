"""Declarative domain specs for the mini world (one YAML file per domain in data_manifests/mini/).

A spec names the scene kind(s), the place style, the appearance factors with continuous
intensities, the dataset whose label vocabulary it uses, and split sizes and seeds. A factor is one
intensity (jittered per image) or a [low, high] range that every image draws from: a dataset
photographed by many cameras. Every field is validated so that a typo fails loudly instead of
silently rendering a clear day.
Notebook 01 shows the specs at work.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import yaml

from ...core.errors import SemlaError
from ...core.io import atomic_write_text
from .concepts import CONCEPTS, SCENE_KINDS, STYLES

# factor -> (default, minimum, maximum). Weather and time are intensities in [0, 1]; camera factors
# are physical-ish knobs. `jitter` is the per-image relative variation of every single intensity.
FACTORS: dict[str, tuple[float, float, float]] = {
    "fog": (0.0, 0.0, 1.0),
    "rain": (0.0, 0.0, 1.0),
    "snow": (0.0, 0.0, 1.0),
    "dusk": (0.0, 0.0, 1.0),
    "night": (0.0, 0.0, 1.0),
    "noise": (0.0, 0.0, 0.3),       # std of additive Gaussian sensor noise (image in [0, 1])
    "blur": (0.0, 0.0, 3.0),        # Gaussian blur sigma in pixels at 64 px
    "exposure": (1.0, 0.1, 3.0),    # global gain
    "cast_r": (1.0, 0.5, 1.5),      # per-channel colour gains (white balance)
    "cast_g": (1.0, 0.5, 1.5),
    "cast_b": (1.0, 0.5, 1.5),
    "resolution": (1.0, 0.125, 1.0),  # render at this fraction of the size, then upsample
    "jitter": (0.15, 0.0, 1.0),
}
SPLITS = ("train", "val", "test")
SPEC_KEYS = {"name", "dataset", "plays", "scene", "style", "factors", "vocabulary", "splits", "seed",
             "size", "description"}


class SpecError(SemlaError, ValueError):
    """A domain spec (file or dict) is malformed; the message names the field and the problem."""


@dataclass(frozen=True)
class DomainSpec:
    """One domain of the mini world. `scene` maps scene kind -> mixture weight (weights sum to 1)."""
    name: str
    dataset: str
    vocabulary: dict[str, str]          # concept -> class name in this dataset, in label-id order
    scene: dict[str, float]
    style: str = "european"
    factors: dict[str, float | list[float]] = field(default_factory=dict)   # value, or [low, high] per image
    splits: dict[str, int] = field(default_factory=lambda: {"train": 200, "test": 100})
    seed: int = 0
    size: int = 64
    plays: str = ""
    description: str = ""

    @property
    def class_names(self) -> list[str]:
        return list(self.vocabulary.values())

    def factor(self, key: str) -> float | list[float]:
        return self.factors.get(key, FACTORS[key][0])

    def with_factors(self, **changes: float | list[float]) -> "DomainSpec":
        """A copy with some factors changed (validated), e.g. `spec.with_factors(fog=0.9)`."""
        return validate_spec({**to_dict(self), "factors": {**self.factors, **changes}})


def _fail(where: str, msg: str):
    raise SpecError(f"{where}: {msg}")


def _number(where: str, key: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(where, f"factor {key!r} must be a number, got {value!r}")
    if value != value:  # NaN
        _fail(where, f"factor {key!r} is NaN")
    if value < 0:
        _fail(where, f"factor {key!r} must not be negative, got {value}")
    if not lo <= value <= hi:
        _fail(where, f"factor {key!r}={value} is outside [{lo}, {hi}]")
    return float(value)


def _factor(where: str, key: str, value) -> float | list[float]:
    """One intensity, or a [low, high] range (low <= high) that each image draws its intensity from."""
    lo, hi = FACTORS[key][1:]
    if not isinstance(value, (list, tuple)):
        return _number(where, key, value, lo, hi)
    if key == "jitter" or len(value) != 2:
        _fail(where, f"factor {key!r} must be a number" + ("" if key == "jitter" else " or a [low, high] range")
              + f", got {list(value)!r}")
    low, high = (_number(where, key, v, lo, hi) for v in value)
    if low > high:
        _fail(where, f"factor {key!r} range {list(value)!r} has low > high")
    return [low, high]


def factor_text(key: str, value: float | list[float]) -> str:
    """`key=value` or `key=low..high`, as tables show a spec's factors."""
    return f"{key}={value[0]:g}..{value[1]:g}" if isinstance(value, list) else f"{key}={value:g}"


def validate_spec(raw: Mapping, vocabularies: Mapping[str, Mapping[str, str]] | None = None,
                  where: str = "domain spec") -> DomainSpec:
    """Check a raw mapping (parsed YAML) and build a DomainSpec. `vocabulary` may be a dataset key
    into `vocabularies` or an inline {concept: name} mapping."""
    if not isinstance(raw, Mapping):
        _fail(where, f"expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        _fail(where, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    for key in ("name", "dataset", "scene", "vocabulary"):
        if key not in raw:
            _fail(where, f"missing required key {key!r}")
    name = raw["name"]
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
        _fail(where, f"name {name!r} must be a non-empty string of letters, digits, '_' or '-'")
    where = f"{where} {name!r}"

    scene = raw["scene"]
    scene = {scene: 1.0} if isinstance(scene, str) else scene
    if not isinstance(scene, Mapping) or not scene:
        _fail(where, "scene must be a scene kind or a non-empty {kind: weight} mapping")
    for kind, weight in scene.items():
        if kind not in SCENE_KINDS:
            _fail(where, f"unknown scene kind {kind!r}; known: {list(SCENE_KINDS)}")
        _number(where, f"scene.{kind}", weight, 0.0, float("inf"))
    total = sum(scene.values())
    if total <= 0:
        _fail(where, "scene weights sum to zero")
    scene = {k: float(v) / total for k, v in scene.items()}

    style = raw.get("style", "european")
    if style not in STYLES:
        _fail(where, f"unknown style {style!r}; known: {list(STYLES)}")

    factors_raw = raw.get("factors") or {}
    if not isinstance(factors_raw, Mapping):
        _fail(where, "factors must be a mapping of factor -> intensity")
    factors = {}
    for key, value in factors_raw.items():
        if key not in FACTORS:
            _fail(where, f"unknown factor {key!r}; known: {list(FACTORS)}")
        factors[key] = _factor(where, key, value)

    vocab = raw["vocabulary"]
    if isinstance(vocab, str):
        if vocabularies is None or vocab not in vocabularies:
            _fail(where, f"unknown vocabulary {vocab!r}; known: {sorted(vocabularies or {})}")
        vocab = vocabularies[vocab]
    if not isinstance(vocab, Mapping) or not vocab:
        _fail(where, "vocabulary is empty: a domain needs at least one class")
    for concept, cname in vocab.items():
        if concept not in CONCEPTS:
            _fail(where, f"vocabulary maps unknown concept {concept!r}; known: {list(CONCEPTS)}")
        if not isinstance(cname, str) or not cname.strip():
            _fail(where, f"vocabulary name for {concept!r} must be a non-empty string")
    if len(set(vocab.values())) != len(vocab):
        _fail(where, "vocabulary has duplicate class names")

    splits = raw.get("splits", {"train": 200, "test": 100})
    if not isinstance(splits, Mapping) or not splits:
        _fail(where, "splits must be a non-empty {split: count} mapping")
    for split, count in splits.items():
        if split not in SPLITS:
            _fail(where, f"unknown split {split!r}; known: {list(SPLITS)}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            _fail(where, f"split {split!r} count must be a non-negative integer, got {count!r}")

    seed, size = raw.get("seed", 0), raw.get("size", 64)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        _fail(where, f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 1024:
        _fail(where, f"size must be an integer in [16, 1024], got {size!r}")
    dataset = raw["dataset"]
    if not isinstance(dataset, str) or not dataset:
        _fail(where, "dataset must be a non-empty string")
    return DomainSpec(name=name, dataset=dataset, vocabulary=dict(vocab), scene=scene, style=style,
                      factors=factors, splits=dict(splits), seed=seed, size=size,
                      plays=str(raw.get("plays", "")), description=str(raw.get("description", "")))


def to_dict(spec: DomainSpec) -> dict:
    return dataclasses.asdict(spec)


def load_vocabularies(path: str | Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        vocabs = yaml.safe_load(f)
    if not isinstance(vocabs, dict):
        raise SpecError(f"{path}: expected a mapping of dataset -> {{concept: name}}")
    return vocabs


def load_spec(path: str | Path, vocabularies: Mapping | None = None) -> DomainSpec:
    """Read one domain spec YAML. Vocabularies default to vocabularies.yaml beside the file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"domain spec file not found: {path}")
    if vocabularies is None and (path.parent / "vocabularies.yaml").is_file():
        vocabularies = load_vocabularies(path.parent / "vocabularies.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({e})") from None
    return validate_spec(raw, vocabularies, where=str(path))


def write_spec(spec, path: str | Path) -> Path:
    """Write a DomainSpec as a YAML spec file (vocabulary inline), loadable by world.generate.get_domain
    and usable as a benchmark target (`semla-lab evaluate --targets path.yaml`)."""
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(to_dict(spec), sort_keys=False))
    return path
