"""The streaming, mergeable per-neuron state that capture keeps instead of activations.

For every neuron (layer l, unit d) it holds, over the visual and description positions
of every sample seen:

- `max_all`: the global max (the normaliser of METHOD.md section 3);
- per modality: positions count, sum, sum of squares, max, count of positive values;
- the top-N samples ranked by their max over visual and description positions (value
  descending, then sample index ascending: a total order, so the kept set does not depend
  on batching or sharding), and for each of them the top-m activations of each modality
  (descending; -inf pads samples with fewer positions).

The top-m order statistics make the categories of METHOD.md section 4 exact after the
pass: "at least n tokens above T" holds iff the n-th largest value exceeds T.
`merge(state(A), state(B))` holds the same top-N, maxima and counts as `state(A + B)`,
exactly, for disjoint sample sets (the float64 sums agree up to addition order).

While streaming, the N slots of a neuron are in no particular order (inserting a sample
rewrites only the slot it takes, which keeps the update cheap); `canonical()` orders them,
and every saved file is canonical.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from builder.io import write_with

NEG_INF = float("-inf")
STATE_FORMAT = "neuron-state/1"
MAX_SAMPLE_INDEX = 2**32 - 2
"""Sample indices are packed into 32 bits of the ranking key."""


@dataclass
class BatchPositions:
    """Where the visual and description positions of one batch are; built once per batch
    from the masks and shared by every layer's update."""

    weights: torch.Tensor
    """float32 [B, 2, T]: the visual and text masks as 0/1, for the sums as one matmul."""
    visual_index: torch.Tensor
    """int64 [B, Kv]: each sample's visual positions in order, Kv = the most in the batch."""
    visual_pad: torch.Tensor | None
    """bool [B, Kv, 1]: entries of visual_index past a sample's own count; None if there are none."""
    text_index: torch.Tensor
    """int64 [B, Kt]: each sample's description positions in order."""
    text_pad: torch.Tensor | None
    """bool [B, Kt, 1]: padding entries of text_index; None if there are none."""
    counts: torch.Tensor
    """int64 [2]: visual and text positions in the batch."""
    sample_index: torch.Tensor
    """int64 [B]: index of each sample in the corpus."""

    @classmethod
    def from_masks(cls, visual_mask: torch.Tensor, text_mask: torch.Tensor, sample_index: torch.Tensor) -> BatchPositions:
        """Masks: bool [B, T]; sample_index: [B] (each in 0..MAX_SAMPLE_INDEX)."""
        if sample_index.numel() and int(sample_index.max()) > MAX_SAMPLE_INDEX:
            raise ValueError(f"sample index {int(sample_index.max())} exceeds {MAX_SAMPLE_INDEX}")
        visual_index, visual_pad = _positions(visual_mask)
        text_index, text_pad = _positions(text_mask)
        return cls(
            weights=torch.stack([visual_mask, text_mask], dim=1).float(),
            visual_index=visual_index,
            visual_pad=visual_pad,
            text_index=text_index,
            text_pad=text_pad,
            counts=torch.stack([visual_mask.sum(), text_mask.sum()]).long(),
            sample_index=sample_index.long(),
        )

    def to(self, device: torch.device | str) -> BatchPositions:
        move = {f.name: getattr(self, f.name) for f in fields(self)}
        return BatchPositions(**{k: None if v is None else v.to(device, non_blocking=True) for k, v in move.items()})


def _positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's True positions, left-aligned and padded to the longest row (pads point at 0)."""
    counts = mask.sum(dim=1)
    k = int(counts.max()) if mask.shape[0] else 0
    # A stable sort of "not in the mask" puts the row's positions first, in order.
    index = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
    pad = torch.arange(k, device=mask.device)[None, :] >= counts[:, None]
    index = index.masked_fill(pad, 0)
    return index, (pad[..., None] if bool(pad.any()) else None)


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
    """float32 [L, D, N]: the top samples' max activation (-inf: empty slot); descending when canonical."""
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

    def update_layer(self, layer: int, activations: torch.Tensor, positions: BatchPositions) -> None:
        """Fold one batch of one layer in. activations: [B, T, D] (any float dtype).

        Runs on the activations' device with no host synchronisation. Each statistic is one
        pass over [B, T, D] or over the modality's rows only; nothing of that size is kept.
        """
        a = activations.float()
        m = self.top_visual.shape[-1]
        # Sums, sums of squares and positive counts of both modalities: one [B,2,T] x [B,T,D]
        # matmul each, reusing one scratch tensor for a^2 and (a > 0).
        w = positions.weights
        sums = torch.bmm(w, a).double().sum(0)  # [2, D]
        scratch = torch.mul(a, a)
        sumsq = torch.bmm(w, scratch).double().sum(0)
        positive = torch.bmm(w, torch.gt(a, 0, out=scratch)).sum(0).round_().long()
        del scratch
        self.visual_count[layer] += positions.counts[0]
        self.text_count[layer] += positions.counts[1]
        self.visual_sum[layer] += sums[0]
        self.text_sum[layer] += sums[1]
        self.visual_sumsq[layer] += sumsq[0]
        self.text_sumsq[layer] += sumsq[1]
        self.visual_positive[layer] += positive[0]
        self.text_positive[layer] += positive[1]
        vis_top = _top_rows(a, positions.visual_index, positions.visual_pad, m)  # [B, m, D]
        txt_top = _top_rows(a, positions.text_index, positions.text_pad, m)
        self.visual_max[layer] = torch.maximum(self.visual_max[layer], vis_top[:, 0].amax(dim=0))
        self.text_max[layer] = torch.maximum(self.text_max[layer], txt_top[:, 0].amax(dim=0))
        sample_max = torch.maximum(vis_top[:, 0], txt_top[:, 0])  # [B, D]
        self.max_all[layer] = torch.maximum(self.max_all[layer], sample_max.amax(dim=0))
        B, D = sample_max.shape
        self._insert_top(
            layer,
            sample_max.T,  # [D, B]
            positions.sample_index[None, :].expand(D, B),
            vis_top.permute(2, 0, 1),  # [D, B, m]
            txt_top.permute(2, 0, 1),
        )

    def _insert_top(
        self, layer: int, values: torch.Tensor, samples: torch.Tensor, visual: torch.Tensor, text: torch.Tensor
    ) -> None:
        """Let C candidates per neuron ([D, C], [D, C, m]) into the layer's top-N, exactly.

        Ranks the N kept and C new entries together, then writes each candidate that makes
        the top N into a slot whose entry fell out; the other slots are not touched.
        """
        n = self.top_value.shape[-1]
        top_value, top_sample = self.top_value[layer], self.top_sample[layer]
        keys = torch.cat([_rank_key(top_value, top_sample), _rank_key(values, samples)], dim=1)  # [D, N+C]
        best = keys.argsort(dim=1, descending=True)[:, :n]
        kept = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, best, True)
        k = min(values.shape[1], n)
        # As many kept entries fall out as candidates come in: pair the i-th of each. A stable
        # sort lists the fallen slots (and the entering candidates) first.
        slots = kept[:, :n].to(torch.int8).argsort(dim=1, stable=True)[:, :k]  # [D, k]
        entering = (~kept[:, n:]).to(torch.int8).argsort(dim=1, stable=True)[:, :k]
        valid = torch.arange(k, device=keys.device)[None, :] < kept[:, n:].sum(dim=1, keepdim=True)
        # Pairs past the number entering rewrite the slot with its own value (a no-op).
        for top, new in ((top_value, values), (top_sample, samples)):
            top.scatter_(1, slots, torch.where(valid, new.gather(1, entering), top.gather(1, slots)))
        m = visual.shape[-1]
        slots_m, entering_m, valid_m = (t[..., None].expand(-1, -1, m) for t in (slots, entering, valid))
        for top, new in ((self.top_visual[layer], visual), (self.top_text[layer], text)):
            top.scatter_(1, slots_m, torch.where(valid_m, new.gather(1, entering_m), top.gather(1, slots_m)))

    # -- merging and order ---------------------------------------------------------------

    def merge(self, other: NeuronState) -> NeuronState:
        """State of the union of the two (disjoint) sample sets, canonical."""
        if self.shape != other.shape:
            raise ValueError(f"cannot merge states of shapes {self.shape} and {other.shape}")
        out = NeuronState(**{k: v.clone() for k, v in self.tensors().items()})
        for name in ("visual_count", "text_count", "visual_sum", "visual_sumsq", "text_sum", "text_sumsq",
                     "visual_positive", "text_positive"):
            getattr(out, name).add_(getattr(other, name))
        for name in ("max_all", "visual_max", "text_max"):
            setattr(out, name, torch.maximum(getattr(out, name), getattr(other, name)))
        for layer in range(self.shape[0]):
            out._insert_top(layer, other.top_value[layer], other.top_sample[layer], other.top_visual[layer],
                            other.top_text[layer])
        return out.canonical()

    def canonical(self) -> NeuronState:
        """A copy whose top-N slots are ordered: value descending, then sample index ascending."""
        order = _rank_key(self.top_value, self.top_sample).argsort(dim=-1, descending=True)  # [L, D, N]
        m = self.top_visual.shape[-1]
        order_m = order[..., None].expand(-1, -1, -1, m)
        tensors = {k: v.clone() for k, v in self.tensors().items() if not k.startswith("top_")}
        tensors.update(
            top_value=self.top_value.gather(-1, order),
            top_sample=self.top_sample.gather(-1, order),
            top_visual=self.top_visual.gather(-2, order_m),
            top_text=self.top_text.gather(-2, order_m),
        )
        return NeuronState(**tensors)

    # -- persistence ---------------------------------------------------------------------

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the canonical state atomically with safetensors (never pickle)."""
        cpu = self.to("cpu").canonical()
        tensors = {k: v.contiguous() for k, v in cpu.tensors().items()}
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


def _top_rows(a: torch.Tensor, index: torch.Tensor, pad: torch.Tensor | None, k: int) -> torch.Tensor:
    """The k largest values over the rows `index` of each sample: [B, k, D], -inf padded."""
    B, K = index.shape
    rows = a[torch.arange(B, device=a.device)[:, None], index]  # [B, K, D]: copies only these rows
    if pad is not None:
        rows.masked_fill_(pad, NEG_INF)
    top = rows.topk(min(k, K), dim=1).values
    if top.shape[1] < k:
        top = torch.cat([top, top.new_full((B, k - top.shape[1], a.shape[2]), NEG_INF)], dim=1)
    return top


def _rank_key(values: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """One int64 per entry whose descending order is value descending, then sample ascending.

    The high 32 bits are the float's bits mapped to an order-preserving integer; the low
    32 bits are `2^32 - 1 - sample`, so an empty slot (sample -1) ranks below any sample of
    the same value. Keys are unique for distinct samples: the order is total.
    """
    bits = (values.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)  # + 0.0: -0.0 -> +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their magnitude bits
    low = torch.where(samples < 0, 0, 0xFFFFFFFF - samples)
    return ordered * 2**32 + low
