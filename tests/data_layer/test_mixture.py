from collections import Counter

from moekit.data.mixture import MixtureSampler, mixture_order


def test_weighted_proportions_and_determinism():
    order = mixture_order([100, 50, 10], [3.0, 1.0, 1.0], "weighted", seed=1, num_samples=5000)
    share = Counter(d for d, _ in order)
    assert abs(share[0] / 5000 - 0.6) < 0.03 and abs(share[1] / 5000 - 0.2) < 0.03 and abs(share[2] / 5000 - 0.2) < 0.03
    assert order == mixture_order([100, 50, 10], [3.0, 1.0, 1.0], "weighted", seed=1, num_samples=5000)
    assert order != mixture_order([100, 50, 10], [3.0, 1.0, 1.0], "weighted", seed=2, num_samples=5000)
    assert order != mixture_order([100, 50, 10], [3.0, 1.0, 1.0], "weighted", seed=1, epoch=1, num_samples=5000)


def test_small_datasets_cycle_through_every_sample():
    order = mixture_order([4, 1000], [1.0, 1.0], "weighted", seed=0, num_samples=400)
    small = [i for d, i in order if d == 0]
    for start in range(0, len(small) - 4, 4):  # each pass visits all four before repeating
        assert sorted(small[start : start + 4]) == [0, 1, 2, 3]


def test_interleave_is_an_exact_round_robin():
    order = mixture_order([30, 30], [2.0, 1.0], "interleave", seed=0, num_samples=12)
    assert [d for d, _ in order] == [0, 1, 0, 0, 1, 0] * 2
    window = Counter(d for d, _ in mixture_order([30, 30, 30], [1, 2, 3], "interleave", 0, num_samples=60))
    assert window == {0: 10, 1: 20, 2: 30}


def test_concat_and_eval_order():
    order = mixture_order([3, 2], [1.0, 5.0], "concat", seed=0)
    assert sorted(order) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)] and order != sorted(order)
    assert mixture_order([3, 2], [1.0, 5.0], "weighted", seed=0, shuffle=False) == sorted(order)


def test_sampler_flat_indices_and_epochs():
    sampler = MixtureSampler([3, 2], [1.0, 1.0], "concat", seed=0)
    first = list(sampler)
    assert sorted(first) == [0, 1, 2, 3, 4] and len(sampler) == 5
    sampler.set_epoch(1)
    assert sorted(list(sampler)) == [0, 1, 2, 3, 4] and list(sampler) != first
    assert len(MixtureSampler([3, 2], [1.0, 1.0], "weighted", num_samples=7)) == 7
