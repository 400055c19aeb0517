"""The explain stage: every selected neuron gets an explanation or a typed failure.

Reads the shown exemplars (`exemplars.parquet`, role `shown`) and the categories
(`neurons.parquet`), runs the recipe's explainer over all neurons with bounded
concurrency, and writes `explanations.parquet`, one row per selected neuron. With the
`openai` backend every answer is in the LLM cache the moment it arrives, so a killed
stage resumes without resending anything it had received; the cost ledger is summarised
in `explain-ledger.json`.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from builder.errors import StageError
from builder.exemplars import EXEMPLARS_FILE
from builder.explain.offline import OFFLINE_VERSION
from builder.explain.prompts import PROMPT_VERSION
from builder.explain.records import Exemplar, Explainer, ExplainFailure, Explanation, NeuronExemplars
from builder.io import stable_hash, write_json, write_parquet
from builder.llm.types import LLMFailure
from builder.progress import progress
from builder.run import RunContext, RunDir

EXPLANATIONS_FILE = "explanations.parquet"
LEDGER_FILE = "explain-ledger.json"
EXPLANATIONS_SCHEMA = pa.schema(
    [
        ("layer", pa.int32()),
        ("neuron", pa.int32()),
        ("category", pa.string()),
        ("explanation", pa.string()),
        ("explainer", pa.string()),
        ("prompt_version", pa.string()),
        ("status", pa.string()),
        ("failure", pa.string()),
    ]
)


def load_neuron_exemplars(run_dir: RunDir) -> list[NeuronExemplars]:
    """Every neuron of `exemplars.parquet` with its shown exemplars (rank order), by (layer, neuron)."""
    path = run_dir.path(EXEMPLARS_FILE)
    if not path.exists():
        raise StageError(f"{path} is missing; run the exemplars stage first")
    table = pq.read_table(path, columns=["layer", "neuron", "rank", "sample_id", "role", "image", "tokens",
                                         "token_activations"])
    keys = sorted(set(zip(table.column("layer").to_pylist(), table.column("neuron").to_pylist())))
    shown = table.filter(pc.equal(table.column("role"), "shown")).to_pylist()
    categories = {
        (r["layer"], r["neuron"]): r["category"]
        for r in pq.read_table(run_dir.neurons, columns=["layer", "neuron", "category"]).to_pylist()
    }
    grouped: dict[tuple[int, int], list[Exemplar]] = defaultdict(list)
    for r in shown:
        grouped[(r["layer"], r["neuron"])].append(
            Exemplar(r["sample_id"], r["rank"], r["image"]["bytes"], tuple(r["tokens"]), tuple(r["token_activations"]))
        )
    missing = [k for k in keys if k not in grouped]
    if missing:
        raise StageError(
            f"neuron {missing[0]} (and {len(missing) - 1} more) has no shown exemplar; set exemplars.shown >= 1"
        )
    return [
        NeuronExemplars(layer, neuron, categories[(layer, neuron)], tuple(sorted(grouped[(layer, neuron)],
                                                                                 key=lambda e: e.rank)))
        for layer, neuron in keys
    ]


async def explain_all(
    explainer: Explainer,
    neurons: list[NeuronExemplars],
    concurrency: int,
    on_done: Callable[[], None] | None = None,
) -> list[Explanation]:
    """Explain every neuron, `concurrency` at a time; a failure is recorded, never raised.

    One producer prepares the requests (prompt, serialised body, cache key) at most
    `concurrency` ahead and yields to the event loop after each, so a worker whose answer
    arrives sends its next, already built, request at once and the building happens when
    the loop has nothing more urgent. Building on the send's path instead put ~0.5 ms of
    CPU a request between every answer and the next send, which at 32 in flight cost
    ~2.5 % of the latency-bound rate (`benchmarks/explain.py`).
    """
    results: list[Explanation | None] = [None] * len(neurons)
    workers = max(1, min(concurrency, len(neurons)))
    ready: asyncio.Queue[tuple[int, object] | None] = asyncio.Queue(maxsize=concurrency)

    async def produce() -> None:
        for i, n in enumerate(neurons):
            await ready.put((i, explainer.prepare(n)))
            await asyncio.sleep(0)  # let the answers already in go first
        for _ in range(workers):
            await ready.put(None)

    async def work() -> None:
        while (item := await ready.get()) is not None:
            i, prepared = item
            n = neurons[i]
            try:
                text: str | None = await explainer.explain(prepared)
                status, failure = "ok", None
            except (LLMFailure, ExplainFailure) as e:
                text, status, failure = None, "failed", str(e)
            results[i] = Explanation(n.layer, n.neuron, n.category, text, explainer.name, explainer.prompt_version,
                                     status, failure)
            if on_done is not None:
                on_done()

    tasks = [asyncio.ensure_future(produce()), *(asyncio.ensure_future(work()) for _ in range(workers))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:  # an unexpected error (or a cancel) stops the rest too
            task.cancel()
        raise
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def explanations_table(results: list[Explanation]) -> pa.Table:
    rows = sorted((r.__dict__ for r in results), key=lambda r: (r["layer"], r["neuron"]))
    return pa.Table.from_pylist(rows, schema=EXPLANATIONS_SCHEMA)


class ExplainStage:
    name = "explain"
    version = "1"
    sections = ("explain",)

    def source_fingerprint(self, ctx: RunContext) -> str:
        # A new prompt (or baseline rule) is a new result, even with the same recipe.
        return stable_hash([PROMPT_VERSION, OFFLINE_VERSION])

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run_dir.path(EXPLANATIONS_FILE)]

    def run(self, ctx: RunContext) -> dict[str, int]:
        from builder.explain.backends import make_explainer

        neurons = load_neuron_exemplars(ctx.run_dir)
        explainer, client = make_explainer(ctx)
        with progress() as bar:
            task = bar.add_task(f"explain ({explainer.name})", total=len(neurons))

            async def run_all() -> list[Explanation]:
                try:
                    return await explain_all(explainer, neurons, ctx.recipe.explain.max_concurrency,
                                             lambda: bar.advance(task))
                finally:
                    if client is not None:
                        await client.aclose()

            try:
                results = asyncio.run(run_all())
            finally:
                if client is not None:
                    # The ledger is written even when the stage stops half-way.
                    write_json(ctx.run_dir.path(LEDGER_FILE), {
                        "this_run": {**{k: v for k, v in client.stats.__dict__.items() if k != "failures"},
                                     "failures": dict(client.stats.failures)},
                        "total": client.cache.ledger_summary(client.settings.scope),
                    })
                    client.cache.close()
        write_parquet(ctx.run_dir.path(EXPLANATIONS_FILE), explanations_table(results))
        counts = {"neurons": len(results), "ok": sum(r.status == "ok" for r in results)}
        counts["failed"] = counts["neurons"] - counts["ok"]
        kinds = Counter((r.failure or "").split(":", 1)[0] for r in results if r.failure)
        counts.update({f"failed_{k}": v for k, v in sorted(kinds.items())})
        if client is not None:
            s = client.stats
            counts.update({"requests_sent": s.sent, "cache_hits": s.cache_hits, "retries": s.retries,
                           "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                           "cost_microusd": round(s.dollars * 1e6)})
        return counts
