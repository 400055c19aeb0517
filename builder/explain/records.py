"""Typed records between the exemplars and the explainers, and the explain stage's output row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Exemplar:
    """One sample shown to the explainer."""

    sample_id: str
    rank: int
    """Position among the neuron's top samples (0 = highest activation)."""
    image: bytes
    """The activation-modulated image, encoded (PNG or JPEG)."""
    tokens: tuple[str, ...]
    """The description's tokens as text."""
    activations: tuple[float, ...]
    """The neuron's activation on each token, 0-10."""


@dataclass(frozen=True)
class NeuronExemplars:
    """What an explainer is given about one neuron: its shown exemplars, rank order."""

    layer: int
    neuron: int
    category: str
    """visual, text or multimodal: decides what the explainer is shown."""
    exemplars: tuple[Exemplar, ...]


@dataclass(frozen=True)
class Explanation:
    """One row of `explanations.parquet`."""

    layer: int
    neuron: int
    category: str
    explanation: str | None
    """The phrase completing "this neuron activates for ..."; None when it failed."""
    explainer: str
    """`openai:<model>` or `offline-baseline`."""
    prompt_version: str
    """Version of the prompt (or of the baseline's rule) that produced it."""
    status: str
    """`ok` or `failed`."""
    failure: str | None
    """`kind: detail` when failed (kinds: builder.llm.FailureKind values, or `no_evidence`)."""


class ExplainFailure(Exception):
    """An explainer other than the LLM one found nothing to say; `str()` is `kind: detail`."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class Explainer(Protocol):
    """Neuron exemplars -> a short phrase; raises LLMFailure or ExplainFailure."""

    name: str
    """Recorded in the `explainer` column."""
    prompt_version: str
    """Recorded in the `prompt_version` column."""

    def prepare(self, neuron: NeuronExemplars) -> Any:
        """The work that needs no answer (an LLM explainer's request, serialised and keyed),
        done ahead of sending by :func:`~builder.explain.stage.explain_all`."""
        ...

    async def explain(self, prepared: Any) -> str:
        """The phrase for what `prepare` returned."""
        ...
