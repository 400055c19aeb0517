"""Hooks on the decoder MLPs that hand each layer's activations to a sink and drop them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from builder.errors import ModelError
from builder.models.loading import DecoderMLP

LayerSink = Callable[[int, torch.Tensor], None]
"""Receives (layer index, activations [batch, seq, neurons]) during a forward pass."""

HOOKS = ("act_fn", "down_proj_input")


def check_hook_points(mlps: list[DecoderMLP], hook: str) -> None:
    """Fail clearly where the hook point cannot tell the layers apart.

    A forward hook fires wherever its module runs: a model whose layers share one `act_fn`
    module would report every layer's activation to every layer's hook.
    """
    if hook not in HOOKS:
        raise ModelError(f"capture.hook={hook!r}: expected one of {', '.join(HOOKS)}")
    if hook == "act_fn":
        shared = len({id(m.module.act_fn) for m in mlps}) < len(mlps)
        if shared:
            raise ModelError(
                "capture.hook=act_fn: the decoder layers share one act_fn module, so its hook cannot tell "
                "layers apart; set capture.hook=down_proj_input"
            )


@contextmanager
def neuron_hooks(mlps: list[DecoderMLP], hook: str, sink: LayerSink) -> Iterator[None]:
    """Call `sink(layer, activations)` for every MLP in a forward pass; hooks are removed on exit.

    hook="act_fn": the output of `mlp.act_fn`, i.e. SiLU(gate_proj(x)) (the paper's neuron);
    hook="down_proj_input": the input of `mlp.down_proj`, i.e. SiLU(gate_proj(x)) * up_proj(x).
    """
    check_hook_points(mlps, hook)
    handles = []
    try:
        for mlp in mlps:
            if hook == "act_fn":
                def on_output(_mod: Any, _inp: Any, out: torch.Tensor, layer: int = mlp.layer) -> None:
                    sink(layer, out)

                handles.append(mlp.module.act_fn.register_forward_hook(on_output))
            else:
                def on_input(_mod: Any, inp: tuple[torch.Tensor, ...], layer: int = mlp.layer) -> None:
                    sink(layer, inp[0])

                handles.append(mlp.module.down_proj.register_forward_pre_hook(on_input))
        yield
    finally:
        for h in handles:
            h.remove()
