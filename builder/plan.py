"""`--dry-run`: what a build will do and cost, without loading weights or using the network.

The model's shape comes from its config where one is local (a `save_pretrained` folder,
a built-in, or the Hub cache), else from the shape the recipe declares (`model.layers`,
`model.neurons_per_layer`). Samples are counted from the corpus index without decoding
images; missing image files are counted (they will be skipped). GPU time comes from
throughputs measured by `benchmarks/capture.py` (`plan.*` recipe keys) when given, else
from a stated roofline estimate.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from builder.config import Recipe
from builder.errors import BuilderError


@dataclass
class ModelShape:
    layers: int
    neurons_per_layer: int
    hidden: int
    image_tokens: int
    parameters_b: float
    """Language-model parameters in billions (for the compute estimate)."""
    source: str
    """Where the shape came from: `local config`, `cached config`, `built-in`, `recipe`."""


@dataclass
class BuildPlan:
    """Everything `--dry-run` prints."""

    recipe: str
    model_id: str
    shape: ModelShape
    samples: int
    missing_images: int
    batches: int
    capture_batch_size: int
    generate_batch_size: int
    batch_note: str
    """How the batch sizes were chosen (the recipe's, or `auto` for plan.gpu_memory_gib)."""
    gpus: int
    """plan.gpus: the processes generation and capture are shared out over."""
    stages: list[str]
    generate_tokens: int
    capture_seconds: float
    generate_seconds: float
    time_source: str
    explain_neurons: int
    explain_requests: int
    explain_input_tokens: int
    explain_output_tokens: int
    explain_dollars: float
    simulate_neurons: int
    simulate_requests: int
    simulate_input_tokens: int
    simulate_output_tokens: int
    simulate_dollars: float
    problems: list[str] = field(default_factory=list)

    @property
    def neurons(self) -> int:
        return self.shape.layers * self.shape.neurons_per_layer

    def render(self) -> str:
        s = self.shape
        lines = [
            f"plan for recipe {self.recipe!r}",
            f"  stages      {' -> '.join(self.stages)}",
            f"  model       {self.model_id}: {s.layers} layers x {s.neurons_per_layer} = {self.neurons:,} neurons "
            f"({s.image_tokens} image tokens/sample; shape from {s.source})",
            f"  samples     {self.samples:,} ({self.missing_images:,} with a missing image file, to be skipped)",
            f"  capture     {self.batches:,} batches of {self.capture_batch_size}; "
            f"~{_hours(self.capture_seconds)} GPU",
        ]
        if self.generate_tokens:
            lines.append(f"  generate    ~{self.generate_tokens:,} new tokens in batches of {self.generate_batch_size}; "
                         f"~{_hours(self.generate_seconds)} GPU")
        gpu = self.capture_seconds + self.generate_seconds
        lines.append(f"  GPU total   ~{_hours(gpu)} of GPU time, ~{_hours(gpu / self.gpus)} of wall time on "
                     f"{self.gpus} GPU{'s' if self.gpus > 1 else ''} (plan.gpus; generation and capture: the exemplar "
                     "pass and the simulators' detectors come on top)")
        lines.append(f"  batches     {self.batch_note}")
        lines.append(f"  time from   {self.time_source}")
        lines.append(
            f"  explain     {self.explain_neurons:,} neurons, {self.explain_requests:,} requests, "
            f"~{self.explain_input_tokens:,} input + {self.explain_output_tokens:,} output tokens, "
            f"~${self.explain_dollars:,.2f}"
        )
        if self.simulate_requests:
            lines.append(
                f"  simulate    {self.simulate_neurons:,} neurons, {self.simulate_requests:,} requests, "
                f"~{self.simulate_input_tokens:,} input + {self.simulate_output_tokens:,} output tokens, "
                f"~${self.simulate_dollars:,.2f}"
            )
        else:
            lines.append("  simulate    no LLM requests (the simulators in use run locally)")
        for p in self.problems:
            lines.append(f"  PROBLEM     {p}")
        return "\n".join(lines)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def model_shape(recipe: Recipe) -> ModelShape:
    """The model's shape from a config available offline, else from the recipe's declaration."""
    cfg = recipe.model
    config = None
    source = ""
    try:
        from transformers import AutoConfig

        if cfg.id.startswith("builtin:"):
            from builder.models.loading import model_folder

            # A built-in is made once (a few MB, seconds) and read like any saved model.
            config, source = AutoConfig.from_pretrained(model_folder(cfg)), "built-in"
        elif Path(cfg.id).is_dir():
            config, source = AutoConfig.from_pretrained(cfg.id), "local config"
        else:
            kwargs = {"revision": cfg.revision} if cfg.revision else {}
            config, source = AutoConfig.from_pretrained(cfg.id, local_files_only=True, **kwargs), "cached config"
    except (OSError, ValueError):
        config = None
    if config is not None:
        from builder.models.layout import image_tokens_bound

        text = getattr(config, "text_config", config)
        image_tokens = image_tokens_bound(config) if getattr(config, "vision_config", None) is not None else 0
        params = _lm_parameters(text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.vocab_size)
        return ModelShape(text.num_hidden_layers, text.intermediate_size, text.hidden_size, int(image_tokens),
                          params, source)
    if cfg.layers is None or cfg.neurons_per_layer is None:
        raise BuilderError(
            f"model.id={cfg.id!r}: no config is available offline; declare the shape with "
            "--set model.layers=N --set model.neurons_per_layer=D (LLaVA-1.5-7B: 32 and 11008)"
        )
    hidden = cfg.hidden_size or 4096
    return ModelShape(cfg.layers, cfg.neurons_per_layer, hidden, cfg.image_tokens or 576,
                      _lm_parameters(cfg.layers, hidden, cfg.neurons_per_layer, 32000), "recipe")


def _lm_parameters(layers: int, hidden: int, intermediate: int, vocab: int) -> float:
    # attention 4*h^2 + SwiGLU MLP 3*h*d per layer, plus embeddings and LM head.
    return (layers * (4 * hidden * hidden + 3 * hidden * intermediate) + 2 * vocab * hidden) / 1e9


def count_samples(recipe: Recipe) -> tuple[int, int]:
    """(samples in the corpus index after `corpus.limit`, how many of them have no image file)."""
    from builder.corpus.base import reader_for

    total = missing = 0
    for raw in reader_for(recipe.corpus).samples():
        if recipe.corpus.limit is not None and total - missing >= recipe.corpus.limit:
            break
        total += 1
        if raw.image_file is not None and not os.path.exists(raw.image_file):
            missing += 1
    return total, missing


def make_plan(recipe: Recipe, stages: list[str]) -> BuildPlan:
    """Plan a build: shape, samples, batches, GPU time and API cost."""
    shape = model_shape(recipe)
    samples, missing = count_samples(recipe)
    usable = samples - missing
    problems = []
    if usable == 0:
        problems.append(f"corpus {recipe.corpus.kind}:{recipe.corpus.path} has no sample with an existing image")
    p = recipe.plan
    description_tokens = recipe.text.max_new_tokens if recipe.text.source == "generate" else p.caption_tokens
    prompt = shape.image_tokens + p.template_tokens
    seq = prompt + description_tokens
    capture_batch, text_batch = planned_batch_sizes(recipe, shape, prompt, seq)
    autos = [name for name, v in (("capture", recipe.capture.batch_size), ("text", recipe.text.batch_size))
             if v == "auto"]
    batch_note = (f"{' and '.join(autos)} batch size auto: estimated for {p.gpu_memory_gib:g} GiB of GPU memory "
                  "(plan.gpu_memory_gib), chosen from the free memory at run time" if autos else "from the recipe")
    batches = math.ceil(usable / capture_batch) if usable else 0
    if p.capture_samples_per_second:
        capture_s = usable / p.capture_samples_per_second
        time_source = "measured throughputs (plan.* keys, from benchmarks/capture.py and benchmarks/generate.py)"
    else:
        # Roofline: 2 FLOPs per parameter per token at a stated fraction of peak.
        flops = 2 * shape.parameters_b * 1e9 * seq * usable
        capture_s = flops / (p.peak_tflops * 1e12 * p.utilisation)
        time_source = (
            f"roofline estimate ({p.peak_tflops:g} TFLOP/s peak at {p.utilisation:.0%} utilisation); "
            "set plan.capture_samples_per_second from benchmarks/capture.py on your GPU for a measured figure"
        )
    generate_tokens = usable * recipe.text.max_new_tokens if recipe.text.source == "generate" else 0
    if not generate_tokens:
        generate_s = 0.0
    elif p.generate_tokens_per_second:
        generate_s = generate_tokens / p.generate_tokens_per_second
    else:
        # Decoding is bound by memory reads: each step reads the weights once for the whole
        # batch, and every row's KV cache (on average the prompt and half the new tokens);
        # the prompts' prefill is compute-bound like the capture pass.
        from builder.capture.memory import kv_bytes_per_token

        new = recipe.text.max_new_tokens
        steps = math.ceil(usable / text_batch) * new
        kv_per_token = kv_bytes_per_token(language_model_shape(shape))
        bytes_per_step = shape.parameters_b * 1e9 * 2 + text_batch * (prompt + new / 2) * kv_per_token
        decode_s = steps * bytes_per_step / (p.memory_bandwidth_gbs * 1e9 * p.utilisation)
        prefill_s = 2 * shape.parameters_b * 1e9 * prompt * usable / (p.peak_tflops * 1e12 * p.utilisation)
        generate_s = decode_s + prefill_s
    from builder.simulate.plan import estimate_simulate_cost

    explain = explain_estimate(recipe, shape)
    simulate = estimate_simulate_cost(recipe, shape.layers)
    return BuildPlan(
        recipe=recipe.recipe.name,
        model_id=recipe.model.id,
        shape=shape,
        samples=samples,
        missing_images=missing,
        batches=batches,
        capture_batch_size=capture_batch,
        generate_batch_size=text_batch,
        batch_note=batch_note,
        gpus=p.gpus,
        stages=stages,
        generate_tokens=generate_tokens,
        capture_seconds=capture_s,
        generate_seconds=generate_s,
        time_source=time_source,
        problems=problems,
        **explain,
        **simulate,
    )


def language_model_shape(shape: ModelShape):
    """The shape the memory estimates take, in bf16 (the GPU recipes' dtype)."""
    from builder.capture.memory import LanguageModelShape

    return LanguageModelShape(shape.layers, shape.hidden, shape.neurons_per_layer, 2)


def planned_batch_sizes(recipe: Recipe, shape: ModelShape, prompt: int, seq: int) -> tuple[int, int]:
    """(capture, generation) batch sizes: the recipe's, or what `auto` would choose on a GPU
    of `plan.gpu_memory_gib` holding the weights (bf16, plus ~0.6 B vision parameters), for
    prompts of `prompt` tokens and capture sequences of `seq`."""
    from builder.capture.memory import batch_size_for, capture_bytes_per_sample, generate_bytes_per_sample

    lm = language_model_shape(shape)
    free = max(0.0, recipe.plan.gpu_memory_gib * 2**30 - (shape.parameters_b + 0.6) * 1e9 * 2)
    capture = recipe.capture.batch_size
    if capture == "auto":
        capture = batch_size_for(int(free), capture_bytes_per_sample(lm, seq))
    text = recipe.text.batch_size
    if text == "auto":
        text = batch_size_for(int(free), generate_bytes_per_sample(lm, prompt, recipe.text.max_new_tokens))
    return int(capture), int(text)


def explain_estimate(recipe: Recipe, shape: ModelShape) -> dict[str, float | int]:
    """Upper bound of the explain stage's requests, tokens and dollars before classification."""
    from builder.explain.plan import estimate_explain_cost

    return estimate_explain_cost(recipe, shape.layers)
