"""The streaming, mergeable per-neuron state that capture keeps instead of activations.

For every neuron (layer l, unit d) it holds, over the visual and description positions
of every sample seen:

- `max_all`: the global max (the normaliser of METHOD.md section 3);
- per modality: positions count, sum, sum of squares, max, count of positive values;
- the top-N samples ranked by their max over visual and description positions (ties:
  lower sample index first), and for each of them the top-m activations of each modality
  (descending; -inf pads samples with fewer positions).

The top-m order statistics make the categories of METHOD.md section 4 exact after the
pass: "at least n tokens above T" holds iff the n-th largest value exceeds T.
`merge(state(A), state(B)) == state(A + B)` exactly, for disjoint sample sets.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from builder.io import write_with

NEG_INF = float("-inf")
STATE_FORMAT = "neuron-state/1"


@dataclass
class NeuronState:
    """Capture state of every neuron of every recorded layer (tensors on one device)."""

    max_all: torch.Tensor
    """float32 [L, D]: max over visual and description positions (-inf: nothing seen)."""
    visual_count: torch.Tensor
    """int64 [L]: visual positions seen (same for every neuron of a layer)."""
    text_count: torch.Tensor
    """int64 [L]: description positions seen."""
    visual_sum: torch.Tensor
    """float64 [L, D]."""
    visual_sumsq: torch.Tensor
    """float64 [L, D]."""
    text_sum: torch.Tensor
    """float64 [L, D]."""
    text_sumsq: torch.Tensor
    """float64 [L, D]."""
    visual_max: torch.Tensor
    """float32 [L, D]."""
    text_max: torch.Tensor
    """float32 [L, D]."""
    visual_positive: torch.Tensor
    """int64 [L, D]: visual positions with activation > 0."""
    text_positive: torch.Tensor
    """int64 [L, D]."""
    top_value: torch.Tensor
    """float32 [L, D, N]: the top samples' max activation, descending (-inf: empty slot)."""
    top_sample: torch.Tensor
    """int64 [L, D, N]: their sample index (-1: empty slot)."""
    top_visual: torch.Tensor
    """float32 [L, D, N, m]: each top sample's m largest visual activations, descending."""
    top_text: torch.Tensor
    """float32 [L, D, N, m]: each top sample's m largest description activations, descending."""

    @classmethod
    def empty(cls, layers: int, width: int, top_n: int, top_m: int, device: torch.device | str = "cpu") -> NeuronState:
        f32 = dict(dtype=torch.float32, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        L, D, N, m = layers, width, top_n, top_m
        return cls(
            max_all=torch.full((L, D), NEG_INF, **f32),
            visual_count=torch.zeros(L, **i64),
            text_count=torch.zeros(L, **i64),
            visual_sum=torch.zeros(L, D, **f64),
            visual_sumsq=torch.zeros(L, D, **f64),
            text_sum=torch.zeros(L, D, **f64),
            text_sumsq=torch.zeros(L, D, **f64),
            visual_max=torch.full((L, D), NEG_INF, **f32),
            text_max=torch.full((L, D), NEG_INF, **f32),
            visual_positive=torch.zeros(L, D, **i64),
            text_positive=torch.zeros(L, D, **i64),
            top_value=torch.full((L, D, N), NEG_INF, **f32),
            top_sample=torch.full((L, D, N), -1, **i64),
            top_visual=torch.full((L, D, N, m), NEG_INF, **f32),
            top_text=torch.full((L, D, N, m), NEG_INF, **f32),
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(layers, neurons per layer, N, m)."""
        return tuple(self.top_visual.shape)  # type: ignore[return-value]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, device: torch.device | str) -> NeuronState:
        return NeuronState(**{k: v.to(device) for k, v in self.tensors().items()})

    # -- updates -------------------------------------------------------------------------

    def update_layer(
        self,
        layer: int,
        activations: torch.Tensor,
        visual_mask: torch.Tensor,
        text_mask: torch.Tensor,
        sample_index: torch.Tensor,
    ) -> None:
        """Fold one batch of one layer in. activations: [B, T, D]; masks: bool [B, T]; sample_index: [B].

        Runs on the activations' device with no host synchronisation.
        """
        a = activations.float()
        m = self.top_visual.shape[-1]
        vis_top = _masked_topk(a, visual_mask, m)  # [B, m, D]
        txt_top = _masked_topk(a, text_mask, m)
        vis_f = visual_mask.to(a.dtype)
        txt_f = text_mask.to(a.dtype)
        self.visual_count[layer] += visual_mask.sum()
        self.text_count[layer] += text_mask.sum()
        self.visual_sum[layer] += torch.einsum("btd,bt->d", a, vis_f).double()
        self.text_sum[layer] += torch.einsum("btd,bt->d", a, txt_f).double()
        sq = a * a
        self.visual_sumsq[layer] += torch.einsum("btd,bt->d", sq, vis_f).double()
        self.text_sumsq[layer] += torch.einsum("btd,bt->d", sq, txt_f).double()
        positive = (a > 0).to(a.dtype)
        self.visual_positive[layer] += torch.einsum("btd,bt->d", positive, vis_f).round().long()
        self.text_positive[layer] += torch.einsum("btd,bt->d", positive, txt_f).round().long()
        self.visual_max[layer] = torch.maximum(self.visual_max[layer], vis_top[:, 0].amax(dim=0))
        self.text_max[layer] = torch.maximum(self.text_max[layer], txt_top[:, 0].amax(dim=0))
        sample_max = torch.maximum(vis_top[:, 0], txt_top[:, 0])  # [B, D]
        self.max_all[layer] = torch.maximum(self.max_all[layer], sample_max.amax(dim=0))
        B, D = sample_max.shape
        self._merge_top(
            layer,
            sample_max.T,  # [D, B]
            sample_index[None, :].expand(D, B),
            vis_top.permute(2, 0, 1),  # [D, B, m]
            txt_top.permute(2, 0, 1),
        )

    def _merge_top(
        self, layer: int, values: torch.Tensor, samples: torch.Tensor, visual: torch.Tensor, text: torch.Tensor
    ) -> None:
        n = self.top_value.shape[-1]
        cand_v = torch.cat([self.top_value[layer], values], dim=1)
        cand_s = torch.cat([self.top_sample[layer], samples], dim=1)
        order = _rank(cand_v, cand_s)[:, :n]
        self.top_value[layer] = cand_v.gather(1, order)
        self.top_sample[layer] = cand_s.gather(1, order)
        idx = order[..., None].expand(-1, -1, visual.shape[-1])
        self.top_visual[layer] = torch.cat([self.top_visual[layer], visual], dim=1).gather(1, idx)
        self.top_text[layer] = torch.cat([self.top_text[layer], text], dim=1).gather(1, idx)

    # -- merging -------------------------------------------------------------------------

    def merge(self, other: NeuronState) -> NeuronState:
        """State of the union of the two (disjoint) sample sets."""
        if self.shape != other.shape:
            raise ValueError(f"cannot merge states of shapes {self.shape} and {other.shape}")
        out = NeuronState(**{k: v.clone() for k, v in self.tensors().items()})
        for name in ("visual_count", "text_count", "visual_sum", "visual_sumsq", "text_sum", "text_sumsq",
                     "visual_positive", "text_positive"):
            getattr(out, name).add_(getattr(other, name))
        for name in ("max_all", "visual_max", "text_max"):
            setattr(out, name, torch.maximum(getattr(out, name), getattr(other, name)))
        for layer in range(self.shape[0]):
            out._merge_top(layer, other.top_value[layer], other.top_sample[layer], other.top_visual[layer],
                           other.top_text[layer])
        return out

    # -- persistence ---------------------------------------------------------------------

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write atomically with safetensors (never pickle)."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        meta = {"format": STATE_FORMAT, **(metadata or {})}
        write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> NeuronState:
        tensors = load_file(str(path), device=str(device))
        return cls(**{f.name: tensors[f.name] for f in fields(cls)})


def read_state_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def _masked_topk(a: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values at masked positions per (sample, neuron): [B, k, D], -inf padded."""
    masked = a.masked_fill(~mask[..., None], NEG_INF)
    T = masked.shape[1]
    top = masked.topk(min(k, T), dim=1).values
    if top.shape[1] < k:
        pad = top.new_full((top.shape[0], k - top.shape[1], top.shape[2]), NEG_INF)
        top = torch.cat([top, pad], dim=1)
    return top


def _rank(values: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Per row, positions sorted by value descending then sample index ascending.

    A total order, so that the kept top-N does not depend on batch order or sharding.
    Empty slots (-inf, -1) sort last.
    """
    by_sample = torch.argsort(torch.where(samples < 0, torch.iinfo(torch.int64).max, samples), dim=1, stable=True)
    v = values.gather(1, by_sample)
    by_value = torch.argsort(v, dim=1, descending=True, stable=True)
    return by_sample.gather(1, by_value)
