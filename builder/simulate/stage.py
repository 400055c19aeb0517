"""The simulate stage: every explanation scored against its neuron, beside a chance baseline.

For each neuron the explain stage explained (status `ok`), in `scores.parquet`:
- its scoring set: its held-out exemplars (top samples the explainer never saw, with the
  true maps the exemplar pass recorded) plus `simulate.random_samples` samples from outside
  its top-N, whose true activations the exemplar pass's recorder
  (`builder.exemplars.record_activations`) records in a small forward pass;
- the simulators of its category: visual neurons the visual simulator, text neurons the
  text simulator, multimodal and unknown neurons both;
- `score` (Pearson over the pooled scoring set, see `scoring`), `visual_score`,
  `text_score`, per-sample scores;
- `baseline_score`: the same simulators, on the same samples, given the explanation of a
  random other neuron of the same category with a different explanation (chosen per
  neuron with a seeded `random.Random`), i.e. what an unrelated explanation scores by chance.

Random samples come from a seeded pool of `random_samples + classify.top_n` samples, so
the forward pass that records their truth covers at most that many samples however many
neurons are scored; each neuron draws its own `random_samples` from the pool minus its
top-N. Results are appended per neuron to `simulate/scored.jsonl` as they finish, so an
interrupted stage resumes where it stopped (LLM answers are also in the call layer's cache,
the explain stage's file, under the ledger scope `simulate`; `simulate-ledger.json` sums
this stage's spending).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from builder.errors import StageError
from builder.io import append_jsonl, public_name, read_jsonl, stable_hash, write_json, write_parquet
from builder.run import RunContext
from builder.simulate.base import FailureKind, SimulationFailure, TextSimulator, VisualSample, VisualSimulator
from builder.simulate.scoring import Modality, ModalityScore, ScoredSample, combined_score, score_modality

SCORES_FILE = "scores.parquet"
CHECKPOINT = Path("simulate") / "scored.jsonl"
LEDGER_FILE = "simulate-ledger.json"
LLM_FAILURE = f"{FailureKind.LLM.value}:"

MODALITIES: dict[str, tuple[Modality, ...]] = {
    "visual": ("visual",),
    "text": ("text",),
    "multimodal": ("visual", "text"),
    "unknown": ("visual", "text"),
}
"""Which simulators score a neuron of each category."""

SCORES_SCHEMA = pa.schema(
    [
        ("layer", pa.int32()),
        ("neuron", pa.int32()),
        ("category", pa.string()),
        ("simulator", pa.string()),
        ("score", pa.float32()),
        ("visual_score", pa.float32()),
        ("text_score", pa.float32()),
        ("constant_prediction", pa.bool_()),
        ("baseline_score", pa.float32()),
        ("baseline_layer", pa.int32()),
        ("baseline_neuron", pa.int32()),
        ("baseline_failure", pa.string()),
        (
            "per_sample_scores",
            pa.list_(
                pa.struct(
                    [("sample_id", pa.string()), ("modality", pa.string()), ("role", pa.string()),
                     ("score", pa.float32())]
                )
            ),
        ),
        ("n_held_out", pa.int32()),
        ("n_random", pa.int32()),
        ("status", pa.string()),
        ("failure", pa.string()),
    ]
)
"""`scores.parquet`: one row per explained neuron (see :class:`NeuronScore`)."""


@dataclass(frozen=True)
class ExplainedNeuron:
    """A neuron with a usable explanation."""

    layer: int
    neuron: int
    category: str
    explanation: str

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.neuron)


@dataclass
class TrueSample:
    """One sample of a neuron's scoring set with the neuron's true activations on it."""

    sample_id: str
    role: str
    """`held_out` or `random`."""
    heatmap: np.ndarray
    """float32 [H, W], 0-10."""
    tokens: list[str]
    token_activations: np.ndarray
    """float32 [len(tokens)], 0-10."""


@dataclass
class ScoringTask:
    """Everything needed to score one neuron's explanation."""

    neuron: ExplainedNeuron
    samples: list[TrueSample]
    baseline: ExplainedNeuron | None
    """The other neuron of the same category whose explanation gives the chance baseline."""


@dataclass
class NeuronScore:
    """One row of `scores.parquet`."""

    layer: int
    neuron: int
    category: str
    simulator: str
    """What simulated: `visual:<label>`, `text:<label>` or both joined by ` + `."""
    score: float | None
    """The neuron's score: its modality's, or the mean of visual and text (multimodal)."""
    visual_score: float | None
    text_score: float | None
    constant_prediction: bool
    """A simulator predicted a constant (that modality scores 0 by rule)."""
    baseline_score: float | None
    """Score of the baseline neuron's explanation on this neuron's samples (None: no other
    explained neuron in the category, or the baseline simulation failed)."""
    baseline_layer: int | None
    baseline_neuron: int | None
    baseline_failure: str
    """Why there is no baseline score ('' when there is one)."""
    per_sample_scores: list[dict[str, Any]] = field(default_factory=list)
    """{sample_id, modality, role, score} for every scored sample (score None: constant truth)."""
    n_held_out: int = 0
    n_random: int = 0
    status: str = "ok"
    """`ok` (score defined), `undefined` (true activations constant over the scoring set:
    no correlation exists), `failed` (the simulator failed: see `failure`)."""
    failure: str = ""
    """Typed failure `kind: detail`, or why the score is undefined; '' when ok."""


def neuron_rng(seed: int, purpose: str, key: tuple[int, int]) -> random.Random:
    """A per-neuron generator: choices do not depend on which other neurons are scored."""
    return random.Random(f"{seed}:{purpose}:{key[0]}:{key[1]}")


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.casefold().split()) == " ".join(b.casefold().split())


def choose_baselines(neurons: list[ExplainedNeuron], seed: int) -> dict[tuple[int, int], ExplainedNeuron | None]:
    """For each neuron, a random other explained neuron of the same category whose
    explanation differs from its own (None if there is none).

    An identical explanation (the same concept explained in another layer) would be the
    same hypothesis, not chance, so it is never the baseline.
    """
    by_category: dict[str, list[ExplainedNeuron]] = {}
    for n in sorted(neurons, key=lambda n: n.key):
        by_category.setdefault(n.category, []).append(n)
    out = {}
    for n in neurons:
        others = [o for o in by_category[n.category] if o.key != n.key and not _same_text(o.explanation, n.explanation)]
        out[n.key] = neuron_rng(seed, "baseline", n.key).choice(others) if others else None
    return out


def random_pool(sample_ids: list[str], size: int, seed: int) -> list[str]:
    """A seeded random subset of the corpus from which every neuron draws its random samples."""
    ids = sorted(sample_ids)
    return random.Random(f"{seed}:pool").sample(ids, min(size, len(ids)))


def choose_random_samples(pool: list[str], top: set[str], k: int, seed: int, key: tuple[int, int]) -> list[str]:
    """`k` samples of the pool outside the neuron's top-N (fewer if the corpus is that small)."""
    outside = [s for s in pool if s not in top]
    return neuron_rng(seed, "random", key).sample(outside, min(k, len(outside)))


def read_explained(path: Path) -> list[ExplainedNeuron]:
    if not path.exists():
        raise StageError(f"{path.name} is missing: the simulate stage scores the explain stage's output; "
                         "run the explain stage first")
    rows = pq.read_table(path).to_pylist()
    return [
        ExplainedNeuron(int(r["layer"]), int(r["neuron"]), str(r["category"]), str(r["explanation"]))
        for r in rows
        if r.get("status") == "ok" and r.get("explanation")
    ]


def read_held_out(path: Path) -> dict[tuple[int, int], list[TrueSample]]:
    """Held-out exemplars per neuron, by rank (without the image column: simulators see the
    original image, not the activation-modulated one)."""
    if not path.exists():
        raise StageError(f"{path.name} is missing: run the exemplars stage first")
    cols = ["layer", "neuron", "rank", "sample_id", "role", "heatmap", "tokens", "token_activations"]
    table = pq.read_table(path, columns=cols)
    out: dict[tuple[int, int], list[tuple[int, TrueSample]]] = {}
    for r in table.to_pylist():
        if r["role"] != "held_out":
            continue
        sample = TrueSample(r["sample_id"], "held_out", np.asarray(r["heatmap"], dtype=np.float32),
                            list(r["tokens"]), np.asarray(r["token_activations"], dtype=np.float32))
        out.setdefault((int(r["layer"]), int(r["neuron"])), []).append((int(r["rank"]), sample))
    return {k: [s for _, s in sorted(v, key=lambda x: x[0])] for k, v in out.items()}


@dataclass
class Simulators:
    """The simulators of this run and their labels for the `simulator` column."""

    visual: VisualSimulator
    text: TextSimulator
    labels: dict[str, str]
    client: Any = None
    """The call-layer client when a simulator uses an LLM (closed by the stage)."""

    def label(self, modalities: tuple[Modality, ...]) -> str:
        return " + ".join(f"{m}:{self.labels[m]}" for m in modalities)


def _grounded(ctx: RunContext, ask: Any, model: str) -> tuple[VisualSimulator, str]:
    from builder.simulate.grounded import PHRASES_PROMPT_VERSION, GroundedSimulator, load_grounding_models

    cfg = ctx.recipe.simulate
    models = load_grounding_models(cfg.detector, cfg.segmenter, cfg.device)
    sim = GroundedSimulator(models, ask, cfg.phrases, cfg.max_phrases, cfg.box_threshold, cfg.text_threshold,
                            cfg.max_boxes)
    phrases = f"phrases by {model} ({PHRASES_PROMPT_VERSION})" if cfg.phrases == "llm" else "explanation as phrase"
    return sim, f"grounded({public_name(cfg.detector)}, {public_name(cfg.segmenter)}, {phrases})"


def _llm_grid(ctx: RunContext, ask: Any, model: str) -> tuple[VisualSimulator, str]:
    from builder.simulate.visual import VISUAL_PROMPT_VERSION, LLMGridSimulator

    cfg = ctx.recipe.simulate
    return (LLMGridSimulator(ask, cfg.llm_grid, cfg.image_detail),
            f"llm({model}, {cfg.llm_grid}x{cfg.llm_grid} grid, {VISUAL_PROMPT_VERSION})")


def _embedding(ctx: RunContext, ask: Any, model: str) -> tuple[VisualSimulator, str]:
    from builder.models.layout import image_layout
    from builder.simulate.visual import EmbeddingSimilaritySimulator

    vlm = ctx.vlm
    layout = image_layout(vlm.model.config, vlm.processor.image_processor)
    return EmbeddingSimilaritySimulator(vlm, layout, ctx.recipe.text.prompt), "offline-embedding-baseline"


def _llm_text(ctx: RunContext, ask: Any, model: str) -> tuple[TextSimulator, str]:
    from builder.simulate.text import TEXT_PROMPT_VERSION, LLMTextSimulator

    return LLMTextSimulator(ask), f"llm({model}, {TEXT_PROMPT_VERSION})"


def _token_match(ctx: RunContext, ask: Any, model: str) -> tuple[TextSimulator, str]:
    from builder.simulate.text import TokenMatchSimulator

    return TokenMatchSimulator(), "offline-token-match-baseline"


VISUAL_SIMULATORS: dict[str, Callable[[RunContext, Any, str], tuple[VisualSimulator, str]]] = {
    "grounded": _grounded,
    "llm": _llm_grid,
    "offline": _embedding,
}
"""`simulate.visual` -> factory of (simulator, its label in the `simulator` column)."""

TEXT_SIMULATORS: dict[str, Callable[[RunContext, Any, str], tuple[TextSimulator, str]]] = {
    "llm": _llm_text,
    "offline": _token_match,
}
"""`simulate.text` -> factory of (simulator, its label)."""


def build_simulators(ctx: RunContext, needed: set[Modality]) -> Simulators:
    """The recipe's simulators for the modalities `needed`; LLM-backed ones share one
    call-layer client (see `make_client`)."""
    from builder.simulate.llm import client_ask

    cfg = ctx.recipe.simulate
    model = cfg.model or ctx.recipe.explain.model
    wants_llm = ("text" in needed and cfg.text_simulator == "llm") or (
        "visual" in needed and (cfg.visual_simulator == "llm"
                                or (cfg.visual_simulator == "grounded" and cfg.phrases == "llm")))
    client = make_client(ctx, model) if wants_llm else None
    ask = client_ask(client, model) if client is not None else None
    visual: Any = None
    text: Any = None
    labels = {}
    if "visual" in needed:
        visual, labels["visual"] = VISUAL_SIMULATORS[cfg.visual_simulator](ctx, ask, model)
    if "text" in needed:
        text, labels["text"] = TEXT_SIMULATORS[cfg.text_simulator](ctx, ask, model)
    return Simulators(visual, text, labels, client)


def make_client(ctx: RunContext, model: str) -> Any:
    """The simulators' call-layer client: the explain stage's endpoint, cache file, retry and
    rate policies and prices, with the ledger scope `simulate` and `simulate.budget_usd`."""
    from dataclasses import replace

    from builder.errors import RecipeError
    from builder.explain.backends import cache_path, call_settings
    from builder.llm import openai_client

    if ctx.recipe.simulate.budget_usd is not None and model not in ctx.recipe.explain.prices:
        raise RecipeError(
            f"simulate.budget_usd is set but explain.prices has no entry for the simulator model {model!r}; "
            f"add explain.prices.{model}.input_per_mtok and .output_per_mtok"
        )
    settings = replace(call_settings(ctx.recipe.explain, scope="simulate"), budget_usd=ctx.recipe.simulate.budget_usd)
    return openai_client(cache_path(ctx), settings)


class NeuronScorer:
    """Scores one neuron: its own explanation and the baseline's, on its scoring set."""

    def __init__(self, simulators: Simulators, images: Any, view: Any, multimodal_score: str = "text"):
        self.simulators = simulators
        self.multimodal_score = multimodal_score
        """`simulate.multimodal_score`: which of a multimodal neuron's scores is its `score`."""
        self.images = images
        """sample_id -> original PIL image."""
        self.view = view
        """image -> the VLM's view of it (`grid.simulator_view`)."""

    async def _modality(self, modality: Modality, explanation: str, samples: list[TrueSample]) -> ModalityScore:
        if modality == "visual":
            grid = samples[0].heatmap.shape
            shown = []
            for s in samples:
                image = self.images(s.sample_id)
                shown.append(VisualSample(s.sample_id, self.view(image), image))
            preds = await self.simulators.visual.simulate(explanation, shown, (int(grid[0]), int(grid[1])))
            truths = [s.heatmap for s in samples]
        else:
            preds = await self.simulators.text.simulate(explanation, [s.tokens for s in samples])
            truths = [s.token_activations for s in samples]
        return score_modality(modality, [
            ScoredSample(s.sample_id, s.role, np.asarray(p, dtype=np.float32), t)  # type: ignore[arg-type]
            for s, p, t in zip(samples, preds, truths)
        ])

    def _neuron_score(self, category: str, scores: list[ModalityScore]) -> float | None:
        if category == "multimodal" and self.multimodal_score == "text":
            return next(s.score for s in scores if s.modality == "text")
        return combined_score(scores)

    async def score(self, task: ScoringTask) -> NeuronScore:
        n = task.neuron
        modalities = MODALITIES.get(n.category, ("visual", "text"))
        row = NeuronScore(
            layer=n.layer, neuron=n.neuron, category=n.category, simulator=self.simulators.label(modalities),
            score=None, visual_score=None, text_score=None, constant_prediction=False, baseline_score=None,
            baseline_layer=task.baseline.layer if task.baseline else None,
            baseline_neuron=task.baseline.neuron if task.baseline else None, baseline_failure="",
            n_held_out=sum(s.role == "held_out" for s in task.samples),
            n_random=sum(s.role == "random" for s in task.samples),
        )
        if row.n_held_out == 0:
            row.status, row.failure = "failed", "no_held_out: the neuron has no held-out exemplars (exemplars.held_out = 0?)"
            return row
        try:
            own = list(await asyncio.gather(*(self._modality(m, n.explanation, task.samples) for m in modalities)))
        except SimulationFailure as e:
            row.status, row.failure = "failed", str(e)
            return row
        by = {s.modality: s for s in own}
        row.visual_score = by["visual"].score if "visual" in by else None
        row.text_score = by["text"].score if "text" in by else None
        row.score = self._neuron_score(n.category, own)
        row.constant_prediction = any(s.constant_prediction for s in own)
        row.per_sample_scores = [asdict(p) for s in own for p in s.samples]
        if row.score is None:
            row.status = "undefined"
            row.failure = "constant_activation: the true activations are constant over the scoring set"
        if task.baseline is None:
            row.baseline_failure = f"no_other_explanation: no other {n.category} neuron with a different explanation"
        else:
            try:
                base = await asyncio.gather(*(self._modality(m, task.baseline.explanation, task.samples)
                                              for m in modalities))
                row.baseline_score = self._neuron_score(n.category, list(base))
            except SimulationFailure as e:
                row.baseline_failure = str(e)
        return row


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    rows = sorted(rows, key=lambda r: (r["layer"], r["neuron"]))
    return pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)


class SimulateStage:
    name = "simulate"
    version = "1"
    sections = ("simulate",)

    def source_fingerprint(self, ctx: RunContext) -> str:
        # A new prompt is a new result; the simulator LLM defaults to explain.model; the
        # random pool's size depends on classify.top_n; the truth pass reads with the capture hook.
        from builder.simulate.grounded import PHRASES_PROMPT_VERSION
        from builder.simulate.text import TEXT_PROMPT_VERSION
        from builder.simulate.visual import VISUAL_PROMPT_VERSION

        cfg = ctx.recipe
        return stable_hash([TEXT_PROMPT_VERSION, VISUAL_PROMPT_VERSION, PHRASES_PROMPT_VERSION,
                            cfg.simulate.model or cfg.explain.model, cfg.classify.top_n, cfg.capture.hook,
                            cfg.text.prompt])

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run_dir.path(SCORES_FILE)]

    def reset(self, ctx: RunContext) -> None:
        ctx.run_dir.path(str(CHECKPOINT)).unlink(missing_ok=True)

    def plan(self, ctx: RunContext, skip: set[tuple[int, int]] | frozenset = frozenset()) -> list[ScoringTask]:
        """Every explained neuron's scoring set and baseline (random samples' truth recorded),
        except the neurons in `skip` (already scored)."""
        from builder.corpus.stage import read_samples
        from builder.exemplars import record_activations

        rd = ctx.run_dir
        cfg = ctx.recipe.simulate
        everyone = read_explained(rd.path("explanations.parquet"))
        # Baselines are drawn from every explained neuron, scored already or not.
        baselines = choose_baselines(everyone, cfg.seed)
        explained = [n for n in everyone if n.key not in skip]
        held_out = read_held_out(rd.path("exemplars.parquet"))
        neurons = pq.read_table(rd.neurons, columns=["layer", "neuron", "top_sample_ids"])
        top = {(int(l), int(n)): set(t) for l, n, t in zip(
            *(neurons.column(c).to_pylist() for c in ("layer", "neuron", "top_sample_ids")))}
        sample_ids = [s.sample_id for s in read_samples(rd.samples)]
        pool = random_pool(sample_ids, cfg.random_samples + ctx.recipe.classify.top_n, cfg.seed)
        chosen = {n.key: choose_random_samples(pool, top[n.key], cfg.random_samples, cfg.seed, n.key)
                  for n in explained}
        # The random samples' true activations: the exemplar pass's recorder, on them alone.
        index_of = {sid: i for i, sid in enumerate(sample_ids)}
        wanted: dict[int, set[tuple[int, int]]] = {}
        for key, ids in chosen.items():
            for sid in ids:
                wanted.setdefault(index_of[sid], set()).add(key)
        recorded = record_activations(ctx, wanted) if wanted else {}
        tasks = []
        for n in explained:
            randoms = []
            for sid in chosen[n.key]:
                rec = recorded[index_of[sid]]
                randoms.append(TrueSample(sid, "random", rec.heatmaps[n.key], rec.tokens, rec.token_activations[n.key]))
            tasks.append(ScoringTask(n, held_out.get(n.key, []) + randoms, baselines[n.key]))
        return tasks

    def run(self, ctx: RunContext) -> dict[str, int]:
        from builder.corpus.base import open_image
        from builder.corpus.stage import read_samples
        from builder.models.layout import image_layout
        from builder.simulate.grid import simulator_view

        rd = ctx.run_dir
        checkpoint = rd.path(str(CHECKPOINT))
        explained = {n.key for n in read_explained(rd.path("explanations.parquet"))}
        done = {(r["layer"], r["neuron"]): r for r in read_jsonl(checkpoint) if (r["layer"], r["neuron"]) in explained}
        todo = self.plan(ctx, skip=set(done))
        stats: dict[str, int] = {}
        if todo:
            needed = {m for t in todo for m in MODALITIES.get(t.neuron.category, ("visual", "text"))}
            simulators = build_simulators(ctx, needed)
            samples = {s.sample_id: s for s in read_samples(rd.samples)}
            layout = image_layout(ctx.vlm.model.config, ctx.vlm.processor.image_processor) if "visual" in needed else None
            # A neuron's images are shown twice (own explanation, baseline's): keep the recent ones.
            images = lru_cache(maxsize=256)(lambda i: open_image(samples[i].image_ref, ctx.recipe.corpus))
            scorer = NeuronScorer(simulators, images, lambda image: simulator_view(image, layout),
                                  ctx.recipe.simulate.multimodal_score)
            client = simulators.client
            try:
                results = asyncio.run(self._score_all(scorer, todo, checkpoint, ctx.recipe.explain.max_concurrency))
            finally:
                if client is not None:
                    # The ledger is written even when the stage stops half-way.
                    write_json(rd.path(LEDGER_FILE), {
                        "this_run": {**{k: v for k, v in client.stats.__dict__.items() if k != "failures"},
                                     "failures": dict(client.stats.failures)},
                        "total": client.cache.ledger_summary(client.settings.scope),
                    })
                    client.cache.close()
            done.update({(r["layer"], r["neuron"]): r for r in results})
            if client is not None:
                s = client.stats
                stats = {"requests_sent": s.sent, "cache_hits": s.cache_hits, "retries": s.retries,
                         "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                         "cost_microusd": round(s.dollars * 1e6)}
        rows = list(done.values())
        write_parquet(rd.path(SCORES_FILE), _table(rows))
        return {
            "neurons": len(rows),
            "scored": sum(r["status"] == "ok" for r in rows),
            "undefined": sum(r["status"] == "undefined" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows),
            "with_baseline": sum(r["baseline_score"] is not None for r in rows),
            "constant_prediction": sum(bool(r["constant_prediction"]) for r in rows),
            **stats,
        }

    @staticmethod
    async def _score_all(scorer: NeuronScorer, tasks: list[ScoringTask], checkpoint: Path,
                         concurrency: int) -> list[dict[str, Any]]:
        from builder.progress import progress

        gate = asyncio.Semaphore(concurrency)
        results: list[dict[str, Any]] = []
        with progress() as bar:
            bar_task = bar.add_task("simulate neurons", total=len(tasks))

            async def one(task: ScoringTask) -> None:
                async with gate:
                    row = asdict(await scorer.score(task))
                results.append(row)
                # Checkpointed per neuron, except LLM failures: a rerun asks again (the call
                # layer replays terminal failures from its cache, retries transient ones).
                if not any(f.startswith(LLM_FAILURE) for f in (row["failure"], row["baseline_failure"])):
                    append_jsonl(checkpoint, [row])
                bar.advance(bar_task)

            try:
                await asyncio.gather(*(one(t) for t in tasks))
            finally:
                if scorer.simulators.client is not None:
                    await scorer.simulators.client.aclose()  # in the loop its connections belong to
        return results
