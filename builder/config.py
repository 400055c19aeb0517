"""The recipe: one typed, validated, immutable config tree with one section per stage.

A recipe is YAML whose top-level keys are the sections below. Unknown keys are refused,
every value is type-checked, and `--set dotted.key=value` overrides are parsed as YAML
scalars and validated like the file itself. Errors surface as :class:`RecipeError`, a
one-line message naming the key and what is allowed.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from builder.errors import RecipeError


BatchSize = Annotated[int, Field(ge=1)] | Literal["auto"]
"""A batch size, or `auto`: from free GPU memory (the CPU default without CUDA)."""


class Section(BaseModel):
    """Base for every recipe section: frozen, unknown keys refused, defaults documented."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class RecipeInfo(Section):
    name: str = "unnamed"
    """Recipe name; the default run directory is `runs/<name>`."""
    description: str = ""
    """One line shown by `build-neuron-dataset recipes`."""


class ModelConfig(Section):
    id: str = "llava-hf/llava-1.5-7b-hf"
    """Hub id, local `save_pretrained` folder, or `builtin:tiny-llava` / `builtin:planted-llava`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); the resolved commit is recorded in the manifest."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    """Weights and compute dtype (`auto`: the checkpoint's own); activations are reduced in float32."""
    device: str = "auto"
    """`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`, ..."""
    attn_implementation: Literal["eager", "sdpa"] | None = None
    """Attention kernel passed to `from_pretrained` (None: the library's default)."""
    seed: int = 0
    """Seed of the built-in models' weights (ignored for real checkpoints)."""
    license: str = "other"
    """The model's license, carried into the dataset card."""
    layers: int | None = Field(default=None, ge=1)
    """Declared decoder layers, used by --dry-run when no model config is available offline."""
    neurons_per_layer: int | None = Field(default=None, ge=1)
    """Declared FFN width (neurons per layer), for --dry-run without a config."""
    hidden_size: int | None = Field(default=None, ge=1)
    """Declared hidden size, for --dry-run's compute estimate without a config."""
    image_tokens: int | None = Field(default=None, ge=1)
    """Declared image tokens per sample, for --dry-run without a config."""


class CorpusConfig(Section):
    kind: Literal["builtin", "folder", "llava-json", "hf"] = "builtin"
    """Where samples come from: see README 'Corpora'."""
    path: str = "shapes"
    """builtin: corpus name; folder: directory with captions.jsonl; llava-json: the JSON file;
    hf: Hub id, `load_from_disk` folder or parquet file(s)."""
    image_root: str | None = None
    """llava-json: folder the JSON's `image` paths are relative to."""
    limit: int | None = Field(default=None, ge=1)
    """Use at most this many samples (a seeded random subset when `shuffle_seed` is set)."""
    shuffle_seed: int | None = None
    """Seed of the random subset taken with `limit` (None: the first `limit` samples)."""
    size: int = Field(default=64, ge=1)
    """builtin: number of samples generated."""
    split: str = "train"
    """hf: split to read."""
    image_column: str = "image"
    """hf: column holding the image."""
    caption_column: str = "caption"
    """hf: column holding the caption (a string or a list of strings)."""
    id_column: str | None = None
    """hf: column with a stable source id (None: the row index)."""
    streaming: bool = False
    """hf: stream the dataset instead of downloading it whole; the checked images are then
    stored under the run directory (`corpus-images/`) so later stages can reopen them."""
    subset: str | None = None
    """hf: the dataset's configuration (subset) name, `load_dataset(path, name=...)`."""
    revision: str | None = None
    """hf: Hub revision (branch, tag or commit) of the dataset; pin it for a reproducible corpus."""
    shuffle_buffer: int = Field(default=10_000, ge=1)
    """hf with streaming: buffer of the approximate seeded shuffle used with `limit` + `shuffle_seed`."""
    caption_index: int = Field(default=0, ge=0)
    """Which caption to use when a sample has several."""
    dedup: bool = True
    """Skip images whose content hash was already seen."""
    max_image_pixels: int = Field(default=50_000_000, ge=1)
    """Larger images are skipped instead of decoded (decompression-bomb bound)."""
    license: str = "other"
    """The corpus's license, carried into the dataset card."""


class TextConfig(Section):
    source: Literal["caption", "generate"] = "caption"
    """`caption`: the corpus caption is the description; `generate`: the model describes the image."""
    prompt: str = "Could you describe the image?"
    """The user turn; also the question before a caption in `caption` mode."""
    max_new_tokens: int = Field(default=256, ge=1)
    """generate: maximum description length."""
    batch_size: BatchSize = 8
    """generate: images per generation batch; `auto`: the most that fit the GPU's free memory
    (builder/capture/memory.py)."""


class CaptureConfig(Section):
    hook: Literal["act_fn", "down_proj_input"] = "act_fn"
    """`act_fn`: SiLU(gate_proj(x)) (the paper's neuron); `down_proj_input`: SiLU(gate)*up."""
    batch_size: BatchSize = 8
    """Samples per forward pass; `auto`: the most that fit the GPU's free memory, chosen once
    per run and kept on resume (builder/capture/memory.py)."""
    top_m: int = Field(default=8, ge=1)
    """Order statistics kept per modality for each top sample (>= both min-token counts)."""
    checkpoint_every: int = Field(default=50, ge=1)
    """Save the streaming state every this many batches."""
    num_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes that decode images and tokenise ahead of the GPU."""


class ClassifyConfig(Section):
    top_n: int = Field(default=50, ge=1)
    """Top samples kept per neuron (N)."""
    visual_threshold: float = Field(default=2.0, ge=0, le=10)
    """Tv on the 0-10 scale."""
    visual_min_tokens: int = Field(default=4, ge=1)
    """nv: visual tokens above Tv that make a sample visual-activated."""
    text_threshold: float = Field(default=3.0, ge=0, le=10)
    """Tt on the 0-10 scale."""
    text_min_tokens: int = Field(default=2, ge=1)
    """nt: description tokens above Tt that make a sample text-activated."""
    strict: bool = True
    """Compare with `>` (True, the paper) or `>=` (False)."""
    confidence: float = Field(default=0.8, ge=0, le=1)
    """A neuron is high-confidence when its winning fraction exceeds this."""
    tie_break: list[Literal["visual", "text", "multimodal", "unknown"]] = [
        "visual",
        "text",
        "multimodal",
        "unknown",
    ]
    """Preference order when two categories have the same fraction."""
    significance: bool = False
    """Also run the significance test: extra columns visual_minus_text, p_value_visual_vs_text
    (sign-flip permutation test over the top samples) and p_value_category (exact sign test)."""
    permutations: int = Field(default=1000, ge=10)
    """Random sign patterns of the permutation test (all 2^n are used when that is fewer)."""
    seed: int = 0
    """Seed of the significance test's random sign patterns."""

    @model_validator(mode="after")
    def _tie_break_is_a_permutation(self) -> ClassifyConfig:
        if sorted(self.tie_break) != sorted(["visual", "text", "multimodal", "unknown"]):
            raise ValueError("tie_break must list visual, text, multimodal and unknown once each")
        return self


class ExemplarsConfig(Section):
    shown: int = Field(default=5, ge=0)
    """Top samples shown to the explainer per neuron."""
    held_out: int = Field(default=5, ge=0)
    """Top samples kept back for scoring per neuron."""
    per_category: int = Field(default=10, ge=0)
    """Neurons selected per (layer, category) for explanation (top_confidence, random)."""
    selection: Literal["top_confidence", "random", "list"] = "top_confidence"
    """How neurons are chosen within each (layer, category): the most confident first (ties:
    lower neuron index), a seeded random sample, or exactly the neurons in `neurons`."""
    neurons: list[tuple[int, int]] = []
    """selection=list: the (layer, neuron) pairs to explain, e.g. `[[3, 17], [5, 2]]`."""
    categories: list[Literal["visual", "text", "multimodal"]] = ["visual", "text", "multimodal"]
    """Categories explained (unknown and dead neurons never are: nothing to show)."""
    seed: int = 0
    """Seed of the random selection and of the shown/held-out split."""
    batch_size: int | None = Field(default=None, ge=1)
    """Samples per forward pass of the exemplar pass (None: capture.batch_size)."""
    render_size: int | None = Field(default=None, ge=8)
    """Side in pixels of the rendered exemplar images (None: the vision tower's input size,
    336 for LLaVA-1.5)."""
    upsample: Literal["bilinear", "nearest"] = "bilinear"
    """How the patch map is upsampled to the image before modulation."""
    image_format: Literal["jpeg", "png"] = "jpeg"
    """Encoding of the embedded exemplar images."""
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    """JPEG quality of the embedded images."""


class ModelPrice(Section):
    input_per_mtok: float = Field(ge=0)
    """Dollars per million input (prompt) tokens."""
    output_per_mtok: float = Field(ge=0)
    """Dollars per million output (completion) tokens."""


class ExplainConfig(Section):
    backend: Literal["openai", "offline"] = "offline"
    """`openai`: an OpenAI-compatible endpoint; `offline`: the statistical baseline explainer."""
    model: str = "gpt-4o"
    """Explainer model name sent to the endpoint."""
    max_concurrency: int = Field(default=8, ge=1)
    """Requests in flight at once."""
    image_detail: Literal["low", "high", "auto"] = "high"
    """Detail level of the exemplar images sent to the explainer (low: 85 tokens each)."""
    max_tokens: int = Field(default=60, ge=1)
    """Cap on the explainer's answer length in tokens."""
    temperature: float = Field(default=0.0, ge=0, le=2)
    """Sampling temperature of the explainer."""
    timeout_seconds: float = Field(default=60.0, gt=0)
    """Time limit of one request attempt."""
    max_attempts: int = Field(default=6, ge=1)
    """Attempts per request on retryable errors (429, 408, 409, 5xx, timeouts, connection)."""
    retry_base_seconds: float = Field(default=1.0, ge=0)
    """First backoff; doubles per attempt, jittered (a server's Retry-After takes precedence)."""
    retry_max_seconds: float = Field(default=60.0, ge=0)
    """Longest backoff between two attempts."""
    requests_per_minute: float | None = Field(default=None, gt=0)
    """Client-side request rate limit (None: none)."""
    tokens_per_minute: float | None = Field(default=None, gt=0)
    """Client-side token rate limit, from estimated prompt + max answer tokens (None: none)."""
    budget_usd: float | None = Field(default=None, ge=0)
    """Stop sending before this many dollars are spent by this stage's requests (over every
    run that uses the same cache); unsent neurons fail `budget_exhausted`. None: no cap."""
    prices: dict[str, ModelPrice] = {
        "gpt-4o": ModelPrice(input_per_mtok=2.5, output_per_mtok=10.0),
        "gpt-4o-mini": ModelPrice(input_per_mtok=0.15, output_per_mtok=0.6),
    }
    """Dollars per million tokens by model name, for the cost ledger, the budget and --dry-run."""
    retry_failed: bool = False
    """Resend requests whose earlier answer was a refusal, empty, filtered or a non-retryable
    HTTP error (by default those are remembered and not paid for twice)."""
    cache_path: str | None = None
    """sqlite file of the LLM cache and cost ledger (None: RUN_DIR/llm-cache.sqlite)."""
    seed: int = 0
    """Seed of the retry jitter."""
    offline_top_words: int = Field(default=3, ge=1)
    """offline: most words or tokens named in one explanation."""
    offline_min_z: float = Field(default=1.96, ge=0)
    """offline: z-score a caption word's log-odds needs to count as over-represented."""
    offline_prior: float = Field(default=10.0, gt=0)
    """offline: strength (pseudo-count) of the corpus-frequency prior of the log-odds."""
    offline_token_share: float = Field(default=0.5, gt=0, le=1)
    """offline: a token is named when its activation weight is at least this share of the top token's."""

    @model_validator(mode="after")
    def _budget_needs_a_price(self) -> ExplainConfig:
        if self.backend == "openai" and self.budget_usd is not None and self.model not in self.prices:
            raise ValueError(
                f"budget_usd is set but explain.prices has no entry for model {self.model!r}; add "
                f"explain.prices.{self.model}.input_per_mtok and .output_per_mtok"
            )
        return self


class SimulateConfig(Section):
    """How explanations are scored (METHOD.md 6; README 'Simulators')."""

    backend: Literal["openai", "offline"] = "offline"
    """Default simulators: `openai` = `grounded` visual + `llm` text (the paper's, through the
    explain stage's endpoint); `offline` = the no-model baselines for both."""
    visual: Literal["grounded", "llm", "offline"] | None = None
    """Visual simulator, overriding `backend`: `grounded` (LLM phrases -> detector -> SAM masks),
    `llm` (a vision LLM reads a numbered grid), `offline` (VLM embedding similarity baseline)."""
    text: Literal["llm", "offline"] | None = None
    """Text simulator, overriding `backend`: `llm` (0-10 per token as JSON) or `offline`
    (token-match baseline)."""
    model: str | None = None
    """Simulator LLM name sent to the endpoint (None: `explain.model`)."""
    random_samples: int = Field(default=5, ge=0)
    """Random samples outside the neuron's top-N scored beside its held-out exemplars, so a
    prediction that is high everywhere cannot score well."""
    multimodal_score: Literal["text", "mean"] = "text"
    """A multimodal neuron's `score`: `text`, its text simulator's (METHOD.md 6: 0-10 per
    description token), or `mean` of its visual and text scores. Both simulators run and
    both scores are published (`visual_score`, `text_score`) either way."""
    seed: int = 0
    """Seed of the random samples and of the baseline neuron choice (per neuron, order-free)."""
    detector: str = "IDEA-Research/grounding-dino-tiny"
    """grounded: open-vocabulary detector (Hub id or local folder; `AutoModelForZeroShotObjectDetection`)."""
    segmenter: str = "facebook/sam-vit-base"
    """grounded: box-prompted segmenter (Hub id or local folder; `SamModel`)."""
    phrases: Literal["llm", "explanation"] = "llm"
    """grounded: `llm` turns the explanation into short grounding phrases; `explanation`
    gives the explanation itself to the detector (no LLM call)."""
    max_phrases: int = Field(default=3, ge=1)
    """grounded: most grounding phrases kept per explanation."""
    box_threshold: float = Field(default=0.35, ge=0, le=1)
    """grounded: detector box score needed to keep a box."""
    text_threshold: float = Field(default=0.25, ge=0, le=1)
    """grounded: detector phrase score needed to keep a box."""
    max_boxes: int = Field(default=10, ge=1)
    """grounded: most boxes (best scores first) segmented per image."""
    device: str = "auto"
    """grounded/offline: device of the simulator models (`auto`, `cpu`, `cuda`, ...)."""
    llm_grid: int = Field(default=8, ge=1, le=24)
    """visual llm: cells per side of the numbered grid drawn on the image (each cell's value
    fills the patches whose centres fall in it)."""
    image_detail: Literal["low", "high", "auto"] = "low"
    """visual llm: detail level of the image sent to the vision LLM."""
    budget_usd: float | None = Field(default=None, ge=0)
    """Stop sending simulator requests before this many dollars are spent by this stage
    (ledger scope `simulate`, priced with `explain.prices`); unsent ones fail
    `llm: budget_exhausted`. None: no cap."""

    @property
    def visual_simulator(self) -> str:
        """The visual simulator in use (`visual`, else the `backend` default)."""
        return self.visual or ("grounded" if self.backend == "openai" else "offline")

    @property
    def text_simulator(self) -> str:
        """The text simulator in use (`text`, else the `backend` default)."""
        return self.text or ("llm" if self.backend == "openai" else "offline")


class PlanConfig(Section):
    """Inputs of --dry-run's time estimate."""

    capture_samples_per_second: float | None = Field(default=None, gt=0)
    """Measured capture throughput on your GPU (benchmarks/capture.py); None: roofline estimate."""
    generate_tokens_per_second: float | None = Field(default=None, gt=0)
    """Measured generation throughput (new tokens/s over a batch); None: roofline estimate."""
    peak_tflops: float = Field(default=989.0, gt=0)
    """Dense bf16 peak of the GPU for the roofline estimate (H100 SXM: 989)."""
    memory_bandwidth_gbs: float = Field(default=3350.0, gt=0)
    """GPU memory bandwidth in GB/s for the decoding estimate (H100 SXM: 3350)."""
    gpus: int = Field(default=1, ge=1)
    """GPUs (processes of `accelerate launch`) the build runs on: each describes and captures
    1/N of the corpus, so the wall time of those stages is about 1/N of their GPU time."""
    gpu_memory_gib: float = Field(default=80.0, gt=0)
    """GPU memory per process, for the batch sizes `auto` would choose (H100: 80)."""
    utilisation: float = Field(default=0.4, gt=0, le=1)
    """Assumed fraction of peak reached."""
    template_tokens: int = Field(default=20, ge=0)
    """Chat-template tokens per sample (BOS, USER:, the prompt, ASSISTANT:)."""
    caption_tokens: int = Field(default=20, ge=0)
    """Typical caption length in tokens when text.source is caption."""


class PackageConfig(Section):
    version: str = Field(default="0.1.0", pattern=r"^\d+\.\d+\.\d+$")
    """Dataset version; published as tag `vX.Y.Z`."""
    pretty_name: str | None = None
    """Title of the dataset card (default: derived from the model id)."""
    max_shard_mb: float = Field(default=400.0, gt=0)
    """Parquet shards rotate past this many MB of uncompressed data (the Hub suggests < 500 MB)."""
    row_group_mb: float = Field(default=64.0, gt=0)
    """Row groups hold at most this many MB of uncompressed data (the viewer reads whole row groups)."""
    image_rows_per_group: int = Field(default=100, ge=1)
    """Row groups of configs with images (exemplars) hold at most this many rows."""
    card_examples: int = Field(default=3, ge=0)
    """Example neurons per category in the card's table (best scores first)."""


class PublishConfig(Section):
    repo: str | None = None
    """Hub dataset repo `org/name` that the card names (load snippet, citation) and that
    `publish` uploads to by default; `--push-to-hub ORG/NAME` sets it."""
    private: bool = False
    """Create the repo private (`publish` and `--push-to-hub`; `publish --private` too)."""


class Recipe(Section):
    """A whole recipe: what to run and every parameter of every stage."""

    recipe: RecipeInfo = RecipeInfo()
    model: ModelConfig = ModelConfig()
    corpus: CorpusConfig = CorpusConfig()
    text: TextConfig = TextConfig()
    capture: CaptureConfig = CaptureConfig()
    classify: ClassifyConfig = ClassifyConfig()
    exemplars: ExemplarsConfig = ExemplarsConfig()
    explain: ExplainConfig = ExplainConfig()
    simulate: SimulateConfig = SimulateConfig()
    package: PackageConfig = PackageConfig()
    publish: PublishConfig = PublishConfig()
    plan: PlanConfig = PlanConfig()

    @model_validator(mode="after")
    def _order_statistics_cover_thresholds(self) -> Recipe:
        need = max(self.classify.visual_min_tokens, self.classify.text_min_tokens)
        if self.capture.top_m < need:
            raise ValueError(
                f"capture.top_m={self.capture.top_m} must be >= max(classify.visual_min_tokens, "
                f"classify.text_min_tokens)={need} for exact classification"
            )
        return self

    def section_dict(self, name: str) -> dict[str, Any]:
        """One section as plain JSON-able data (used for stage fingerprints)."""
        return getattr(self, name).model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def bundled_recipes_dir() -> Path:
    """Folder of the recipes shipped with the package (or the repo's `recipes/` in a checkout)."""
    packaged = Path(str(resources.files("builder"))) / "recipes"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "recipes"


def list_recipes() -> dict[str, str]:
    """Bundled recipe names with their one-line descriptions."""
    out = {}
    for path in sorted(bundled_recipes_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        out[path.stem] = str((data.get("recipe") or {}).get("description", ""))
    return out


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    # A bare name is a bundled recipe even where the current folder has a folder of that name.
    if path.suffix in (".yaml", ".yml") or path.is_file() or len(path.parts) > 1:
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        return path
    bundled = bundled_recipes_dir() / f"{name_or_path}.yaml"
    if not bundled.is_file():
        names = ", ".join(list_recipes()) or "none"
        raise RecipeError(f"unknown recipe {name_or_path!r}; bundled recipes: {names}, or give a YAML path")
    return bundled


def _set_dotted(data: dict[str, Any], dotted: str, raw_value: str) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise RecipeError(f"--set {dotted}={raw_value}: key must look like section.key")
    try:
        value = yaml.safe_load(raw_value) if raw_value != "" else ""
    except yaml.YAMLError:
        value = raw_value
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    if not first["loc"]:  # a check across sections: its message names the keys; the input is the whole recipe
        return f"{source}: {str(first['msg']).removeprefix('Value error, ')}"
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        section = first["loc"][:-1]
        allowed = _allowed_keys(section)
        return f"{source}: unknown key {key!r}; allowed here: {', '.join(allowed)}"
    if first["type"] == "literal_error":
        return f"{source}: {key}: {first['msg']} (got {first['input']!r})"
    msg = first["msg"]
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg} (got {first.get('input')!r}){more}"


def _allowed_keys(section_path: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in section_path:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a bundled recipe by name or a YAML file by path, apply `key=value` overrides."""
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    data.setdefault("recipe", {}).setdefault("name", path.stem)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), raw)
    return recipe_from_dict(data, source=str(path))


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_validation_error(e, source)) from e
