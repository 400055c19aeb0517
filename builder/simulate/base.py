"""The simulator interfaces and their typed failures.

A simulator reads an explanation and predicts a neuron's activations on samples it is
shown, on the 0-10 scale: a visual simulator predicts the H x W patch map of each image,
a text simulator one value per description token. One call covers all of a neuron's
scoring samples for one explanation, so per-explanation work (grounding phrases, an
embedding) is done once.

A simulator that cannot produce a prediction raises :class:`SimulationFailure` with a
:class:`FailureKind`; the stage records it per neuron and never turns it into numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, Protocol

import numpy as np
from PIL import Image


class FailureKind(str, Enum):
    """Why a simulation produced no prediction."""

    UNPARSABLE = "unparsable"
    """The LLM's answer is not the JSON asked for (or holds non-numbers)."""
    WRONG_LENGTH = "wrong_length"
    """The answer has a different number of values than tokens or grid cells."""
    LLM = "llm"
    """The call layer gave up (refusal, empty answer, content filter, retries, budget);
    the message starts with its own failure kind."""
    MODEL = "model"
    """A local simulator model (detector, segmenter) failed on the input."""


class SimulationFailure(Exception):
    """A typed simulator failure; `str()` is `kind: message`."""

    def __init__(self, kind: FailureKind, message: str):
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class VisualSample:
    """What a visual simulator is shown of one sample."""

    sample_id: str
    view: Image.Image
    """The image as the VLM's patch grid covers it (cropped or padded to the grid's box, RGB)."""
    image: Image.Image
    """The original image (for simulators that run the VLM's own processor on it)."""


class VisualSimulator(Protocol):
    """Explanation + images -> predicted patch maps (H x W, 0-10)."""

    name: ClassVar[str]
    """Recorded in the `simulator` column (`grounded`, `llm`, `offline`)."""

    async def simulate(self, explanation: str, samples: list[VisualSample], grid: tuple[int, int]) -> list[np.ndarray]:
        """One float array [H, W] in [0, 10] per sample, in order."""
        ...


class TextSimulator(Protocol):
    """Explanation + description tokens -> one predicted value per token (0-10)."""

    name: ClassVar[str]
    """Recorded in the `simulator` column (`llm`, `offline`)."""

    async def simulate(self, explanation: str, samples: list[list[str]]) -> list[np.ndarray]:
        """One float array [len(tokens)] in [0, 10] per sample, in order."""
        ...
