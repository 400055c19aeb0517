"""Hook points: one call per layer per forward, removed on exit, and a clear error where the
layers share their activation module."""

from __future__ import annotations

import copy

import pytest
import torch

from builder.capture.hooks import neuron_hooks
from builder.errors import ModelError
from builder.models.loading import find_decoder_mlps


def _forward(model) -> None:
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.inference_mode():
        model.model.language_model(input_ids=ids)


@pytest.mark.parametrize("hook", ["act_fn", "down_proj_input"])
def test_one_call_per_layer_and_removed_on_exit(tiny_vlm, hook: str) -> None:
    mlps = tiny_vlm.mlps()
    calls: list[tuple[int, tuple[int, ...]]] = []
    with pytest.raises(RuntimeError, match="boom"):
        with neuron_hooks(mlps, hook, lambda layer, a: calls.append((layer, tuple(a.shape)))):
            _forward(tiny_vlm.model)
            raise RuntimeError("boom")
    assert calls == [(m.layer, (1, 5, m.width)) for m in mlps]
    _forward(tiny_vlm.model)  # hooks are gone, even after an exception
    assert len(calls) == len(mlps)


def test_shared_act_fn_is_refused_with_the_fix(tiny_vlm) -> None:
    model = copy.deepcopy(tiny_vlm.model)
    mlps = find_decoder_mlps(model)
    shared = mlps[0].module.act_fn
    for m in mlps:
        m.module.act_fn = shared
    # Why it must be refused: a hook on the shared module fires for every layer's forward.
    fired = []
    handle = shared.register_forward_hook(lambda *_: fired.append(1))
    _forward(model)
    handle.remove()
    assert len(fired) == len(mlps)
    with pytest.raises(ModelError, match="capture.hook=down_proj_input") as err:
        with neuron_hooks(mlps, "act_fn", lambda layer, a: None):
            pass
    assert "\n" not in str(err.value)
    seen = []
    with neuron_hooks(mlps, "down_proj_input", lambda layer, a: seen.append(layer)):
        _forward(model)
    assert seen == [m.layer for m in mlps]


def test_unknown_hook_point(tiny_vlm) -> None:
    with pytest.raises(ModelError, match="capture.hook='mlp_out'"):
        with neuron_hooks(tiny_vlm.mlps(), "mlp_out", lambda layer, a: None):
            pass
