"""Loading a vision-language model and its processor, and finding its decoder MLPs.

Every model, built-in or real, goes through `AutoModelForImageTextToText.from_pretrained`
and `AutoProcessor.from_pretrained`: built-in models are first saved to a local folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.config import ModelConfig
from builder.errors import ModelError

log = logging.getLogger("builder")


@dataclass
class DecoderMLP:
    """One language-model FFN whose intermediate activation is recorded."""

    layer: int
    """Decoder layer index."""
    module: Any
    """The MLP module (has gate_proj, up_proj, down_proj, act_fn)."""

    @property
    def width(self) -> int:
        return int(self.module.gate_proj.out_features)


@dataclass
class LoadedVLM:
    """A model ready for inference with what the stages need to know about it."""

    model: Any
    processor: Any
    model_path: str
    """Folder or Hub id it was loaded from."""
    config: ModelConfig
    resolved_revision: str
    """Hub commit sha, or '' for local folders."""

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        for name in ("image_token_id", "image_token_index"):
            if getattr(cfg, name, None) is not None:
                return int(getattr(cfg, name))
        raise ModelError(f"{self.model_path}: config has no image_token_id; is this a vision-language model?")

    @property
    def image_token(self) -> str:
        return str(getattr(self.processor, "image_token", "<image>"))

    def mlps(self) -> list[DecoderMLP]:
        return find_decoder_mlps(self.model)

    def provenance(self) -> dict[str, Any]:
        mlps = self.mlps()
        return {
            "id": self.config.id,
            "revision": self.config.revision,
            "resolved_revision": self.resolved_revision,
            "path": self.model_path,
            "architecture": type(self.model).__name__,
            "layers": len(mlps),
            "neurons_per_layer": mlps[0].width if mlps else 0,
            "dtype": str(self.config.dtype),
            "image_grid": self.image_grid(),
        }

    def image_grid(self) -> list[int] | None:
        """[H, W] of the heatmaps' patch grid (builder.models.layout); None for a family without one."""
        from builder.models.layout import image_layout

        try:
            layout = image_layout(self.model.config, getattr(self.processor, "image_processor", None))
        except ModelError:
            return None
        return [layout.height, layout.width]


def find_decoder_mlps(model: Any) -> list[DecoderMLP]:
    """The language model's LLaMA-style MLPs, found through the model's structure.

    Looks for the decoder (`get_decoder()` or a `language_model` attribute) and its
    `layers`, and requires each layer's `mlp` to have gate/up/down projections and an
    activation module. Vision towers are never searched.
    """
    candidates = []
    inner = getattr(model, "model", model)
    for owner in (inner, model):
        lm = getattr(owner, "language_model", None)
        if lm is not None:
            candidates.append(lm)
    if hasattr(model, "get_decoder"):
        try:
            candidates.append(model.get_decoder())
        except (AttributeError, NotImplementedError):
            pass
    for lm in candidates:
        lm = getattr(lm, "model", lm) if not hasattr(lm, "layers") else lm
        layers = getattr(lm, "layers", None)
        if layers is None:
            continue
        mlps = []
        for i, layer in enumerate(layers):
            mlp = getattr(layer, "mlp", None)
            if mlp is None or not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                break
            mlps.append(DecoderMLP(i, mlp))
        else:
            if mlps:
                return mlps
    raise ModelError(
        f"{type(model).__name__}: no LLaMA-style decoder MLPs (layers[i].mlp with gate_proj, up_proj, "
        "down_proj, act_fn) found in the language model; this model family is not supported"
    )


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        # One GPU per process under `accelerate launch` / torchrun.
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def model_folder(cfg: ModelConfig) -> str:
    """Local folder or Hub id that `from_pretrained` loads (built-ins are saved first)."""
    if cfg.id.startswith("builtin:"):
        from builder.models.builtin import materialize_builtin

        return str(materialize_builtin(cfg.id.removeprefix("builtin:"), seed=cfg.seed))
    return cfg.id


def load_vlm(cfg: ModelConfig) -> LoadedVLM:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = model_folder(cfg)
    local = Path(path).is_dir()
    dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.revision and not local:
        kwargs["revision"] = cfg.revision
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    device = resolve_device(cfg.device)
    if device.startswith("cuda"):
        # Weights go straight to this process's GPU: no host copy of the whole model first
        # (14 GB for 7B in bf16, per process under `accelerate launch`).
        kwargs["device_map"] = device
    try:
        processor = AutoProcessor.from_pretrained(path, **({"revision": cfg.revision} if cfg.revision and not local else {}))
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelError(
            f"model.id={cfg.id!r}: cannot load ({str(e).splitlines()[0]}); give a local save_pretrained folder "
            "or a Hub id reachable from this machine"
        ) from e
    model = model.to(device).eval()
    resolved = ""
    if not local:
        resolved = str(getattr(model.config, "_commit_hash", "") or "")
    find_decoder_mlps(model)  # fail early, with the clear message, for unsupported families
    return LoadedVLM(model=model, processor=processor, model_path=path, config=cfg, resolved_revision=resolved)
