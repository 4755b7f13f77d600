"""growth.py: the coverage math, greedy active order against brute force, and random orders."""
import pytest
import torch

from semla_lab.core.errors import UsageError
from semla_lab.library.growth import active_order, coverage, coverage_curve, coverage_gains, random_order


def test_coverage_by_hand_weighs_every_target_equally():
    a = torch.tensor([[0.0], [2.0]])                      # target a: distances 1 and 1 to the centroid at 1
    b = torch.tensor([[10.0], [10.0], [10.0], [13.0]])    # target b: 1, 1, 1, 4 to the centroid at 9
    cents = torch.tensor([[1.0], [9.0]])
    assert coverage([a, b], cents) == pytest.approx((1 + (1 + 1 + 1 + 4) / 4) / 2)
    assert coverage([a, b], cents[:1]) == pytest.approx((1 + (9 + 9 + 9 + 12) / 4) / 2)


def test_gains_equal_brute_force_coverage_of_each_extended_library():
    gen = torch.Generator().manual_seed(0)
    queries = [torch.randn(n, 6, generator=gen) for n in (5, 9, 3)]
    library, candidates = torch.randn(4, 6, generator=gen), torch.randn(7, 6, generator=gen)
    gains = coverage_gains(queries, library, candidates)
    brute = [coverage(queries, torch.cat([library, candidates[i:i + 1]])) for i in range(7)]
    assert torch.allclose(gains, torch.tensor(brute), atol=1e-6)
    alone = coverage_gains(queries, library[:0], candidates)          # empty library
    assert torch.allclose(alone, torch.tensor([coverage(queries, candidates[i:i + 1]) for i in range(7)]), atol=1e-6)


def test_active_order_is_the_greedy_argmin_at_every_step():
    gen = torch.Generator().manual_seed(1)
    queries = [torch.randn(6, 4, generator=gen) + 2, torch.randn(4, 4, generator=gen) - 2]
    cents = torch.randn(8, 4, generator=gen) * 2
    names = [f"d{i}" for i in range(8)]
    order = active_order(queries, cents, names)
    assert sorted(order) == names
    chosen = []
    for name in order:
        rest = [n for n in names if n not in chosen]
        scores = {n: coverage(queries, cents[[names.index(c) for c in chosen + [n]]]) for n in rest}
        assert scores[name] == pytest.approx(min(scores.values()), abs=1e-6)
        chosen.append(name)


def test_active_growth_covers_two_targets_before_piling_onto_one():
    """Targets near (0, 0) and (10, 0); the pool has three domains near the first, one near the second and one
    far away. Random orders often spend their first picks near the first target; active growth takes the
    nearest domain of each target first and the far one last."""
    queries = [torch.tensor([[0.0, 0.0], [0.2, 0.0]]), torch.tensor([[10.0, 0.0], [10.2, 0.0]])]
    cents = torch.tensor([[0.1, 0.1], [0.1, 0.5], [0.1, -0.8], [10.1, 0.3], [0.0, 40.0]])
    names = ["near0_a", "near0_b", "near0_c", "near10", "far"]
    order = active_order(queries, cents, names)
    assert order[:2] == ["near0_a", "near10"] and order[-1] == "far", order
    by_name = dict(zip(names, cents))
    active = coverage_curve(queries, by_name, order, [1, 2, 5])
    for seed in range(5):
        rand = coverage_curve(queries, by_name, random_order(names, seed), [1, 2, 5])
        assert active[1] <= rand[1] + 1e-9 and active[2] <= rand[2] + 1e-9
        assert active[5] == pytest.approx(rand[5])       # the whole pool: every order ends at the same library


def test_random_orders_are_seeded_permutations():
    names = [f"d{i}" for i in range(20)]
    assert random_order(names, 3) == random_order(names, 3) != random_order(names, 4)
    assert sorted(random_order(names, 3)) == sorted(names)


def test_bad_inputs_fail_clearly():
    with pytest.raises(UsageError, match="non-empty"):
        coverage([], torch.zeros(2, 3))
    with pytest.raises(UsageError, match="names"):
        active_order([torch.zeros(2, 3)], torch.zeros(4, 3), ["a", "b"])
    with pytest.raises(UsageError, match="sizes"):
        coverage_curve([torch.zeros(2, 1)], {"a": torch.zeros(1)}, ["a"], [2])
