"""Hand-built capture states with known order statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from builder.capture.state import NEG_INF, NeuronState

Sample = tuple[Sequence[float], Sequence[float]]
"""One sample of one neuron: (visual activations, description activations)."""


def build_state(neurons: Sequence[Sequence[Sample]], top_n: int | None = None, top_m: int = 8) -> NeuronState:
    """A one-layer state: neuron d's top samples are `neurons[d]` (in that order, best first).

    Each modality keeps its `top_m` largest activations, descending, -inf padded, exactly
    as capture does; the neuron's max is the largest activation it was given.
    """
    width = len(neurons)
    top_n = top_n or max(len(s) for s in neurons)
    state = NeuronState.empty(1, width, top_n, top_m)
    for d, samples in enumerate(neurons):
        assert len(samples) <= top_n
        for i, (visual, text) in enumerate(samples):
            for values, top in ((visual, state.top_visual), (text, state.top_text)):
                ordered = sorted(values, reverse=True)[:top_m]
                top[0, d, i, : len(ordered)] = torch.tensor(ordered, dtype=torch.float32)
            sample_max = max([*visual, *text], default=NEG_INF)
            state.top_value[0, d, i] = sample_max
            state.top_sample[0, d, i] = i
        state.max_all[0, d] = max((max([*v, *t], default=NEG_INF) for v, t in samples), default=NEG_INF)
    return state


@pytest.fixture
def make_state() -> Callable[..., NeuronState]:
    return build_state
