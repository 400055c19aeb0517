"""Exemplars: selection, split, the exemplar pass against a direct forward pass, rendering."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from builder.config import ExemplarsConfig
from builder.errors import StageError
from builder.exemplars import (
    EXEMPLARS_FILE,
    EXEMPLARS_SCHEMA,
    SelectedNeuron,
    grid_view,
    modulate,
    select_neurons,
    split_exemplars,
    token_display,
    upsample,
)
from builder.models.layout import ImageLayout


def neurons_table() -> pa.Table:
    """2 layers x 6 neurons with known categories and confidences."""
    rows = []
    spec = {  # neuron: (category, confidence, dead)
        0: ("visual", 0.9, False), 1: ("visual", 0.95, False), 2: ("visual", 0.9, False),
        3: ("text", 0.5, False), 4: ("unknown", 1.0, False), 5: ("unknown", 1.0, True),
    }
    for layer in range(2):
        for n, (cat, conf, dead) in spec.items():
            rows.append({"layer": layer, "neuron": n, "category": cat, "confidence": conf, "dead": dead,
                         "top_sample_ids": [] if dead else [f"s{layer}{n}{k}" for k in range(6)]})
    return pa.Table.from_pylist(rows)


def keys(selected: list[SelectedNeuron]) -> list[tuple[int, int]]:
    return [s.key for s in selected]


def test_top_confidence_selection_per_layer_and_category():
    chosen, left_out = select_neurons(neurons_table(), ExemplarsConfig(per_category=2))
    # visual: 1 (0.95), then 0 and 2 tie at 0.9 -> the lower index; text: 3; unknown/dead never.
    assert keys(chosen) == [(0, 0), (0, 1), (0, 3), (1, 0), (1, 1), (1, 3)]
    assert left_out == 0
    assert chosen[1].top_sample_ids == ("s010", "s011", "s012", "s013", "s014", "s015")
    only_text = select_neurons(neurons_table(), ExemplarsConfig(per_category=5, categories=["text"]))[0]
    assert keys(only_text) == [(0, 3), (1, 3)]


def test_random_selection_is_seeded_and_per_group():
    cfg = ExemplarsConfig(per_category=2, selection="random", seed=3)
    a = keys(select_neurons(neurons_table(), cfg)[0])
    assert a == keys(select_neurons(neurons_table(), cfg)[0])
    assert len(a) == 6 and all(n in (0, 1, 2, 3) for _, n in a)
    seeds = {tuple(keys(select_neurons(neurons_table(), cfg.model_copy(update={"seed": s}))[0])) for s in range(20)}
    assert len(seeds) > 1


def test_list_selection_skips_unknown_and_dead_and_rejects_strangers():
    cfg = ExemplarsConfig(selection="list", neurons=[(1, 3), (0, 4), (0, 5), (0, 1), (1, 3)])
    chosen, left_out = select_neurons(neurons_table(), cfg)
    assert keys(chosen) == [(0, 1), (1, 3)]
    assert left_out == 2
    with pytest.raises(StageError, match=r"\(7, 0\) is not a neuron.*layers 0\.\.1, neurons 0\.\.5"):
        select_neurons(neurons_table(), ExemplarsConfig(selection="list", neurons=[(7, 0)]))


def test_split_is_seeded_and_fills_shown_first():
    n = SelectedNeuron(0, 1, "visual", 1.0, tuple(f"s{i}" for i in range(20)))
    cfg = ExemplarsConfig(shown=3, held_out=2, seed=1)
    split = split_exemplars(n, cfg)
    assert [r for r, _, _ in split] == sorted(r for r, _, _ in split)
    assert Counter(role for _, _, role in split) == {"shown": 3, "held_out": 2}
    assert {r for r, _, _ in split} <= set(range(5))  # drawn from the top shown + held_out
    assert split == split_exemplars(n, cfg)
    few = SelectedNeuron(0, 1, "visual", 1.0, ("a", "b", "c", "d"))
    assert Counter(role for _, _, role in split_exemplars(few, cfg)) == {"shown": 3, "held_out": 1}


# -- the exemplar pass -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def exemplar_rows(exemplar_run):
    return pq.read_table(exemplar_run / EXEMPLARS_FILE).to_pylist()


def test_exemplars_file_follows_the_selection(exemplar_run, exemplar_rows):
    neurons = pq.read_table(exemplar_run / "neurons.parquet")
    chosen, _ = select_neurons(neurons, ExemplarsConfig(per_category=2, shown=3, held_out=2))
    assert sorted({(r["layer"], r["neuron"]) for r in exemplar_rows}) == keys(chosen)
    cats = {(r["layer"], r["neuron"]): r["category"] for r in neurons.to_pylist()}
    assert {cats[k] for k in keys(chosen)} <= {"visual", "text", "multimodal"}
    per_neuron = Counter(((r["layer"], r["neuron"]), r["role"]) for r in exemplar_rows)
    for k in keys(chosen):
        assert per_neuron[(k, "shown")] == 3 and per_neuron[(k, "held_out")] == 2
    order = [(r["layer"], r["neuron"], r["rank"]) for r in exemplar_rows]
    assert order == sorted(order)
    top = {(r["layer"], r["neuron"]): r["top_sample_ids"] for r in neurons.to_pylist()}
    assert all(top[(r["layer"], r["neuron"])][r["rank"]] == r["sample_id"] for r in exemplar_rows)


def test_heatmaps_and_token_activations_match_a_direct_forward_pass(exemplar_run, exemplar_rows, ctx_for):
    """Brute force: the model run on one sample alone, hooked independently of the builder."""
    from builder.capture.state import NeuronState
    from builder.corpus.base import open_image
    from builder.corpus.stage import read_samples
    from builder.text import read_texts, teacher_forced_text

    ctx = ctx_for(exemplar_run)
    vlm = ctx.vlm
    samples = {s.sample_id: s for s in read_samples(exemplar_run / "samples.parquet")}
    texts = read_texts(exemplar_run / "texts.parquet")
    maxima = NeuronState.load(exemplar_run / "capture" / "state.safetensors").max_all
    layers = vlm.model.model.language_model.layers
    checked = 0
    for row in exemplar_rows[::7][:6]:
        layer, neuron, sid = row["layer"], row["neuron"], row["sample_id"]
        prompt, _ = teacher_forced_text(vlm.processor, ctx.recipe.text.prompt, texts[sid].text)
        enc = vlm.processor(images=[open_image(samples[sid].image_ref, ctx.recipe.corpus)], text=[prompt],
                            return_tensors="pt")
        seen = {}
        handle = layers[layer].mlp.act_fn.register_forward_hook(lambda m, i, o: seen.setdefault("a", o.detach()))
        try:
            with torch.no_grad():
                vlm.model(**enc)
        finally:
            handle.remove()
        acts = seen["a"][0, :, neuron].float()
        norm = (acts / maxima[layer, neuron] * 10).clamp(0, 10)
        image_pos = enc["input_ids"][0] == vlm.image_token_id
        expected_map = norm[image_pos].reshape(6, 6).numpy()
        np.testing.assert_allclose(np.array(row["heatmap"]), expected_map, atol=1e-4)
        # The description is the end of the teacher-forced input.
        n = len(row["tokens"])
        assert "".join(row["tokens"]).strip() == texts[sid].text.strip()
        np.testing.assert_allclose(np.array(row["token_activations"]), norm[-n:].numpy(), atol=1e-4)
        checked += 1
    assert checked == 6


def test_each_neurons_top_sample_reaches_10(exemplar_rows):
    """The rank-0 sample holds the neuron's global max: the exemplar pass and capture agree."""
    for r in exemplar_rows:
        if r["rank"] == 0:
            peak = max(max(max(row) for row in r["heatmap"]), max(r["token_activations"], default=0.0))
            assert peak == pytest.approx(10.0, abs=1e-3)
        assert all(0.0 <= v <= 10.0 for row in r["heatmap"] for v in row)


def test_exemplars_load_as_a_dataset_with_embedded_images(exemplar_run, exemplar_rows):
    from datasets import Dataset, Features, Image as ImageFeature, List, Value

    features = Features({
        "layer": Value("int32"), "neuron": Value("int32"), "rank": Value("int32"), "sample_id": Value("string"),
        "role": Value("string"), "image": ImageFeature(), "heatmap": List(List(Value("float32"))),
        "tokens": List(Value("string")), "token_activations": List(Value("float32")),
    })
    table = pq.read_table(exemplar_run / EXEMPLARS_FILE)
    assert table.schema.equals(features.arrow_schema, check_metadata=False)
    assert table.schema.equals(EXEMPLARS_SCHEMA)
    ds = Dataset(table.cast(features.arrow_schema))
    first = ds[0]
    assert first["image"].size == (48, 48) and first["image"].mode == "RGB"
    assert np.array(first["heatmap"]).shape == (6, 6)
    assert exemplar_rows[0]["image"]["bytes"][:8] == b"\x89PNG\r\n\x1a\n"


# -- rendering -------------------------------------------------------------------------------


def test_modulation_formula_on_a_known_image():
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[..., 1] = 100
    pixels[..., 2] = 0
    view = Image.fromarray(pixels, "RGB")
    heatmap = np.array([[0.0, 10.0], [5.0, 2.5]], dtype=np.float32)
    out = np.asarray(modulate(view, heatmap, "nearest")).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]  # a = 0: white
    assert out[0, 3].tolist() == [200, 100, 0]  # a = 10: the pixel
    assert out[3, 0].tolist() == [228, 178, 128]  # a = 5: halfway to white
    assert out[3, 3].tolist() == [241, 216, 191]  # a = 2.5: 200*.25+255*.75 = 241.25 -> 241
    a = np.kron(heatmap, np.ones((2, 2)))[..., None] / 10
    np.testing.assert_array_equal(out, np.rint(pixels * a + 255 * (1 - a)))


def test_bilinear_upsampling_matches_the_half_pixel_rule():
    heatmap = np.array([[0.0, 10.0], [10.0, 0.0]], dtype=np.float32)
    up = upsample(heatmap, 4, 4, "bilinear")

    def ref(y: int, x: int) -> float:  # align_corners=False: source = (dst + 0.5) * scale - 0.5, clamped
        sy, sx = [min(max((d + 0.5) * 0.5 - 0.5, 0.0), 1.0) for d in (y, x)]
        top = heatmap[0, 0] * (1 - sx) + heatmap[0, 1] * sx
        bottom = heatmap[1, 0] * (1 - sx) + heatmap[1, 1] * sx
        return top * (1 - sy) + bottom * sy

    np.testing.assert_allclose(up, [[ref(y, x) for x in range(4)] for y in range(4)], atol=1e-6)
    assert up[0, 0] == 0.0 and up[0, 3] == 10.0 and up[1, 1] == pytest.approx(3.75)


def test_grid_view_covers_the_grid_box():
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 5, 10))  # a red band on the left, outside the centre crop
    crop = grid_view(image, ImageLayout("llava", 2, 2, 0, True, "crop"), 10)
    assert crop.size == (10, 10) and crop.getpixel((0, 0)) == (0, 0, 255)
    pad = grid_view(image, ImageLayout("llava", 2, 2, 0, True, "pad"), 20)
    assert pad.size == (20, 20) and pad.getpixel((10, 0)) == (255, 255, 255) and pad.getpixel((0, 10)) == (255, 0, 0)


def test_token_display():
    assert token_display(["a", " red", " circle"], [0.2, 9.6, 3.4]) == "a red(10) circle(3)"


def test_png_roundtrip_is_lossless():
    from builder.exemplars import encode_image

    view = Image.new("RGB", (8, 8), (10, 20, 30))
    image = modulate(view, np.full((2, 2), 7.0, dtype=np.float32), "nearest")
    decoded = Image.open(io.BytesIO(encode_image(image, "png")))
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_a_killed_exemplar_pass_resumes_after_its_last_batch(run_copy, ctx_for, monkeypatch):
    """Kill the pass during its third batch: the rerun forwards only the batches left, with
    the first run's batch size, and writes the exemplars an uninterrupted pass writes."""
    from builder.capture import stage as capture_stage
    from builder.exemplars import EXEMPLARS_FILE, PASS_DIR, ExemplarsStage

    reference = pq.read_table(run_copy / EXEMPLARS_FILE)
    forwards = []
    real_forward = capture_stage._base_forward

    def counting_forward(model):
        inner = real_forward(model)

        def forward(**inputs):
            forwards.append(inputs["input_ids"].shape[0])
            if die_at is not None and len(forwards) == die_at:
                raise KeyboardInterrupt
            return inner(**inputs)

        return forward

    monkeypatch.setattr(capture_stage, "_base_forward", counting_forward)
    die_at = 3
    with pytest.raises(KeyboardInterrupt):
        ExemplarsStage().run(ctx_for(run_copy, ["exemplars.batch_size=2"]))
    assert sorted(p.name for p in (run_copy / PASS_DIR).glob("batch-*")) == ["batch-00000.parquet",
                                                                              "batch-00001.parquet"]
    total = len({r["sample_id"] for r in reference.to_pylist()})
    forwards.clear()
    die_at = None
    # The rerun asks for batches of 5; the pass keeps the interrupted run's 2.
    counts = ExemplarsStage().run(ctx_for(run_copy, ["exemplars.batch_size=5"]))
    assert sum(forwards) == total - 4 and max(forwards) <= 2
    assert pq.read_table(run_copy / EXEMPLARS_FILE).equals(reference)
    assert counts["exemplars"] == reference.num_rows
    assert not (run_copy / PASS_DIR).exists()  # the work folder goes once the output is written
