"""world/pool.py: seeded, nested, valid and plausible domain pools, written as ordinary spec files."""
import pytest
import torch

from semla_lab.core.errors import UsageError
from semla_lab.core.manifests import manifests_dir
from semla_lab.data.world.concepts import SCENE_KINDS
from semla_lab.data.world.generate import generate, get_domain, shipped_domains
from semla_lab.data.world.pool import (VOCAB_COVERAGE, WEATHER, domain_pool, read_pool, vocabulary_fits,
                                  write_pool)
from semla_lab.data.world.spec import to_dict


def test_same_seed_same_pool_and_smaller_pools_are_prefixes():
    pool = domain_pool(30, pool_seed=3)
    assert [to_dict(s) for s in pool] == [to_dict(s) for s in domain_pool(30, pool_seed=3)]
    assert [to_dict(s) for s in domain_pool(7, pool_seed=3)] == [to_dict(s) for s in pool[:7]]
    assert [to_dict(s) for s in domain_pool(30, pool_seed=4)] != [to_dict(s) for s in pool]


def test_pool_domains_are_valid_varied_and_clear_of_shipped_and_held_out_ones():
    pool = domain_pool(80)
    heldout = [get_domain(p) for p in sorted((manifests_dir() / "heldout").glob("*.yaml"))]
    others = list(shipped_domains().values()) + heldout
    assert len({s.name for s in pool}) == 80 and not {s.name for s in pool} & {s.name for s in others}
    assert len({s.seed for s in pool}) == 80 and not {s.seed for s in pool} & {s.seed for s in others}
    for spec in pool:
        assert vocabulary_fits(spec.vocabulary, spec.scene), spec
        assert abs(sum(spec.scene.values()) - 1) < 1e-9
        if set(spec.scene) == {"indoor"}:
            assert not set(spec.factors) & set(WEATHER), f"{spec.name}: weather indoors"
        assert not {"dusk", "night"} <= set(spec.factors), f"{spec.name}: dusk and night at once"
    # every kind of variation occurs
    assert {k for s in pool for k in s.scene} == set(SCENE_KINDS)
    assert len({s.style for s in pool}) == 4 and len({tuple(s.vocabulary) for s in pool}) >= 5
    assert all(any(w in s.factors for s in pool) for w in (*WEATHER, "dusk", "night", "noise", "blur"))
    assert sum(len(s.scene) > 1 for s in pool) >= 10


def test_vocabulary_fit_rule():
    nyu = {c: c for c in SCENE_KINDS["indoor"]}
    assert vocabulary_fits(nyu, {"indoor": 1.0}) and not vocabulary_fits(nyu, {"indoor": 0.5, "street": 0.5})
    almost = {c: c for c in SCENE_KINDS["street"][:-2]}          # 7 of 9 street concepts: below 80%
    assert len(almost) < VOCAB_COVERAGE * len(SCENE_KINDS["street"]) and not vocabulary_fits(almost, {"street": 1})


def test_pool_images_are_labelled_by_their_vocabulary():
    """A plausible domain names most of what it draws: few pixels fall outside its vocabulary (ignore)."""
    for spec in domain_pool(12, pool_seed=1):
        data = generate(spec, "train", 8)
        ignored = (data.labels == 255).float().mean().item()
        assert ignored < 0.15, (spec.name, spec.scene, ignored)
        assert len(torch.unique(data.labels)) >= 4


def test_pool_round_trips_through_spec_files(tmp_path):
    pool = domain_pool(5, pool_seed=2)
    folder = write_pool(pool, tmp_path / "pool")
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{s.name}.yaml" for s in pool] + ["vocabularies.yaml"])
    assert [to_dict(s) for s in read_pool(folder)] == [to_dict(s) for s in pool]
    assert to_dict(get_domain(folder / f"{pool[3].name}.yaml")) == to_dict(pool[3])   # an ordinary spec file
    assert "vocabulary: " in (folder / f"{pool[0].name}.yaml").read_text()
    with pytest.raises(UsageError, match="exists"):
        write_pool(pool, folder)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left behind"


@pytest.mark.parametrize("size, seed, message", [(0, 0, "pool size"), (5, -1, "pool seed"), (1001, 0, "pool size")])
def test_bad_pool_arguments(size, seed, message):
    with pytest.raises(UsageError, match=message):
        domain_pool(size, seed)
