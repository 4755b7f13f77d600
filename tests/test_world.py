"""The mini world: specs, determinism, label/image alignment, captions, bad specs."""
import pytest
import torch
import yaml

from semla_lab.data.world.concepts import CONCEPT_ID, SCENE_KINDS, SCENE_WORDS
from semla_lab.data.world.generate import (SOURCE_DOMAIN, concept_to_class_lut, generate, get_domain, mini_dir, render,
                                      shipped_domains, target_domains, web_corpus)
from semla_lab.data.world.spec import (FACTORS, SpecError, load_spec, load_vocabularies, to_dict, validate_spec,
                                      write_spec)

SPECS = shipped_domains()


def test_shipped_world_mirrors_the_benchmark():
    targets = target_domains()
    assert len(targets) >= 20 and SOURCE_DOMAIN not in targets
    datasets = {SPECS[t].dataset for t in targets}
    assert len(datasets) >= 8
    assert {"acdc", "muses", "cityscapes", "bdd", "idd", "mapillary", "ade", "pascal_context", "nyu",
            "coconut"} <= datasets
    kinds = {k for s in SPECS.values() for k in s.scene}
    assert kinds == set(SCENE_KINDS)
    for kind, concepts in SCENE_KINDS.items():
        assert len(concepts) >= 8, kind
    # the same concept carries different names across datasets
    car_names = {s.vocabulary.get("car") for s in SPECS.values()} - {None}
    assert {"car", "vehicle"} <= car_names


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_shipped_spec_loads_and_generates(name, tmp_path):
    raw = yaml.safe_load((mini_dir() / f"{name}.yaml").read_text())
    spec = SPECS[name]
    assert (spec.name, spec.dataset, spec.factors) == (name, raw["dataset"], raw.get("factors", {}))
    assert spec.vocabulary == load_vocabularies(mini_dir() / "vocabularies.yaml")[raw["vocabulary"]]
    written = tmp_path / f"{name}.yaml"    # a spec written back (inline vocabulary, in label-id order) reads the same
    written.write_text(yaml.safe_dump(to_dict(spec), sort_keys=False))
    assert load_spec(written) == spec
    data = generate(spec, "test", 4)
    assert data.images.shape == (4, 3, 64, 64) and data.images.dtype == torch.uint8
    assert data.labels.shape == (4, 64, 64)
    valid = (data.labels < len(spec.class_names)) | (data.labels == 255)
    assert valid.all()
    assert (data.labels != 255).float().mean() > 0.5, "most pixels carry a class of the vocabulary"


def test_generation_is_bit_identical_and_prefix_stable():
    spec = SPECS["acdc_snow"]
    a, b = generate(spec, "train", 70), generate(spec, "train", 70)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.captions == b.captions
    prefix = generate(spec, "train", 10)
    assert torch.equal(prefix.images, a.images[:10])
    other = generate(spec, "test", 10)
    assert not torch.equal(other.images, a.images[:10]), "splits use different seeds"


def test_each_image_knows_its_scene_kind():
    """A mixed domain's split records every image's scene kind: what is drawn (a room has a ceiling, a street
    a road, a park grass and no road) and what its caption names."""
    data = generate(SPECS["coconut"], "test", 40)
    assert len(data.scene_kinds) == 40 and set(data.scene_kinds) == set(SPECS["coconut"].scene)
    for kind, caption in zip(data.scene_kinds, data.captions):
        assert any(f" of a {word} " in caption for word in SCENE_WORDS[kind]), (kind, caption)
    assert data.head(5).scene_kinds == data.scene_kinds[:5]
    _, concepts, _, kinds = render(SPECS["coconut"], 40, seed=3)
    drawn = {"indoor": ("ceiling",), "street": ("road",), "park": ("grass",)}
    for concept_map, kind in zip(concepts, kinds):
        present = set(concept_map.unique().tolist())
        assert all(CONCEPT_ID[c] in present for c in drawn[kind]), kind
        assert kind == "street" or CONCEPT_ID["road"] not in present, kind


def test_labels_align_with_drawn_pixels():
    """Render twice with the same seed, once with a factor that only changes appearance: labels are
    identical, and pixel colour statistics differ by class (what is drawn is what is labelled)."""
    spec = SPECS["cityscapes"]
    img, lab, _, _ = render(spec, 32, seed=5)
    _, lab_fog, _, _ = render(spec.with_factors(fog=0.9), 32, seed=5)
    assert torch.equal(lab, lab_fog)
    sky, road = lab == CONCEPT_ID["sky"], lab == CONCEPT_ID["road"]
    blue = img[:, 2] - img[:, 0]
    assert blue[sky].mean() > blue[road].mean() + 0.1, "sky pixels are bluer than road pixels"
    rows = torch.arange(64).view(1, 64, 1).expand_as(lab).float()
    assert rows[sky].mean() < rows[road].mean(), "sky above road"


def test_factors_change_appearance_as_named():
    spec = SPECS["cityscapes"]
    day, _, _, _ = render(spec, 16, seed=1)
    night, _, _, _ = render(spec.with_factors(night=1.0), 16, seed=1)
    fog, _, _, _ = render(spec.with_factors(fog=1.0), 16, seed=1)
    assert night.mean() < 0.5 * day.mean()
    assert fog.std() < day.std(), "fog lowers contrast"


def test_any_size_and_combination():
    spec = validate_spec({"name": "custom", "dataset": "x", "scene": {"park": 1, "indoor": 1}, "style": "indian",
                          "factors": {"snow": 0.5, "dusk": 0.5, "blur": 1.0, "resolution": 0.5},
                          "vocabulary": {"grass": "grass", "wall": "wall", "person": "human"}, "size": 128})
    data = generate(spec, "train", 3)
    assert data.images.shape == (3, 3, 128, 128)
    assert abs(sum(spec.scene.values()) - 1) < 1e-6


def test_factor_ranges_draw_per_image_and_leave_other_factors_alone(tmp_path):
    """A [low, high] factor (a dataset shot by many cameras): each image draws its own intensity; a range of
    width zero renders exactly the fixed value, and the other factors' draws are untouched."""
    base = {**GOOD, "scene": "indoor", "vocabulary": {"wall": "wall", "person": "person"}}
    fixed = validate_spec({**base, "factors": {"noise": 0.05, "fog": 0.4, "jitter": 0}})
    pinned = validate_spec({**base, "factors": {"noise": [0.05, 0.05], "fog": 0.4, "jitter": 0}})
    assert pinned.factors["noise"] == [0.05, 0.05]
    assert torch.equal(render(fixed, 8, seed=2)[0], render(pinned, 8, seed=2)[0])
    many, _, caps, _ = render(validate_spec({**base, "factors": {"exposure": [0.5, 1.5]}}), 48, seed=2)
    one, _, _, _ = render(validate_spec({**base, "factors": {"exposure": 1.0}}), 48, seed=2)
    assert many.mean((1, 2, 3)).std() > 2 * one.mean((1, 2, 3)).std()
    assert any(" dark " in c for c in caps) and any(" bright " in c for c in caps)
    spec = get_domain(write_spec(pinned.with_factors(blur=[0.2, 1.0]), tmp_path / "many.yaml"))
    assert spec.factors == {"noise": [0.05, 0.05], "fog": 0.4, "jitter": 0.0, "blur": [0.2, 1.0]}


def test_captions_name_scene_conditions_and_classes():
    spec = SPECS["acdc_night"]
    data = generate(spec, "test", 8)
    for c in data.captions:
        assert c.startswith("a ") and " with " in c and c.endswith(".")
    assert sum("night" in c for c in data.captions) >= 6
    _, caps = web_corpus(64, seed=3)
    assert len(caps) == 64 and len(set(caps)) > 20


def test_condition_words_name_every_factor_present_and_style_sometimes():
    from semla_lab.data.world.generate import condition_words
    plain = {k: FACTORS[k][0] for k in FACTORS}
    assert condition_words(plain) == []
    nyu_like = {**plain, "noise": 0.06, "blur": 1.0, "resolution": 0.5, "cast_r": 1.1, "cast_b": 0.85}
    assert condition_words(nyu_like) == ["noisy", "blurry", "low-resolution", "warm-toned"]
    assert condition_words({**plain, "fog": 0.6, "snow": 0.7, "exposure": 0.8}) == ["foggy", "snowy", "dark"]
    caps = generate(SPECS["muses_fog_day"], "train", 64).captions
    assert all(c.startswith("a foggy low-resolution") for c in caps)
    assert 5 < sum("nordic style" in c for c in caps) < 40       # STYLE_MENTION = 0.3


def test_vocab_lut_maps_missing_concepts_to_ignore():
    lut = concept_to_class_lut(SPECS["nyu"])
    assert lut[CONCEPT_ID["wall"]] == 0 and lut[CONCEPT_ID["sky"]] == 255


GOOD = {"name": "d", "dataset": "x", "scene": "street", "vocabulary": {"road": "road"}}


@pytest.mark.parametrize("change, message", [
    ({"factors": {"haze": 0.3}}, "unknown factor 'haze'"),
    ({"factors": {"fog": -0.1}}, "must not be negative"),
    ({"factors": {"fog": 3.0}}, "outside"),
    ({"factors": {"fog": "thick"}}, "must be a number"),
    ({"factors": {"fog": [0.6, 0.2]}}, "low > high"),
    ({"factors": {"fog": [0.2, 1.5]}}, "outside"),
    ({"factors": {"noise": [0.01]}}, "or a \\[low, high\\] range"),
    ({"factors": {"jitter": [0.1, 0.2]}}, "'jitter' must be a number, got"),
    ({"vocabulary": {}}, "vocabulary is empty"),
    ({"vocabulary": {"dragon": "dragon"}}, "unknown concept 'dragon'"),
    ({"scene": "moon"}, "unknown scene kind"),
    ({"style": "baroque"}, "unknown style"),
    ({"colour": 1}, "unknown key"),
    ({"splits": {"train": -1}}, "non-negative integer"),
    ({"name": "../evil"}, "name"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_specs_rejected(change, message):
    with pytest.raises(SpecError, match=message):
        validate_spec({**GOOD, **change})


def test_missing_and_malformed_spec_files(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    missing = tmp_path / "m.yaml"
    missing.write_text(yaml.safe_dump({"name": "m", "dataset": "x", "scene": "park"}))
    with pytest.raises(SpecError, match="missing required key 'vocabulary'"):
        load_spec(missing, load_vocabularies(mini_dir() / "vocabularies.yaml"))


def test_get_domain_by_name_or_path_and_unknown():
    assert get_domain("nyu").name == "nyu"
    assert get_domain(str(mini_dir() / "nyu.yaml")).name == "nyu"
    with pytest.raises(KeyError, match="unknown domain"):
        get_domain("atlantis")
