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

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from builder.io import write_with

NEG_INF = float("-inf")
STATE_FORMAT = "neuron-state/1"
MAX_SAMPLE_INDEX = 2**32 - 2
"""Sample indices are packed into 32 bits of the ranking key."""


@dataclass
class Rows:
    """Where one modality sits in a batch: row j of sample b is position `start + j` (one
    slice shared by every sample, read without copying) or `index[b, j]` (gathered)."""

    start: int | None
    """First position when every sample's positions are start, start+1, ...; else None."""
    index: torch.Tensor
    """int64 [B, K]: each sample's positions in order, K = the most any sample has."""
    pad: torch.Tensor | None
    """bool [B, K, 1]: rows past a sample's own count (not its positions); None if none."""

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Rows:
        counts = mask.sum(dim=1)
        k = int(counts.max()) if mask.shape[0] else 0
        # A stable sort of "not in the mask" puts each row's positions first, in order.
        index = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
        pad = torch.arange(k, device=mask.device)[None, :] >= counts[:, None]
        index = index.masked_fill(pad, 0)
        start = int(index[0, 0]) if k else 0
        ramp = torch.arange(start, start + k, device=mask.device).expand_as(index)
        shared = start + k <= mask.shape[1] and bool((index == ramp)[~pad].all())
        return cls(start if shared else None, index, pad[..., None] if bool(pad.any()) else None)

    def to(self, device: torch.device | str) -> Rows:
        pad = None if self.pad is None else self.pad.to(device, non_blocking=True)
        return Rows(self.start, self.index.to(device, non_blocking=True), pad)

    def take(self, a: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        """[B, K, D]: the modality's rows of activations a [B, T, D], -inf in padding rows.

        A view of `a` where possible; otherwise written into `work` (a buffer shaped like
        `a`, whose earlier contents are overwritten), so no large tensor is allocated.
        """
        B, K = self.index.shape
        T, D = a.shape[1], a.shape[2]
        if self.start is not None:
            rows = a[:, self.start : self.start + K]
            if self.pad is None:
                return rows
            return work[:, :K].copy_(rows).masked_fill_(self.pad, NEG_INF)
        flat = (self.index + T * torch.arange(B, device=a.device)[:, None]).flatten()
        rows = torch.index_select(a.reshape(B * T, D), 0, flat, out=work.view(B * T, D)[: B * K]).view(B, K, D)
        return rows if self.pad is None else rows.masked_fill_(self.pad, NEG_INF)


class WorkBuffer:
    """A float32 buffer for [B, T, D]-sized intermediates, reused by every layer and batch.

    Its capacity only grows (to the largest batch seen): allocating a fresh buffer of that
    size for every layer costs page faults comparable to the reduction work itself.
    """

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def like(self, a: torch.Tensor) -> torch.Tensor:
        """A float32 tensor shaped like `a`, on its device (contents undefined)."""
        n = a.numel()
        if self._flat is None or self._flat.numel() < n or self._flat.device != a.device:
            self._flat = None  # free the old one first
            self._flat = torch.empty(n, dtype=torch.float32, device=a.device)
        return self._flat[:n].view(a.shape)


@dataclass
class BatchPositions:
    """Where the visual and description positions of one batch are; built once per batch
    from the masks and shared by every layer's update."""

    weights: torch.Tensor
    """float32 [B, 2, T]: the visual and text masks as 0/1 (the moments are matmuls with it)."""
    visual: Rows
    """The image-token rows."""
    text: Rows
    """The description rows."""
    counts: torch.Tensor
    """int64 [2]: visual and text positions in the batch."""
    sample_index: torch.Tensor
    """int64 [B]: index of each sample in the corpus."""
    work: WorkBuffer = field(default_factory=WorkBuffer)
    """Scratch space of the updates; pass one WorkBuffer to every batch to reuse it."""

    @classmethod
    def from_masks(
        cls, visual_mask: torch.Tensor, text_mask: torch.Tensor, sample_index: torch.Tensor,
        work: WorkBuffer | None = None,
    ) -> BatchPositions:
        """Masks: bool [B, T]; sample_index: [B] (each in 0..MAX_SAMPLE_INDEX)."""
        if sample_index.numel() and int(sample_index.max()) > MAX_SAMPLE_INDEX:
            raise ValueError(f"sample index {int(sample_index.max())} exceeds {MAX_SAMPLE_INDEX}")
        return cls(
            weights=torch.stack([visual_mask, text_mask], dim=1).float(),
            visual=Rows.from_mask(visual_mask),
            text=Rows.from_mask(text_mask),
            counts=torch.stack([visual_mask.sum(), text_mask.sum()]).long(),
            sample_index=sample_index.long(),
            work=work or WorkBuffer(),
        )

    def to(self, device: torch.device | str) -> BatchPositions:
        return BatchPositions(
            weights=self.weights.to(device, non_blocking=True),
            visual=self.visual.to(device),
            text=self.text.to(device),
            counts=self.counts.to(device, non_blocking=True),
            sample_index=self.sample_index.to(device, non_blocking=True),
            work=self.work,
        )


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

        Runs on the activations' device with no host synchronisation, in few passes over
        [B, T, D] (benchmarks/capture.py measures the cost): the moments in one pass
        (:func:`_moments`), and a top-m per modality that reads the rows in place where it can.
        """
        a = activations.float()
        m = self.top_visual.shape[-1]
        work = positions.work.like(a)
        sums, sumsq, positive = _moments(a, positions.weights, work)  # [2, D] each: visual, text
        self.visual_count[layer] += positions.counts[0]
        self.text_count[layer] += positions.counts[1]
        self.visual_sum[layer] += sums[0]
        self.text_sum[layer] += sums[1]
        self.visual_sumsq[layer] += sumsq[0]
        self.text_sumsq[layer] += sumsq[1]
        positive = positive.round().long()  # sums of 0/1 below 2^24 per sample: exact
        self.visual_positive[layer] += positive[0]
        self.text_positive[layer] += positive[1]
        vis_top = _top_m(positions.visual.take(a, work), m)  # [B, m, D]
        txt_top = _top_m(positions.text.take(a, work), m)
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


CPU_SLICE_BYTES = 1 << 20
"""On a CPU, :func:`_moments` works through [B, R, D] slices of about this size (cache-sized)."""


def _moments(a: torch.Tensor, weights: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Sum, sum of squares and count of positive values of a [B, T, D] over the visual and
    text positions: float64 [3, 2, D] (moment, modality, neuron).

    Per slice of R positions: three [B,2,R] x [B,R,D] matmuls, of a, of a*a and of (a > 0),
    accumulated in float32 per sample and summed over samples in float64. On a CPU the
    slices fit in cache, so a is read from memory once instead of five times (about a
    third of the time); on a GPU one slice covers all positions.
    """
    B, T, D = a.shape
    R = T if a.device.type != "cpu" else max(8, CPU_SLICE_BYTES // (4 * B * D))
    acc = a.new_zeros(3, B, 2, D)
    for t0 in range(0, T, R):
        x, w = a[:, t0 : t0 + R], weights[:, :, t0 : t0 + R]
        tmp = work.view(-1)[: x.numel()].view(x.shape)
        acc[0].baddbmm_(w, x)
        acc[1].baddbmm_(w, torch.mul(x, x, out=tmp))
        acc[2].baddbmm_(w, torch.gt(x, 0, out=tmp))
    return acc.sum(dim=1, dtype=torch.float64)


def _top_m(rows: torch.Tensor, m: int) -> torch.Tensor:
    """The m largest values of each (sample, neuron) over the rows: [B, K, D] -> [B, m, D],
    descending, -inf padded when K < m.

    Exact shortcut for many rows: cut them into groups of g rows; the m largest values all
    lie in the m groups with the largest group maxima (a value outside those groups is
    beaten by all m of their maxima), so a top-m over those m * g rows (and the < g rows
    left over) gives the same values as one over all K rows, ties included. With
    g ~ sqrt(K / m), both top-m calls are over far fewer rows than K: about half the time
    of a top-m over all rows on a CPU (benchmarks/capture.py).
    """
    B, K, D = rows.shape
    g = max(2, round(math.sqrt(K / m)))
    n_groups = K // g
    if n_groups < 2 * m:
        top = rows.topk(min(m, K), dim=1).values
    else:
        groups = rows[:, : n_groups * g].unflatten(1, (n_groups, g))  # [B, G, g, D]
        best = groups.amax(dim=2).topk(m, dim=1, sorted=False).indices  # [B, m, D]
        cand = groups.gather(1, best[:, :, None, :].expand(B, m, g, D)).flatten(1, 2)
        if K > n_groups * g:
            cand = torch.cat([cand, rows[:, n_groups * g :]], dim=1)
        top = cand.topk(m, dim=1).values
    if top.shape[1] < m:
        top = torch.cat([top, top.new_full((B, m - top.shape[1], D), NEG_INF)], dim=1)
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
