"""`builtin:planted-llava`: the tiny LLaVA with neurons whose category is known by construction.

The weights of `builtin:tiny-llava` are edited so that chosen FFN neurons are visual-only,
text-only, multimodal, dead, or fire most on one word ("red", "blue"):

- Every decoder layer's attention `o_proj` and MLP `down_proj` are zero, so the residual
  stream at every layer is the input embedding itself.
- Hidden dimensions at the top of the residual stream are reserved as features:
  `VISUAL_DIM` is a constant in the projector's output (every image token) and 0 in every
  word embedding; `TEXT_DIM` is a constant in every word embedding and 0 for image tokens;
  one `CONCEPT_DIMS` entry per concept word is set only in that word's token embedding.
  The constant dominates the token's RMS, so after the layer's RMSNorm each feature is
  about 8 where present and exactly 0 where absent.
- A planted neuron's `gate_proj` row reads only these features (so `SiLU(gate)` is exactly
  0 on tokens without them): visual `g * x_V`, text `g * x_T`, multimodal
  `g * (x_V + x_T)`, dead `-g * (x_V + x_T)` (negative on every token), concept
  `g * (x_T / 2 + x_word)` (the word at full strength and every other description token at
  about half, so the neuron is text-activated under nt = 2 and its top samples are exactly
  the descriptions containing the word). Its `up_proj` row `x_V + x_T` is positive on
  every token, so the `down_proj_input` hook gives the same categories.
- Every other neuron keeps its random weights but ignores the reserved features.

The ground truth (layer, neuron, expected category, dead, concept word) is stored with the
model, in `config.json` under `planted`, and read back with :func:`load_planted`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import ModelError
from builder.models.builtin import TinyLlavaSpec, build_tiny_llava, register_builtin

PLANTED_FORMAT = "planted/1"
FEATURE_VALUE = 0.5
"""Value of a reserved feature before RMSNorm (other dimensions are ~0.01-0.02)."""
VISUAL_DIM_FROM_END = 1
TEXT_DIM_FROM_END = 2
CONCEPT_WORDS = ("red", "blue")
"""Words with a planted text neuron each (one per layer); each must be a single token
when it follows a space, as in the shapes captions."""
PER_LAYER = {"visual": 5, "text": 5, "multimodal": 5, "dead": 3}
"""Planted neurons of each kind in every layer (plus one per concept word)."""
GAIN_RANGE = (1.0, 2.0)
"""Gate gains are drawn from this range, so planted neurons differ in scale."""


@dataclass(frozen=True)
class PlantedNeuron:
    """One neuron whose category is known by construction."""

    layer: int
    neuron: int
    category: str
    """The category METHOD.md section 4 must give it: visual, text, multimodal or unknown."""
    dead: bool
    """Never positive on any token (category unknown, `dead` flag set)."""
    concept: str | None
    """The word it fires on most (text neurons planted on one word), else None."""
    gain: float
    """Its gate gain g."""


def reserved_dims(hidden: int) -> dict[str, int]:
    """Residual-stream dimensions used as features: visual, text, then one per concept word."""
    dims = {"visual": hidden - VISUAL_DIM_FROM_END, "text": hidden - TEXT_DIM_FROM_END}
    for i, word in enumerate(CONCEPT_WORDS):
        dims[word] = hidden - TEXT_DIM_FROM_END - 1 - i
    return dims


def plant_plan(spec: TinyLlavaSpec) -> list[PlantedNeuron]:
    """Which neurons are planted as what: a seeded choice of distinct units in every layer."""
    kinds = [k for k, n in PER_LAYER.items() for _ in range(n)] + [f"concept:{w}" for w in CONCEPT_WORDS]
    if len(kinds) > spec.intermediate:
        raise ModelError(f"builtin:planted-llava needs {len(kinds)} neurons per layer; the spec has {spec.intermediate}")
    rng = np.random.default_rng(spec.seed)
    plan = []
    for layer in range(spec.text_layers):
        units = rng.permutation(spec.intermediate)[: len(kinds)]
        gains = rng.uniform(*GAIN_RANGE, size=len(kinds))
        for kind, unit, gain in zip(kinds, units.tolist(), gains.tolist()):
            concept = kind.split(":", 1)[1] if kind.startswith("concept:") else None
            category = {"dead": "unknown"}.get(kind, "text" if concept else kind)
            plan.append(PlantedNeuron(layer, int(unit), category, kind == "dead", concept, round(gain, 4)))
    return plan


def concept_token_ids(tokenizer: Any) -> dict[str, int]:
    """The single token of each concept word as it appears after a space in a caption."""
    ids = {}
    for word in CONCEPT_WORDS:
        toks = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ModelError(f"planted concept {word!r} is {len(toks)} tokens for the tiny tokenizer; use a word it "
                             "learned as one token (the shapes colours are)")
        ids[word] = int(toks[0])
    return ids


def plant(model: Any, tokenizer: Any, plan: list[PlantedNeuron]) -> dict[str, int]:
    """Edit the weights in place (see the module docstring); returns the reserved dims."""
    import torch

    lm = model.model.language_model
    hidden = lm.embed_tokens.weight.shape[1]
    dims = reserved_dims(hidden)
    reserved = list(dims.values())
    with torch.no_grad():
        # The residual stream stays the input embedding in every layer.
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = lm.embed_tokens.weight
        emb[:, reserved] = 0
        emb[:, dims["text"]] = FEATURE_VALUE
        for word, tok in concept_token_ids(tokenizer).items():
            emb[tok, dims[word]] = FEATURE_VALUE
        proj = model.model.multi_modal_projector.linear_2
        proj.weight[reserved, :] = 0
        proj.bias[reserved] = 0
        proj.bias[dims["visual"]] = FEATURE_VALUE
        for layer in lm.layers:  # random neurons ignore the reserved features
            layer.mlp.gate_proj.weight[:, reserved] = 0
            layer.mlp.up_proj.weight[:, reserved] = 0
        for p in plan:
            mlp = lm.layers[p.layer].mlp
            gate = mlp.gate_proj.weight[p.neuron]
            gate.zero_()
            v, t = dims["visual"], dims["text"]
            if p.dead:
                gate[v] = gate[t] = -p.gain
            elif p.concept:
                gate[t] = p.gain / 2
                gate[dims[p.concept]] = p.gain
            else:
                if p.category in ("visual", "multimodal"):
                    gate[v] = p.gain
                if p.category in ("text", "multimodal"):
                    gate[t] = p.gain
            up = mlp.up_proj.weight[p.neuron]
            up.zero_()
            # Positive on every token, so the down_proj_input hook gives the same categories
            # (not raised on concept words, which keeps their text tokens above Tt there too).
            up[[dims["visual"], dims["text"]]] = 1.0
    return dims


def build_planted_llava(spec: TinyLlavaSpec):
    """Model and processor of `builtin:planted-llava` (the tiny LLaVA, planted)."""
    model, processor = build_tiny_llava(spec)
    plan = plant_plan(spec)
    dims = plant(model, processor.tokenizer, plan)
    # Stored with the model: config.json carries it through save_pretrained/from_pretrained.
    model.config.planted = {"format": PLANTED_FORMAT, "reserved_dims": dims, "neurons": [asdict(p) for p in plan]}
    return model, processor


def load_planted(model_folder: str | Path) -> list[PlantedNeuron]:
    """The ground truth saved with a planted model folder."""
    path = Path(model_folder) / "config.json"
    data = json.loads(path.read_text()).get("planted")
    if not data or data.get("format") != PLANTED_FORMAT:
        raise ModelError(f"{path}: no planted ground truth; is this a builtin:planted-llava folder?")
    return [PlantedNeuron(**n) for n in data["neurons"]]


register_builtin("planted-llava", build_planted_llava)
