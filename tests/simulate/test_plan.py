"""The scoring plan: seeded baseline choice within a category, random samples outside the top-N."""

from __future__ import annotations

from builder.simulate.stage import ExplainedNeuron, choose_baselines, choose_random_samples, random_pool


def _neurons(n: int, category: str, layer: int = 0) -> list[ExplainedNeuron]:
    return [ExplainedNeuron(layer, i, category, f"explanation {i}") for i in range(n)]


def test_baseline_is_another_neuron_of_the_same_category_and_seeded():
    neurons = _neurons(6, "text") + _neurons(4, "visual", layer=1) + [ExplainedNeuron(2, 0, "multimodal", "x")]
    chosen = choose_baselines(neurons, seed=0)
    for n in neurons:
        other = chosen[n.key]
        if n.category == "multimodal":
            assert other is None  # alone in its category: no baseline
            continue
        assert other is not None and other.key != n.key and other.category == n.category
    assert choose_baselines(list(reversed(neurons)), seed=0) == chosen
    # an identical explanation (the same concept in another layer) is never the baseline
    same = [ExplainedNeuron(0, 0, "text", "the word 'red'"), ExplainedNeuron(1, 0, "text", "The word  'red'"),
            ExplainedNeuron(2, 0, "text", "the word 'blue'")]
    picked = choose_baselines(same, seed=0)
    assert picked[(0, 0)].key == picked[(1, 0)].key == (2, 0) and picked[(2, 0)].key in {(0, 0), (1, 0)}
    assert choose_baselines(same[:2], seed=0) == {(0, 0): None, (1, 0): None}
    # a different seed gives different choices somewhere
    assert choose_baselines(neurons, seed=1) != chosen


def test_random_samples_come_from_outside_the_top_n():
    ids = [f"s{i:03d}" for i in range(100)]
    pool = random_pool(ids, 30, seed=0)
    assert len(pool) == 30 and len(set(pool)) == 30 and pool == random_pool(list(reversed(ids)), 30, seed=0)
    top = set(pool[:25])
    picked = choose_random_samples(pool, top, 5, seed=0, key=(1, 2))
    assert len(picked) == 5 and not (set(picked) & top) and set(picked) <= set(pool)
    assert picked == choose_random_samples(pool, top, 5, seed=0, key=(1, 2))
    # fewer outside the top-N than asked: all of them
    assert sorted(choose_random_samples(pool, set(pool[:28]), 5, seed=0, key=(1, 2))) == sorted(pool[28:])
    assert len(random_pool(ids[:3], 30, seed=0)) == 3


