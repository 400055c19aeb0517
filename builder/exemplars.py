"""The exemplars stage: what the explainer sees, and what the scorer keeps back.

1. Selection (METHOD.md 5): per layer and category, the neurons to explain, by recipe:
   the `per_category` most confident (ties: lower neuron index), a seeded random sample, or
   an explicit list. Unknown and dead neurons are never selected (nothing to show).
2. Split: each selected neuron's first `shown + held_out` top samples (rank order) are
   shuffled with a per-neuron seed; the first `shown` are given to the explainer, the next
   `held_out` kept for scoring. With fewer top samples, `shown` is filled first.
3. A second, small forward pass over the union of those samples only, hooked on every
   layer once per batch, keeping only the selected neurons' columns. Per (neuron, sample)
   it records the patch map (the image-token grid of the model's layout, 24 x 24 for
   LLaVA-1.5) and the activation of every description token, both on the 0-10 scale of
   the neuron's global max from the capture state (`builder.classify.normalise`).
4. Rendering: the grid's view of the image (the square the processor cropped or padded
   to, at `render_size`), and the activation-modulated image
   `p' = p * (a/10) + 255 * (1 - a/10)`, the patch map upsampled to the view by
   `exemplars.upsample` (bilinear: torch `interpolate`, align_corners=False, clipped to
   0-10; nearest: each pixel takes its patch's value), rounded to the nearest integer.

Output `exemplars.parquet`: one row per (neuron, rank), the `exemplars` config's columns.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from builder.config import ExemplarsConfig
from builder.errors import StageError
from builder.io import write_parquet
from builder.progress import progress
from builder.run import RunContext

log = logging.getLogger("builder")

EXEMPLARS_FILE = "exemplars.parquet"
ROLES = ("shown", "held_out")
EXPLAINED_CATEGORIES = ("visual", "text", "multimodal")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
"""Storage of a `datasets.Image` feature: embedded bytes (the Hub viewer shows them)."""
EXEMPLARS_SCHEMA = pa.schema(
    [
        ("layer", pa.int32()),
        ("neuron", pa.int32()),
        ("rank", pa.int32()),
        ("sample_id", pa.string()),
        ("role", pa.string()),
        ("image", IMAGE_TYPE),
        ("heatmap", pa.list_(pa.list_(pa.float32()))),
        ("tokens", pa.list_(pa.string())),
        ("token_activations", pa.list_(pa.float32())),
    ]
)

NeuronKey = tuple[int, int]
"""(layer, neuron)."""


# -- selection ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectedNeuron:
    """A neuron chosen for explanation."""

    layer: int
    neuron: int
    category: str
    """visual, text or multimodal."""
    confidence: float
    top_sample_ids: tuple[str, ...]
    """Its top-N samples, rank order (highest activation first)."""

    @property
    def key(self) -> NeuronKey:
        return (self.layer, self.neuron)


def select_neurons(neurons: pa.Table, cfg: ExemplarsConfig) -> tuple[list[SelectedNeuron], int]:
    """The neurons to explain (sorted by layer, neuron) and how many listed ones were left
    out for being unknown or dead (selection=list only)."""
    rows = neurons.select(["layer", "neuron", "category", "confidence", "dead", "top_sample_ids"]).to_pylist()
    by_key = {(r["layer"], r["neuron"]): r for r in rows}
    wanted = set(cfg.categories)

    def usable(r: dict[str, Any]) -> bool:
        return r["category"] in wanted and not r["dead"] and bool(r["top_sample_ids"])

    chosen: list[dict[str, Any]] = []
    left_out = 0
    if cfg.selection == "list":
        for layer, neuron in dict.fromkeys(cfg.neurons):  # keep order, drop repeats
            r = by_key.get((layer, neuron))
            if r is None:
                layers = sorted({k[0] for k in by_key})
                width = sum(1 for k in by_key if k[0] == layers[0]) if layers else 0
                raise StageError(
                    f"exemplars.neurons: ({layer}, {neuron}) is not a neuron of this model "
                    f"(layers {layers[0] if layers else '-'}..{layers[-1] if layers else '-'}, "
                    f"neurons 0..{width - 1}); fix the list"
                )
            if usable(r):
                chosen.append(r)
            else:
                left_out += 1
                why = "dead" if r["dead"] else f"category {r['category']}"
                log.warning("exemplars: neuron (%d, %d) is %s; not explained", layer, neuron, why)
    else:
        groups: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if usable(r):
                groups[(r["layer"], r["category"])].append(r)
        for (layer, category), members in sorted(groups.items()):
            if cfg.selection == "top_confidence":
                members = sorted(members, key=lambda r: (-r["confidence"], r["neuron"]))[: cfg.per_category]
            else:
                # Seeded per group, so one group's choice does not depend on the others.
                rng = random.Random(f"{cfg.seed}:{layer}:{category}")
                members = rng.sample(sorted(members, key=lambda r: r["neuron"]), min(cfg.per_category, len(members)))
            chosen.extend(members)
    chosen.sort(key=lambda r: (r["layer"], r["neuron"]))
    return [
        SelectedNeuron(int(r["layer"]), int(r["neuron"]), str(r["category"]), float(r["confidence"]),
                       tuple(r["top_sample_ids"]))
        for r in chosen
    ], left_out


def split_exemplars(neuron: SelectedNeuron, cfg: ExemplarsConfig) -> list[tuple[int, str, str]]:
    """(rank, sample_id, role) of the neuron's exemplars, rank order."""
    pool = list(enumerate(neuron.top_sample_ids[: cfg.shown + cfg.held_out]))
    random.Random(f"{cfg.seed}:{neuron.layer}:{neuron.neuron}").shuffle(pool)
    out = [(rank, sid, "shown" if i < cfg.shown else "held_out") for i, (rank, sid) in enumerate(pool)]
    return sorted(out)


# -- the exemplar pass -------------------------------------------------------------------


@dataclass
class SampleActivations:
    """One sample's activations for the neurons it was recorded for (0-10 scale)."""

    tokens: list[str]
    """The description's tokens as text (with their leading spaces)."""
    heatmaps: dict[NeuronKey, np.ndarray]
    """float32 [H, W] patch map per neuron."""
    token_activations: dict[NeuronKey, np.ndarray]
    """float32 [len(tokens)] per neuron."""


def neuron_max(ctx: RunContext) -> torch.Tensor:
    """float32 [L, D]: every neuron's global max from the capture state (read alone)."""
    from safetensors import safe_open

    from builder.capture.stage import STATE_FILE

    path = ctx.run_dir.capture_dir / STATE_FILE
    if not path.exists():
        raise StageError(f"{path} is missing; run the capture stage first")
    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor("max_all").float()


def token_strings(tokenizer: Any, ids: list[int], window: int = 4) -> list[str]:
    """Each token's text as it reads in context (leading spaces, whole characters).

    The text of token i is decode(ids[i-w:i+1]) minus decode(ids[i-w:i]): decoding a token
    alone loses SentencePiece's leading space and splits multi-byte characters.
    """
    out = []
    for i in range(len(ids)):
        lo = max(0, i - window)
        prev = tokenizer.decode(ids[lo:i]) if i > lo else ""
        cur = tokenizer.decode(ids[lo : i + 1])
        out.append(cur[len(prev):] if cur.startswith(prev) else tokenizer.decode(ids[i : i + 1]))
    return out


PASS_DIR = "exemplars-pass"
"""Work folder of the exemplar pass: one parquet file per finished batch, removed when the
stage has written its output."""
PASS_SCHEMA = pa.schema([
    ("sample", pa.int64()), ("tokens", pa.list_(pa.string())), ("layer", pa.int32()), ("neuron", pa.int32()),
    ("heatmap", pa.list_(pa.list_(pa.float32()))), ("token_activations", pa.list_(pa.float32())),
])


def _pass_identity(ctx: RunContext, wanted: dict[int, set[NeuronKey]]) -> str:
    """What a finished batch of the pass depends on: the samples and neurons asked for, the
    capture state (the 0-10 scale), the model and the hook point."""
    from builder.capture.stage import STATE_FILE
    from builder.io import file_digest, stable_hash

    return stable_hash([
        sorted((sample, sorted(keys)) for sample, keys in wanted.items()),
        file_digest(ctx.run_dir.capture_dir / STATE_FILE),
        ctx.recipe.section_dict("model"),
        ctx.recipe.capture.hook,
    ])


def _batch_table(recorded: dict[int, SampleActivations]) -> pa.Table:
    rows = [
        {"sample": sample, "tokens": rec.tokens, "layer": key[0], "neuron": key[1],
         "heatmap": rec.heatmaps[key].tolist(), "token_activations": rec.token_activations[key].tolist()}
        for sample, rec in recorded.items() for key in rec.heatmaps
    ]
    return pa.Table.from_pylist(rows, schema=PASS_SCHEMA)


def _read_batch(path: Path) -> dict[int, SampleActivations]:
    out: dict[int, SampleActivations] = {}
    for row in pq.read_table(path).to_pylist():
        rec = out.setdefault(row["sample"], SampleActivations(row["tokens"], {}, {}))
        key = (row["layer"], row["neuron"])
        rec.heatmaps[key] = np.asarray(row["heatmap"], dtype=np.float32)
        rec.token_activations[key] = np.asarray(row["token_activations"], dtype=np.float32)
    return out


def record_activations(
    ctx: RunContext, wanted: dict[int, set[NeuronKey]], batch_size: int | None = None
) -> dict[int, SampleActivations]:
    """Forward the samples in `wanted` (sample index -> neurons) and record their neurons.

    All layers are hooked once per batch; each layer keeps only the columns of its wanted
    neurons. Reuses capture's inputs (`BatchEncoder`, the same masks) and hooks. Every
    finished batch is saved in `PASS_DIR` at once, so a killed pass resumes after its last
    finished batch (with that run's batch size) instead of starting over.
    """
    import shutil

    from builder.capture.hooks import neuron_hooks
    from builder.capture.stage import BatchEncoder, _base_forward, capture_batch_size, to_device
    from builder.classify import normalise
    from builder.io import write_json
    from builder.models.layout import image_layout

    vlm = ctx.vlm
    mlps = vlm.mlps()
    layout = image_layout(vlm.model.config, getattr(vlm.processor, "image_processor", None))
    maxima = neuron_max(ctx)
    per_layer: dict[int, set[int]] = defaultdict(set)
    for keys in wanted.values():
        for layer, n in keys:
            per_layer[layer].add(n)
    columns = {layer: sorted(ns) for layer, ns in per_layer.items()}
    col_index = {layer: {n: i for i, n in enumerate(ns)} for layer, ns in columns.items()}
    col_tensor = {layer: torch.tensor(ns, device=vlm.device) for layer, ns in columns.items()}
    order = sorted(wanted)

    work = ctx.run_dir.path(PASS_DIR)
    identity = _pass_identity(ctx, wanted)
    marker = work / "identity.json"
    saved = json.loads(marker.read_text()) if marker.exists() else {}
    if saved.get("identity") == identity:
        size = int(saved["batch_size"])  # the interrupted run's batching, whatever `auto` says now
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        size = batch_size or capture_batch_size(ctx, ctx.recipe.capture.batch_size, order)
        write_json(marker, {"identity": identity, "batch_size": size})
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    done = {i for i in range(len(batches)) if (work / f"batch-{i:05d}.parquet").exists()}
    out: dict[int, SampleActivations] = {}
    for i in sorted(done):
        out.update(_read_batch(work / f"batch-{i:05d}.parquet"))
    if done:
        log.info("exemplars: resuming the pass after %d of %d batches", len(done), len(batches))
    pending = [i for i in range(len(batches)) if i not in done]
    # Images decoded and tokenised ahead of the model by capture's workers (capture.num_workers).
    loader = torch.utils.data.DataLoader(BatchEncoder(ctx, [batches[i] for i in pending]), batch_size=None,
                                         num_workers=ctx.recipe.capture.num_workers)
    tokenizer = getattr(vlm.processor, "tokenizer", vlm.processor)
    kept: dict[int, torch.Tensor] = {}

    def sink(layer: int, activations: torch.Tensor) -> None:
        if layer in col_tensor:  # stays on the device: one copy to the host per batch, not per layer
            kept[layer] = activations.index_select(-1, col_tensor[layer]).float()

    forward = _base_forward(vlm.model)
    with progress() as bar, neuron_hooks(mlps, ctx.recipe.capture.hook, sink), torch.inference_mode():
        task = bar.add_task("exemplars: forward", total=len(order),
                            completed=sum(len(batches[i]) for i in done))
        for i, encoded in zip(pending, loader, strict=True):
            batch = to_device(encoded, vlm.device)
            kept.clear()
            forward(**batch.inputs)
            layers = sorted(kept)
            on_host = torch.cat([kept[layer] for layer in layers], dim=-1).cpu().split(
                [kept[layer].shape[-1] for layer in layers], dim=-1)
            kept.update(zip(layers, on_host))
            ids = batch.inputs["input_ids"].cpu()
            visual, text = batch.visual_mask.cpu(), batch.text_mask.cpu()
            recorded: dict[int, SampleActivations] = {}
            for b, sample in enumerate(batch.sample_index.tolist()):
                tokens = token_strings(tokenizer, ids[b][text[b]].tolist())
                rec = SampleActivations(tokens, {}, {})
                for layer, n in sorted(wanted[sample]):
                    k = col_index[layer][n]
                    values = normalise(kept[layer][b, :, k], maxima[layer, n])  # [T]
                    rec.heatmaps[(layer, n)] = layout.heatmap(values[visual[b]]).numpy().astype(np.float32)
                    rec.token_activations[(layer, n)] = values[text[b]].numpy().astype(np.float32)
                recorded[sample] = rec
            write_parquet(work / f"batch-{i:05d}.parquet", _batch_table(recorded))
            out.update(recorded)
            bar.advance(task, len(visual))
    return out


# -- rendering ---------------------------------------------------------------------------


def grid_view(image: Image.Image, layout: Any, size: int) -> Image.Image:
    """The part of the image the patch grid covers, resized to `size` pixels wide.

    `layout.image_box` says which box that is (the centre crop, the padded square, or the
    whole image); area outside the image (padding) is white.
    """
    left, top, right, bottom = layout.image_box(*image.size)
    box_w, box_h = round(right - left), round(bottom - top)
    canvas = Image.new("RGB", (box_w, box_h), (255, 255, 255))
    canvas.paste(image.convert("RGB"), (-round(left), -round(top)))
    height = max(1, round(size * layout.height / layout.width))
    return canvas.resize((size, height), Image.Resampling.BICUBIC)


def upsample(heatmap: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """float32 [height, width] from an [H, W] patch map, values kept in 0-10."""
    t = torch.from_numpy(np.ascontiguousarray(heatmap, dtype=np.float32))[None, None]
    if mode == "nearest":
        up = torch.nn.functional.interpolate(t, size=(height, width), mode="nearest")
    elif mode == "bilinear":
        up = torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"exemplars.upsample={mode!r}: expected bilinear or nearest")
    return up[0, 0].clamp(0, 10).numpy()


def modulate(view: Image.Image, heatmap: np.ndarray, mode: str = "bilinear") -> Image.Image:
    """METHOD.md 5: p' = p * (a/10) + 255 * (1 - a/10) per pixel and channel (a: the
    upsampled patch map), rounded to the nearest integer: bright where the neuron fires,
    faded to white where it does not."""
    p = np.asarray(view.convert("RGB"), dtype=np.float32)
    a = upsample(heatmap, view.width, view.height, mode)[..., None] / 10.0
    out = p * a + 255.0 * (1.0 - a)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def encode_image(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", optimize=False)
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def token_display(tokens: list[str], activations: np.ndarray | list[float]) -> str:
    """The text display: each token with its 0-10 activation, e.g. `a red(9) circle(2)`;
    tokens below 0.5 carry no number."""
    parts = []
    for tok, act in zip(tokens, activations):
        value = int(round(float(act)))
        parts.append(f"{tok}({value})" if value > 0 else tok)
    return "".join(parts)


def render_size(ctx: RunContext) -> int:
    cfg = ctx.recipe.exemplars
    if cfg.render_size is not None:
        return cfg.render_size
    vision = getattr(ctx.vlm.model.config, "vision_config", None)
    return int(getattr(vision, "image_size", 336) or 336)


# -- the stage ---------------------------------------------------------------------------


def read_exemplars(path: Path) -> pa.Table:
    return pq.read_table(path)


class ExemplarsStage:
    name = "exemplars"
    version = "1"
    sections = ("exemplars", "capture")
    """Upstream digests (the capture state, the neurons) cover model, corpus and text."""

    def source_fingerprint(self, ctx: RunContext) -> str:
        return ""

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run_dir.path(EXEMPLARS_FILE)]

    def reset(self, ctx: RunContext) -> None:
        import shutil

        shutil.rmtree(ctx.run_dir.path(PASS_DIR), ignore_errors=True)

    def run(self, ctx: RunContext) -> dict[str, int]:
        from builder.corpus.base import open_image
        from builder.corpus.stage import read_samples
        from builder.models.layout import image_layout

        cfg = ctx.recipe.exemplars
        selected, left_out = select_neurons(pq.read_table(ctx.run_dir.neurons), cfg)
        samples = read_samples(ctx.run_dir.samples)
        index_of = {s.sample_id: i for i, s in enumerate(samples)}
        plan: list[tuple[SelectedNeuron, int, str, str]] = []
        wanted: dict[int, set[NeuronKey]] = defaultdict(set)
        for neuron in selected:
            for rank, sid, role in split_exemplars(neuron, cfg):
                plan.append((neuron, rank, sid, role))
                wanted[index_of[sid]].add(neuron.key)
        counts = {"neurons": len(selected), "left_out": left_out, "samples": len(wanted), "exemplars": len(plan)}
        for c in EXPLAINED_CATEGORIES:
            counts[c] = sum(1 for n in selected if n.category == c)
        if not plan:
            write_parquet(ctx.run_dir.path(EXEMPLARS_FILE), EXEMPLARS_SCHEMA.empty_table())
            return counts
        recorded = record_activations(ctx, wanted, cfg.batch_size)
        layout = image_layout(ctx.vlm.model.config, getattr(ctx.vlm.processor, "image_processor", None))
        size = render_size(ctx)
        ext = "png" if cfg.image_format == "png" else "jpg"
        by_sample: dict[str, list[tuple[SelectedNeuron, int, str]]] = defaultdict(list)
        for neuron, rank, sid, role in plan:
            by_sample[sid].append((neuron, rank, role))
        rows = []
        with progress() as bar:
            task = bar.add_task("exemplars: render", total=len(plan))
            # One image open per sample, however many neurons it serves.
            for sid, uses in by_sample.items():
                sample = samples[index_of[sid]]
                view = grid_view(open_image(sample.image_ref, ctx.recipe.corpus), layout, size)
                rec = recorded[index_of[sid]]
                for neuron, rank, role in uses:
                    heatmap = rec.heatmaps[neuron.key]
                    image = modulate(view, heatmap, cfg.upsample)
                    rows.append(
                        {
                            "layer": neuron.layer,
                            "neuron": neuron.neuron,
                            "rank": rank,
                            "sample_id": sid,
                            "role": role,
                            "image": {"bytes": encode_image(image, cfg.image_format, cfg.jpeg_quality),
                                      "path": f"L{neuron.layer}-N{neuron.neuron}-r{rank}.{ext}"},
                            "heatmap": heatmap.tolist(),
                            "tokens": rec.tokens,
                            "token_activations": rec.token_activations[neuron.key].tolist(),
                        }
                    )
                    bar.advance(task)
        rows.sort(key=lambda r: (r["layer"], r["neuron"], r["rank"]))
        write_parquet(ctx.run_dir.path(EXEMPLARS_FILE), pa.Table.from_pylist(rows, schema=EXEMPLARS_SCHEMA))
        self.reset(ctx)  # the pass's batches are in the output now
        counts["shown"] = sum(1 for r in rows if r["role"] == "shown")
        counts["held_out"] = sum(1 for r in rows if r["role"] == "held_out")
        return counts
