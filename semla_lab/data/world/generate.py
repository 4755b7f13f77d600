"""Generate a domain's images, label maps and captions from its spec, deterministically.

Samples are produced in fixed chunks of CHUNK images, each from its own torch.Generator seeded by
(spec seed, split, chunk index): the same spec, split and index always give the same bits,
whatever the thread count or how many samples were asked for.
"""
from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import torch

from ...core.errors import UnknownNameError, UsageError
from ...core.manifests import manifests_dir
from ..split import Split
from .appearance import apply_camera, apply_time_of_day, apply_weather
from .concepts import CONCEPT_ID, CONCEPTS, SCENE_KINDS, SCENE_WORDS, SYNONYMS
from .scenes import RENDERERS, Canvas
from .spec import FACTORS, SPLITS, DomainSpec, load_spec, load_vocabularies, validate_spec

CHUNK = 64
SOURCE_DOMAIN = "source"
# Share of captions that name the place style. People describe a photo's scene and conditions far more often
# than its city, and the tiny CLIP weighs each factor by how often captions tell it apart: naming the style
# always made IDD retrieve COCONut, the other Indian-style domain, over every street domain (README,
# "Faithful stand-ins", has the measurements).
STYLE_MENTION = 0.3
# What captions say: "full" names the conditions (weather, camera, time of day); "no_conditions" keeps only the
# scene, the style mention and the objects (the tiny-CLIP ablation of notebook 03b, `semla-lab clip-variants`).
CAPTION_MODES = ("full", "no_conditions")


def _jittered(cv: Canvas, spec: DomainSpec, key: str) -> torch.Tensor:
    """Per-image intensities of one factor: the spec's value with relative jitter, or uniform over its range."""
    base, lo, hi = FACTORS[key]
    value, jitter = spec.factor(key), spec.factor("jitter")
    if isinstance(value, list):            # one draw per image, as the jitter takes: other factors stay as they were
        return cv.u(*value)
    if key in ("exposure", "cast_r", "cast_g", "cast_b"):
        jitter *= 0.3
    if key == "resolution":
        jitter = 0.0
    return (value * (1 + jitter * cv.u(-1, 1))).clamp(lo, hi)


def condition_words(cond: dict[str, float]) -> list[str]:
    """What a person would say about a photo's conditions: weather, sensor, exposure, colour cast."""
    r, g, b = cond["cast_r"], cond["cast_g"], cond["cast_b"]
    said = {"foggy": cond["fog"] > 0.3, "rainy": cond["rain"] > 0.3, "snowy": cond["snow"] > 0.3,
            "noisy": cond["noise"] > 0.04, "blurry": cond["blur"] > 0.8, "low-resolution": cond["resolution"] < 0.8,
            "bright": cond["exposure"] > 1.1, "dark": cond["exposure"] < 0.92,
            "warm-toned": r - b > 0.07, "cool-toned": b - r > 0.07, "greenish": g - (r + b) / 2 > 0.04}
    return [word for word, true in said.items() if true]


def _caption(kind: str, concept_map: torch.Tensor, cond: dict[str, float], style: str, rng: random.Random,
             mode: str = "full") -> str:
    counts = torch.bincount(concept_map.flatten().long(), minlength=256)[: len(CONCEPTS)]
    visible = [CONCEPTS[i] for i in counts.argsort(descending=True).tolist() if counts[i] > 0][:4]
    rng.shuffle(visible)
    names = [rng.choice(SYNONYMS[c]) for c in visible]
    when = " at night" if cond["night"] > 0.5 else " at dusk" if cond["dusk"] > 0.3 else ""
    where = f" in a {style} style" if kind != "park" and rng.random() < STYLE_MENTION else ""
    listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)
    said = condition_words(cond) if mode == "full" else []
    when = when if mode == "full" else ""
    return f"a {' '.join(said + ['photo'])} of a {rng.choice(SCENE_WORDS[kind])}{when}{where} with {listed}."


def render(spec: DomainSpec, count: int, seed: int, size: int | None = None, captions: str = "full"):
    """Render `count` images of a spec from one seed. Returns float images (N, 3, S, S) in [0, 1],
    concept-id label maps (N, S, S) uint8, captions (see CAPTION_MODES; images do not depend on it) and
    each image's scene kind."""
    if captions not in CAPTION_MODES:
        raise UsageError(f"unknown caption mode {captions!r}; expected one of {CAPTION_MODES}")
    size = size or spec.size
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    kinds = list(spec.scene)
    choice = torch.multinomial(torch.tensor([spec.scene[k] for k in kinds]), count, replacement=True,
                               generator=gen)
    images, labels = torch.zeros(count, 3, size, size), torch.zeros(count, size, size, dtype=torch.uint8)
    conds: list[dict] = [{} for _ in range(count)]
    kind_of = [kinds[i] for i in choice.tolist()]
    for k, kind in enumerate(kinds):
        idx = (choice == k).nonzero().view(-1)
        if len(idx) == 0:
            continue
        cv = Canvas(len(idx), size, spec.style, gen)
        RENDERERS[kind](cv)
        f = {key: _jittered(cv, spec, key) for key in FACTORS if key != "jitter"}
        indoor = torch.full((cv.B,), float(kind == "indoor"))
        brightness = (1 - 0.45 * f["dusk"] - 0.85 * f["night"] * (1 - 0.45 * indoor)).clamp(min=0.06)
        img = apply_time_of_day(cv, f["dusk"], f["night"], indoor)
        img = apply_weather(cv, img, f["fog"], f["rain"], f["snow"], indoor, brightness)
        img = img * cv.u(0.88, 1.08).view(-1, 1, 1, 1)             # natural exposure variation
        cast = torch.stack([f["cast_r"], f["cast_g"], f["cast_b"]], 1)
        images[idx] = apply_camera(img.clamp(0, 1), gen, f["noise"], f["blur"], f["exposure"], cast,
                                   f["resolution"])
        labels[idx] = cv.label
        for j, i in enumerate(idx.tolist()):
            conds[i] = {key: float(v[j]) for key, v in f.items()}
    texts = [_caption(kind_of[i], labels[i], conds[i], spec.style, rng, captions) for i in range(count)]
    return images, labels, texts, kind_of


def concept_to_class_lut(spec: DomainSpec) -> torch.Tensor:
    """(256,) uint8 lookup from concept id to the dataset's class id (255 where it has no name)."""
    lut = torch.full((256,), 255, dtype=torch.uint8)
    for class_id, concept in enumerate(spec.vocabulary):
        lut[CONCEPT_ID[concept]] = class_id
    return lut


def generate(spec: DomainSpec, split: str = "train", count: int | None = None,
             size: int | None = None) -> Split:
    """The first `count` samples (default: the spec's split size) of a split, as uint8 tensors, with the
    spec's dataset, the real domain it plays, its factors and scene mixture as metadata."""
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; expected one of {SPLITS}")
    count = spec.splits.get(split, 0) if count is None else count
    if count < 0:
        raise UsageError(f"count must be >= 0, got {count}")
    size = size or spec.size
    chunks = []
    for c in range(0, count, CHUNK):
        seed = (spec.seed * 1_000_003 + SPLITS.index(split) * 100_003 + c // CHUNK) % 2**63
        chunks.append(render(spec, CHUNK, seed, size))
    imgs = torch.cat([c[0] for c in chunks])[:count] if chunks else torch.zeros(0, 3, size, size)
    concept = torch.cat([c[1] for c in chunks])[:count] if chunks else torch.zeros(0, size, size, dtype=torch.uint8)
    captions = [cap for c in chunks for cap in c[2]][:count]
    kinds = [kind for c in chunks for kind in c[3]][:count]
    labels = concept_to_class_lut(spec)[concept.long()]
    images = (imgs * 255).round().to(torch.uint8)
    ids = [f"{spec.name}/{split}/{i:05d}" for i in range(count)]
    metadata = {"dataset": spec.dataset, "plays": spec.plays, "factors": dict(spec.factors), "scene": dict(spec.scene)}
    return Split(spec.name, images, labels, spec.class_names, ids, metadata, captions, kinds)


def mini_dir() -> Path:
    return manifests_dir() / "mini"


@lru_cache(maxsize=1)
def _shipped() -> dict[str, DomainSpec]:
    vocabs = load_vocabularies(mini_dir() / "vocabularies.yaml")
    specs = [load_spec(p, vocabs) for p in sorted(mini_dir().glob("*.yaml")) if p.name != "vocabularies.yaml"]
    return {s.name: s for s in specs}


def shipped_domains() -> dict[str, DomainSpec]:
    """All shipped domain specs by name, the source domain included."""
    return dict(_shipped())


def target_domains() -> list[str]:
    """The shipped target domains (everything but the source), in benchmark order."""
    return [n for n in _shipped() if n != SOURCE_DOMAIN]


def get_domain(name_or_path: str | Path) -> DomainSpec:
    """A shipped domain by name, or any spec file by path."""
    specs = _shipped()
    if str(name_or_path) in specs:
        return specs[str(name_or_path)]
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return load_spec(path, load_vocabularies(mini_dir() / "vocabularies.yaml")
                         if not (path.parent / "vocabularies.yaml").is_file() else None)
    raise UnknownNameError(f"unknown domain {name_or_path!r}: not a shipped domain ({', '.join(specs)}) "
                   f"and not a .yaml spec file")


def scene_classes(kind: str) -> tuple[str, ...]:
    return SCENE_KINDS[kind]


def web_spec(rng: random.Random, index: int) -> DomainSpec:
    """A random domain: random scene kind, style and factor intensities (the tiny CLIP's
    "internet": broad coverage of the factor space, not the shipped domains themselves)."""
    from .concepts import STYLES
    vocabs = load_vocabularies(mini_dir() / "vocabularies.yaml")
    factors = {k: round(rng.uniform(0.3, 1.0), 3) for k in ("fog", "rain", "snow") if rng.random() < 0.25}
    if rng.random() < 0.45:
        factors[rng.choice(["dusk", "night"])] = round(rng.uniform(0.3, 1.0), 3)
    if rng.random() < 0.5:
        factors["noise"] = round(rng.uniform(0.0, 0.07), 3)
    if rng.random() < 0.4:
        factors["blur"] = round(rng.uniform(0.0, 1.2), 3)
    factors["exposure"] = round(rng.uniform(0.85, 1.2), 3)
    for ch in ("cast_r", "cast_g", "cast_b"):
        factors[ch] = round(rng.uniform(0.88, 1.12), 3)
    factors["resolution"] = rng.choice([1.0, 1.0, 0.75, 0.6, 0.5])
    return validate_spec({"name": f"web_{index}", "dataset": "web", "vocabulary": vocabs["source"],
                          "scene": rng.choice(list(SCENE_KINDS)), "style": rng.choice(list(STYLES)),
                          "factors": factors, "seed": index})


def web_corpus(count: int, seed: int = 0, per_domain: int = 32, size: int = 64, captions: str = "full"):
    """`count` image/caption pairs from random domains, `per_domain` images each, captioned in mode
    `captions` (CAPTION_MODES). Returns uint8 images (N, 3, S, S) and captions."""
    rng = random.Random(seed)
    images, texts = [], []
    for i in range(0, count, per_domain):
        spec = web_spec(rng, seed * 100_000 + i)
        img, _, caps, _ = render(spec, per_domain, spec.seed, size, captions)
        images.append((img * 255).round().to(torch.uint8))
        texts += caps
    return torch.cat(images)[:count], texts[:count]
