"""Hooks on the decoder MLPs that fold each layer's activations into the state and drop them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from builder.models.loading import DecoderMLP

LayerSink = Callable[[int, torch.Tensor], None]
"""Receives (layer index, activations [batch, seq, neurons]) during a forward pass."""


@contextmanager
def neuron_hooks(mlps: list[DecoderMLP], hook: str, sink: LayerSink) -> Iterator[None]:
    """Call `sink(layer, activations)` for every MLP in a forward pass; hooks are removed on exit.

    hook="act_fn": the output of `mlp.act_fn`, i.e. SiLU(gate_proj(x)) (the paper's neuron);
    hook="down_proj_input": the input of `mlp.down_proj`, i.e. SiLU(gate_proj(x)) * up_proj(x).
    """
    handles = []
    try:
        for mlp in mlps:
            if hook == "act_fn":
                def on_output(_mod: Any, _inp: Any, out: torch.Tensor, layer: int = mlp.layer) -> None:
                    sink(layer, out)

                handles.append(mlp.module.act_fn.register_forward_hook(on_output))
            elif hook == "down_proj_input":
                def on_input(_mod: Any, inp: tuple[torch.Tensor, ...], layer: int = mlp.layer) -> None:
                    sink(layer, inp[0])

                handles.append(mlp.module.down_proj.register_forward_pre_hook(on_input))
            else:
                raise ValueError(f"capture.hook={hook!r}: expected act_fn or down_proj_input")
        yield
    finally:
        for h in handles:
            h.remove()
