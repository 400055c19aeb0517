"""The capture stage: one teacher-forced pass over the corpus, reducing every FFN neuron's
activations into a :class:`NeuronState` on the model's device.

Resumable: the state of this process's shard is checkpointed every
`capture.checkpoint_every` batches (atomically); a rerun continues after the last
checkpointed batch and ends with exactly the state an uninterrupted run gives.
Multi-process: under `accelerate launch`, process r of W takes samples r, r+W, ...; the
shard states are merged by the main process into `capture/state.safetensors`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from builder.capture.hooks import neuron_hooks
from builder.capture.inputs import ModelBatch, encode_batch
from builder.capture.memory import capture_bytes_per_sample, choose_batch_size, shape_of
from builder.capture.state import BatchPositions, NeuronState, WorkBuffer, read_state_metadata
from builder.corpus.base import open_image
from builder.corpus.stage import read_samples
from builder.errors import StageError
from builder.io import stable_hash
from builder.progress import progress
from builder.run import RunContext
from builder.text import read_texts

log = logging.getLogger("builder")

STATE_FILE = "state.safetensors"


@dataclass(frozen=True)
class Shard:
    """This process's part of the corpus."""

    rank: int
    world: int

    def indices(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world))

    @property
    def checkpoint_name(self) -> str:
        return f"shard-{self.rank:03d}-of-{self.world:03d}.safetensors"


class BatchEncoder(torch.utils.data.Dataset):
    """Batch i of the shard as a ModelBatch on the CPU (runs in DataLoader workers)."""

    def __init__(self, ctx: RunContext, batches: list[list[int]]):
        self.samples = read_samples(ctx.run_dir.samples)
        self.texts = read_texts(ctx.run_dir.texts)
        self.batches = batches
        self.corpus_cfg = ctx.recipe.corpus
        self.prompt = ctx.recipe.text.prompt
        self.processor = ctx.vlm.processor
        self.image_token_id = ctx.vlm.image_token_id

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> ModelBatch:
        idx = self.batches[i]
        images = [open_image(self.samples[j].image_ref, self.corpus_cfg) for j in idx]
        texts = [self.texts[self.samples[j].sample_id].text for j in idx]
        # Right padding: every sample's prompt and image then sit at the same positions, so
        # the capture reads the image rows of all samples as one slice (no copy), and each
        # sample's positions are those of its unbatched forward.
        return encode_batch(self.processor, images, texts, self.prompt, self.image_token_id, idx,
                            padding_side="right")


def to_device(batch: ModelBatch, device: Any) -> ModelBatch:
    nb = str(device).startswith("cuda")
    return ModelBatch(
        inputs={k: v.to(device, non_blocking=nb) for k, v in batch.inputs.items()},
        visual_mask=batch.visual_mask.to(device, non_blocking=nb),
        text_mask=batch.text_mask.to(device, non_blocking=nb),
        sample_index=batch.sample_index.to(device, non_blocking=nb),
    )


def capture_shard(ctx: RunContext, shard: Shard, checkpoint: Path) -> NeuronState:
    """Run (or resume) the capture of one shard, checkpointing as it goes."""
    cfg = ctx.recipe.capture
    vlm = ctx.vlm
    mlps = vlm.mlps()
    n_samples = len(read_samples(ctx.run_dir.samples))
    mine = shard.indices(n_samples)
    device = vlm.device
    top_n, top_m = ctx.recipe.classify.top_n, cfg.top_m
    for torn in checkpoint.parent.glob(f".{checkpoint.name}.*.tmp"):
        torn.unlink()  # a checkpoint write cut short by a kill (the checkpoint itself is intact)
    meta = read_state_metadata(checkpoint) if checkpoint.exists() else {}
    resuming = meta.get("identity") == _shard_identity(ctx, shard) and "batch_size" in meta
    if resuming:
        # The batching of the interrupted run, so that `batches_done` counts the same samples
        # (an `auto` size chosen now could differ).
        batch_size = int(meta["batch_size"])
        state = NeuronState.load(checkpoint, device=device)
        done = int(meta["batches_done"])
    else:
        batch_size = capture_batch_size(ctx, cfg.batch_size, mine)
        state = NeuronState.empty(len(mlps), mlps[0].width, top_n, top_m, device)
        done = 0
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    if resuming:
        log.info("capture: resuming %s after batch %d of %d", checkpoint.name, done, len(batches))

    current: dict[str, BatchPositions] = {}
    work = WorkBuffer()

    def sink(layer: int, activations: torch.Tensor) -> None:
        state.update_layer(layer, activations, current["positions"])

    def save(n_done: int, complete: bool) -> None:
        state.save(
            checkpoint,
            {"batches_done": str(n_done), "batch_size": str(batch_size), "complete": str(int(complete)),
             "identity": _shard_identity(ctx, shard)},
        )

    loader = torch.utils.data.DataLoader(
        BatchEncoder(ctx, batches[done:]),
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=str(device).startswith("cuda"),
    )
    forward = _base_forward(vlm.model)
    with progress() as bar, neuron_hooks(mlps, cfg.hook, sink), torch.inference_mode():
        task = bar.add_task(f"capture[{shard.rank}/{shard.world}] batches", total=len(batches), completed=done)
        for batch in loader:
            # Modality positions are worked out once per batch, on the CPU, for every layer.
            current["positions"] = BatchPositions.from_masks(batch.visual_mask, batch.text_mask,
                                                             batch.sample_index, work).to(device)
            forward(**to_device(batch, device).inputs)
            done += 1
            bar.advance(task)
            if done % cfg.checkpoint_every == 0 and done < len(batches):
                save(done, complete=False)
    save(done, complete=True)
    return state.canonical()


def _base_forward(model: Any):
    """The model's forward without the LM head (logits are not needed to record neurons) and
    without a KV cache (nothing is decoded; for a 7B model the cache would hold ~0.5 MB a
    token)."""
    inner = getattr(model, "model", None)
    base = inner if inner is not None and hasattr(inner, "language_model") else model
    return functools.partial(base, use_cache=False)


def capture_batch_size(ctx: RunContext, setting: int | str, indices: list[int]) -> int:
    """`setting`, or for `auto` what fits the free GPU memory with these samples' longest sequence."""
    def per_sample() -> int:
        samples = read_samples(ctx.run_dir.samples)
        return capture_bytes_per_sample(shape_of(ctx.vlm.model), capture_tokens_bound(ctx, [samples[i] for i in indices]))

    return choose_batch_size(setting, ctx.vlm.device, per_sample).size


def capture_tokens_bound(ctx: RunContext, samples: list[Any]) -> int:
    """The longest sequence a capture batch of these samples can have: the image tokens'
    bound, the chat template around the prompt, and the longest description in tokens."""
    from builder.models.layout import image_tokens_bound
    from builder.text import prompt_prefix

    vlm = ctx.vlm
    tokenizer = getattr(vlm.processor, "tokenizer", vlm.processor)
    texts = read_texts(ctx.run_dir.texts)
    descriptions = [texts[s.sample_id].text for s in samples if s.sample_id in texts] or [""]
    longest = max(len(ids) for ids in tokenizer(descriptions, add_special_tokens=False)["input_ids"])
    template = len(tokenizer(prompt_prefix(vlm.processor, ctx.recipe.text.prompt))["input_ids"])
    return image_tokens_bound(vlm.model.config) + template + longest


def _shard_identity(ctx: RunContext, shard: Shard) -> str:
    from builder.io import file_digest

    return stable_hash(
        [
            file_digest(ctx.run_dir.samples),
            file_digest(ctx.run_dir.texts),
            ctx.recipe.section_dict("model"),
            ctx.recipe.section_dict("capture"),
            ctx.recipe.text.prompt,
            ctx.recipe.classify.top_n,
            shard.rank,
            shard.world,
        ]
    )


class CaptureStage:
    name = "capture"
    version = "1"
    sections = ("model", "capture")
    distributed = True
    """Every process of a multi-process launch runs this stage on its shard."""

    def source_fingerprint(self, ctx: RunContext) -> str:
        # N (classify.top_n) shapes the state; the thresholds do not.
        return stable_hash(["top_n", ctx.recipe.classify.top_n, ctx.recipe.text.prompt])

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run_dir.capture_dir / STATE_FILE]

    def reset(self, ctx: RunContext) -> None:
        folder = ctx.run_dir.capture_dir
        for f in [*folder.glob("*.safetensors"), *folder.glob(".*.tmp")]:  # states, torn writes
            f.unlink()

    def run(self, ctx: RunContext) -> dict[str, int]:
        shard = Shard(ctx.processes.rank, ctx.processes.world)
        out_dir = ctx.run_dir.capture_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        capture_shard(ctx, shard, out_dir / shard.checkpoint_name)
        ctx.processes.barrier()
        if shard.rank != 0:
            return {}
        for torn in out_dir.glob(f".{STATE_FILE}.*.tmp"):
            torn.unlink()  # a merge cut short by a kill
        state = None
        for r in range(shard.world):
            path = out_dir / Shard(r, shard.world).checkpoint_name
            meta = read_state_metadata(path)
            if meta.get("complete") != "1":
                raise StageError(f"capture shard {path.name} is incomplete; rerun to resume it")
            part = NeuronState.load(path)
            state = part if state is None else state.merge(part)
        assert state is not None
        state.save(out_dir / STATE_FILE, {"shards": str(shard.world)})
        L, D, N, m = state.shape
        return {
            "layers": L,
            "neurons": L * D,
            "visual_positions": int(state.visual_count[0]),
            "text_positions": int(state.text_count[0]),
            "processes": shard.world,
        }
