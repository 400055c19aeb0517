"""Simulate throughput: the offline stage on the tiny recipe, and the LLM simulators through
the real call layer against a local OpenAI-compatible server with fixed latency.

1. `offline`: `--recipe tiny` up to explain in a temporary folder, then the simulate stage
   (offline token match + VLM embedding baseline, random samples' truth pass included)
   timed alone: neurons per second.
2. `llm`: synthetic neurons (half text: 10 samples of 40 tokens; half visual: 10 photo-sized
   336x336 views, an 8x8 grid) scored with their own and a baseline explanation by the
   `llm` text and visual simulators through `openai_client` (sqlite cache, cold) against a
   minimal asyncio server (this script with `--serve`, its own process) answering valid
   JSON after `--latency` seconds. The latency-bound rate is concurrency / latency
   requests per second; overhead = 1 - measured / bound. Best of `--repeats` trials.

Prints JSON.

    python benchmarks/simulate.py [--latency 0.2] [--neurons 24] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


async def serve(latency: float) -> None:
    """Answer every chat completion after `latency` s: one 0-10 value per numbered token for
    text prompts, two cells for grid prompts (valid answers, so every neuron is scored)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                headers = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line[15:]) for line in headers.split(b"\r\n") if line[:15].lower() == b"content-length:")
                body = json.loads(await reader.readexactly(length))
                content = body["messages"][-1]["content"]
                if isinstance(content, str):
                    n = len(re.findall(r"(?m)^\d+\t", content))
                    answer = json.dumps({"activations": [(i * 7) % 11 for i in range(n)]})
                else:
                    answer = '{"activations": {"1": 9, "10": 4}}'
                payload = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 300, "completion_tokens": 60, "total_tokens": 360},
                }).encode()
                await asyncio.sleep(latency)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, StopIteration):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=512)
    print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", flush=True)
    async with server:
        await server.serve_forever()


def offline_stage() -> dict:
    from builder.config import load_recipe
    from builder.pipeline import default_stages
    from builder.run import Executor
    from builder.simulate.stage import SimulateStage

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("BUILDER_CACHE", str(Path(tmp) / "cache"))
        ex = Executor(load_recipe("tiny"), Path(tmp) / "run", default_stages())
        ex.run(until="explain")
        ex.ctx.vlm  # loaded before timing, as the pipeline shares it across stages
        t0 = time.perf_counter()
        counts = SimulateStage().run(ex.ctx)
        seconds = time.perf_counter() - t0
    return {"neurons": counts["neurons"], "seconds": round(seconds, 3),
            "neurons_per_second": round(counts["neurons"] / seconds, 2)}


def synthetic_tasks(count: int):
    import numpy as np
    from PIL import Image

    from builder.simulate.stage import ExplainedNeuron, ScoringTask, TrueSample

    rng = np.random.default_rng(0)
    words = [" a", " red", " train", " on", " the", " track", " near", " station", " with", " people"]
    views = [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)) for _ in range(4)]
    tasks = []
    for n in range(count):
        category = ("text", "visual")[n % 2]
        samples = [TrueSample(f"s{n}-{k}", "held_out" if k < 5 else "random",
                              rng.uniform(0, 10, (24, 24)).astype("float32"),
                              [words[i] for i in rng.integers(0, len(words), 40)],
                              rng.uniform(0, 10, 40).astype("float32")) for k in range(10)]
        tasks.append(ScoringTask(ExplainedNeuron(0, n, category, f"trains, concept {n}"), samples,
                                 ExplainedNeuron(1, n, category, f"people, concept {n}")))
    return tasks, views


async def score_all(tasks, views, base_url: str, concurrency: int, cache: Path) -> tuple[float, int]:
    from builder.llm import CallSettings, openai_client
    from builder.simulate.llm import client_ask
    from builder.simulate.stage import NeuronScorer, Simulators
    from builder.simulate.text import LLMTextSimulator
    from builder.simulate.visual import LLMGridSimulator

    os.environ["OPENAI_BASE_URL"] = base_url
    os.environ["OPENAI_API_KEY"] = "bench"
    client = openai_client(cache, CallSettings(max_concurrency=concurrency, scope="simulate"))
    ask = client_ask(client, "gpt-4o")
    sims = Simulators(LLMGridSimulator(ask, 8, "low"), LLMTextSimulator(ask), {"visual": "llm", "text": "llm"}, client)
    scorer = NeuronScorer(sims, lambda sid: views[hash(sid) % len(views)], lambda image: image)
    gate = asyncio.Semaphore(concurrency)

    async def one(task):
        async with gate:
            return await scorer.score(task)

    t0 = time.perf_counter()
    rows = await asyncio.gather(*(one(t) for t in tasks))
    seconds = time.perf_counter() - t0
    await client.aclose()
    client.cache.close()
    assert all(r.status == "ok" and r.baseline_score is not None for r in rows), [r.failure for r in rows][:3]
    return seconds, client.stats.sent


def llm_simulators(latency: float, neurons: int, repeats: int) -> list[dict]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    try:
        base_url = proc.stdout.readline().strip()
        tasks, views = synthetic_tasks(neurons)
        out = []
        for concurrency in (8, 32):
            trials = []
            for _ in range(repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    seconds, sent = asyncio.run(score_all(tasks, views, base_url, concurrency, Path(tmp) / "c.sqlite"))
                trials.append((seconds, sent))
            seconds, sent = min(trials)
            bound = concurrency / latency
            out.append({
                "concurrency": concurrency, "neurons": neurons, "requests": sent, "seconds": round(seconds, 3),
                "requests_per_second": round(sent / seconds, 1), "latency_bound_requests_per_second": round(bound, 1),
                "overhead": round(1 - (sent / seconds) / bound, 3),
                "neurons_per_second": round(neurons / seconds, 2),
                "trial_overheads": [round(1 - (n / s) / bound, 3) for s, n in trials],
            })
        return out
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--neurons", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--serve", action="store_true", help="run the benchmark's endpoint (internal)")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.latency))
        return
    os.environ.setdefault("BUILDER_PROGRESS", "0")
    sys.path.insert(0, str(ROOT))
    from builder.quiet import quiet_libraries

    quiet_libraries()
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "latency_seconds": args.latency,
        "offline_stage_tiny": offline_stage(),
        "llm_simulators": llm_simulators(args.latency, args.neurons, args.repeats),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
