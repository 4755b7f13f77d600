"""Domain pools: seeded random but plausible domain specs, for studies that need many domains.

Each domain draws its scene mix, place style, weather, time of day, camera factors and a label
vocabulary that names the concepts of its scenes, from its own random.Random seeded by (pool seed,
index): a pool of 40 is the first 40 domains of a pool of 80, and the same seed gives the same
specs. Pools are written as ordinary spec files beside a copy of the vocabularies (the layout of
data_manifests/mini/), so `semla-lab world <folder>/*.yaml` shows them and any study can be
reproduced or inspected. Pool seeds and names stay clear of the shipped and held-out domains.
Notebook 11 grows libraries from a pool.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Mapping

import yaml

from ...core.errors import UsageError
from ...core.io import atomic_folder, atomic_write_text
from .concepts import SCENE_KINDS, STYLES
from .spec import DomainSpec, SpecError, load_spec, load_vocabularies, to_dict, validate_spec

SEED_BASE = 1_000_000        # spec seeds of pool domains start here: shipped domains use 1000-1340,
SEED_STRIDE = 10_000         # held-out ones 2001-2004, the CLIP's web corpus 0-16384 per 100,000
MAX_POOL = 1000             # names carry a 3-digit index
VOCAB_COVERAGE = 0.8         # a vocabulary must name this share of every scene kind's concepts
VOCABULARIES = "vocabularies.yaml"
WEATHER = ("fog", "rain", "snow")


def pool_name(pool_seed: int, index: int) -> str:
    return f"pool{pool_seed}-{index:03d}"


def vocabulary_fits(vocabulary: Mapping[str, str], scene: Mapping[str, float]) -> bool:
    """Whether a vocabulary names at least VOCAB_COVERAGE of the concepts of every scene kind in the mix."""
    return all(len(set(SCENE_KINDS[k]) & set(vocabulary)) >= VOCAB_COVERAGE * len(SCENE_KINDS[k]) for k in scene)


def _scene(rng: random.Random) -> dict[str, float]:
    """Mostly one scene kind (street most often); a third of domains mix two or three kinds."""
    if rng.random() < 0.7:
        return {rng.choices(list(SCENE_KINDS), weights=(2, 1, 1))[0]: 1.0}
    kinds = rng.sample(list(SCENE_KINDS), rng.choice((2, 3)))
    weights = [rng.uniform(0.2, 1.0) for _ in kinds]
    return {k: round(w / sum(weights), 2) for k, w in zip(kinds, weights)}


def _factors(rng: random.Random, indoor_only: bool) -> dict[str, float]:
    """Weather (none indoors), time of day, and a camera: noise, blur, exposure, colour cast, resolution."""
    f: dict[str, float] = {}
    if not indoor_only and rng.random() < 0.5:
        weather = rng.choice(WEATHER)
        f[weather] = round(rng.uniform(0.25, 0.85), 2)
        if weather != "fog" and rng.random() < 0.2:             # rain or snow in light mist
            f["fog"] = round(rng.uniform(0.1, 0.3), 2)
    light = rng.random()
    if light < 0.2:
        f["dusk"] = round(rng.uniform(0.3, 0.8), 2)
    elif light < 0.4:
        f["night"] = round(rng.uniform(0.5, 0.95), 2)
    if rng.random() < 0.5:
        f["noise"] = round(rng.uniform(0.005, 0.06), 3)
    if rng.random() < 0.3:
        f["blur"] = round(rng.uniform(0.2, 1.2), 2)
    f["exposure"] = round(rng.uniform(0.85, 1.15), 2)
    cast = rng.random()
    if cast < 0.3:                                              # warm: red up, blue down
        f["cast_r"], f["cast_b"] = round(rng.uniform(1.03, 1.12), 2), round(rng.uniform(0.88, 0.97), 2)
    elif cast < 0.6:                                            # cool
        f["cast_r"], f["cast_b"] = round(rng.uniform(0.88, 0.97), 2), round(rng.uniform(1.03, 1.12), 2)
    f["resolution"] = rng.choice((1.0, 1.0, 1.0, 0.75, 0.6, 0.5))
    return f


def _describe(scene: Mapping[str, float], style: str, factors: Mapping[str, float]) -> str:
    kinds = "+".join(scene)
    conditions = [k for k in (*WEATHER, "dusk", "night") if k in factors]
    camera = [w for w, on in (("noisy", factors.get("noise", 0) > 0.03), ("blurry", factors.get("blur", 0) > 0.6),
                              ("low-res", factors.get("resolution", 1) < 0.8)) if on]
    return f"pool: {style} {kinds}" + "".join(f", {c}" for c in conditions + camera)


def draw_spec(pool_seed: int, index: int, vocabularies: Mapping[str, Mapping[str, str]]) -> DomainSpec:
    """Domain `index` of pool `pool_seed`: a validated spec that depends on nothing else."""
    if not 0 <= index < MAX_POOL:
        raise UsageError(f"pool index must be in [0, {MAX_POOL}), got {index}")
    rng = random.Random(pool_seed * 1_000_003 + index)
    scene = _scene(rng)
    style = rng.choice(list(STYLES))
    factors = _factors(rng, indoor_only=set(scene) == {"indoor"})
    fitting = sorted(k for k, v in vocabularies.items() if k != "source" and vocabulary_fits(v, scene))
    vocabulary = rng.choice(fitting)
    return validate_spec({"name": pool_name(pool_seed, index), "dataset": "pool",
                          "plays": _describe(scene, style, factors),
                          "scene": scene, "style": style, "factors": factors, "vocabulary": vocabulary,
                          "splits": {"train": 200, "test": 100}, "seed": SEED_BASE + pool_seed * SEED_STRIDE + index},
                         vocabularies, where=f"pool {pool_seed} domain {index}")


def domain_pool(size: int, pool_seed: int = 0,
                vocabularies: Mapping[str, Mapping[str, str]] | None = None) -> list[DomainSpec]:
    """The first `size` domains of pool `pool_seed` (vocabularies default to the mini world's)."""
    if not 1 <= size <= MAX_POOL or isinstance(size, bool):
        raise UsageError(f"pool size must be in [1, {MAX_POOL}], got {size}")
    if isinstance(pool_seed, bool) or not isinstance(pool_seed, int) or pool_seed < 0:
        raise UsageError(f"pool seed must be a non-negative integer, got {pool_seed!r}")
    if vocabularies is None:
        from .generate import mini_dir
        vocabularies = load_vocabularies(mini_dir() / VOCABULARIES)
    return [draw_spec(pool_seed, i, vocabularies) for i in range(size)]


def spec_file_dict(spec: DomainSpec, vocabulary_key: str) -> dict:
    """A spec as a spec-file mapping that names its vocabulary by key, like data_manifests/mini/*.yaml."""
    raw = {k: v for k, v in to_dict(spec).items() if v not in ("", None)}
    return {**raw, "vocabulary": vocabulary_key}


def _vocabulary_key(spec: DomainSpec, vocabularies: Mapping[str, Mapping[str, str]]) -> str:
    return next(k for k, v in vocabularies.items() if dict(v) == spec.vocabulary)


def write_pool(specs: list[DomainSpec], folder: str | Path,
               vocabularies: Mapping[str, Mapping[str, str]] | None = None) -> Path:
    """Write specs as <name>.yaml plus vocabularies.yaml into a new folder, built beside it and renamed
    into place (an existing folder is refused: a pool on disk is a record of a study)."""
    folder = Path(folder)
    if folder.exists():
        raise UsageError(f"{folder} exists; a pool is written once (read it with read_pool)")
    if vocabularies is None:
        from .generate import mini_dir
        vocabularies = load_vocabularies(mini_dir() / VOCABULARIES)
    with atomic_folder(folder) as tmp:
        atomic_write_text(tmp / VOCABULARIES,
                          yaml.safe_dump({k: dict(v) for k, v in vocabularies.items()}, sort_keys=False))
        for spec in specs:
            raw = spec_file_dict(spec, _vocabulary_key(spec, vocabularies))
            atomic_write_text(tmp / f"{spec.name}.yaml", yaml.safe_dump(raw, sort_keys=False))
    return folder


def read_pool(folder: str | Path) -> list[DomainSpec]:
    """Every spec file of a pool folder (vocabularies.yaml beside them), ordered by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"pool folder not found: {folder}")
    vocab_file = folder / VOCABULARIES
    if not vocab_file.is_file():
        raise SpecError(f"pool folder {folder} lacks {VOCABULARIES}")
    vocabularies = load_vocabularies(vocab_file)
    specs = [load_spec(p, vocabularies) for p in sorted(folder.glob("*.yaml")) if p.name != VOCABULARIES]
    if not specs:
        raise SpecError(f"pool folder {folder} holds no spec files")
    return specs
