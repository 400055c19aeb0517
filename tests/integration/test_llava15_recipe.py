"""The paper's recipe end to end on CPU: `llava15-7b` with a tiny local LLaVA folder, a small
detail_23k-style corpus, generated descriptions, the OpenAI explainer against a local HTTP
server, and the grounded simulator with tiny local Grounding DINO and SAM folders."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from builder.config import load_recipe
from builder.pipeline import default_stages
from builder.run import Executor
from tests.explain.fake_openai import FakeOpenAI
from tests.simulate.conftest import tiny_grounding_dino, tiny_sam


def detail_23k_style(root: Path, n: int = 14) -> tuple[Path, Path]:
    images = root / "train2017"
    images.mkdir(parents=True)
    records = []
    for i in range(n):
        name = f"{i:012d}.jpg"
        image = Image.new("RGB", (96, 72), (30 + 15 * i, 90, 200 - 10 * i))
        ImageDraw.Draw(image).ellipse((10 + i, 10, 50 + i, 50), fill=(220, 30, 30) if i % 2 else (30, 200, 40))
        image.save(images / name)
        records.append({"id": name[:-4], "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat do you see happening in this image?"},
            {"from": "gpt", "value": f"A coloured circle on a plain background, number {i}."}]})
    path = root / "detail_23k.json"
    path.write_text(json.dumps(records))
    return path, images


@pytest.mark.slow
@pytest.mark.integration
def test_llava15_recipe_end_to_end_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.models.builtin import materialize_builtin
    from validation import validate_dataset

    model_folder = materialize_builtin("tiny-llava")  # a save_pretrained folder, loaded by from_pretrained
    corpus, image_root = detail_23k_style(tmp_path / "data")
    folders = {}
    for name, build in (("detector", tiny_grounding_dino), ("segmenter", tiny_sam)):
        model, processor = build()
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    with FakeOpenAI().start() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        recipe = load_recipe("llava15-7b", [
            f"model.id={model_folder}", "model.device=cpu", f"corpus.path={corpus}", f"corpus.image_root={image_root}",
            "text.max_new_tokens=6", "text.batch_size=4", "capture.num_workers=0", "exemplars.per_category=1",
            "exemplars.shown=2", "exemplars.held_out=2", f"simulate.detector={folders['detector']}",
            f"simulate.segmenter={folders['segmenter']}", "simulate.device=cpu", "simulate.random_samples=2",
        ])
        out = tmp_path / "run"
        outcomes = Executor(recipe, out, default_stages()).run()
        assert all(o.ran for o in outcomes)
        sent = len(server.entries())
    assert sent > 0, "the explainer (and the LLM simulators) reached the OpenAI-compatible server"
    report = validate_dataset(out / "dataset")
    assert report.ok, report.render()
    # The model folder, corpus and image folder are local paths: the published files name them
    # by their last part only, never the user's folders.
    for name in ("recipe.json", "build_info.json", "README.md"):
        text = (out / "dataset" / name).read_text()
        assert str(tmp_path) not in text and str(model_folder.parent) not in text, name
    for path in (out / "dataset").rglob("*.parquet"):
        table = pq.read_table(path)
        for field in table.schema:
            if pa.types.is_string(field.type):
                assert not any(str(tmp_path) in v for v in table.column(field.name).to_pylist() if v), field.name
    published = json.loads((out / "dataset" / "recipe.json").read_text())
    assert published["corpus"]["path"] == corpus.name and published["model"]["id"] == model_folder.name
    assert published["simulate"]["detector"] == "detector"
    assert json.loads((out / "manifest.json").read_text())["recipe"]["corpus"]["path"] == str(corpus)
    samples = pq.read_table(next((out / "dataset" / "samples").glob("*.parquet"))).to_pylist()
    assert len(samples) == 14 and {s["text_source"] for s in samples} == {"generate"}
    explanations = pq.read_table(out / "explanations.parquet").to_pylist()
    assert explanations and all("gpt-4o" in e["explainer"] for e in explanations)
    assert {e["status"] for e in explanations} == {"ok"}
    neurons = pq.read_table(next((out / "dataset" / "neurons").glob("*.parquet")))
    assert neurons.num_rows == 4 * 96
    # The corpus is smaller than N = 50: every neuron's fractions are over the samples it has.
    assert set(neurons.column("n_top").to_pylist()) == {14}
