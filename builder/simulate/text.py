"""Text simulators: explanation + description tokens -> one 0-10 value per token.

- `llm` (after Bills et al. 2023, without logprobs): the LLM gets the explanation and the
  numbered tokens and answers `{"activations": [...]}` with exactly one value per token.
- `offline`: a token-match baseline: a token whose text is one of the explanation's
  content words (or shares a whole prefix with one) gets 10, every other token 0.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

import numpy as np

from builder.simulate.llm import Ask, Message
from builder.simulate.parsing import parse_token_values
from builder.simulate.words import content_words, matches, token_text

TEXT_PROMPT_VERSION = "text-sim/1"
"""Bumped whenever the text simulator's prompt changes (part of the cache key and the data)."""

TEXT_SYSTEM = (
    "You simulate one neuron of a vision-language model. You are given an explanation of what "
    "the neuron activates for and a text split into numbered tokens. Predict the neuron's "
    "activation on every token, from 0 (none) to 10 (its strongest). Most tokens are 0; only "
    "tokens that fit the explanation are high."
)


def text_prompt(explanation: str, tokens: list[str]) -> list[Message]:
    """The chat messages asking for one activation per token."""
    numbered = "\n".join(f"{i + 1}\t{tok!r}" for i, tok in enumerate(tokens))
    user = (
        f"Explanation: this neuron activates for {explanation.strip()}\n\n"
        f"Tokens ({len(tokens)}, number<TAB>token):\n{numbered}\n\n"
        f'Answer with JSON only: {{"activations": [v1, ..., v{len(tokens)}]}}, exactly {len(tokens)} '
        "integers from 0 to 10, one per token, in order."
    )
    return [{"role": "system", "content": TEXT_SYSTEM}, {"role": "user", "content": user}]


def text_max_tokens(n_tokens: int) -> int:
    """Answer budget: about four tokens per value (`10, `) plus the JSON around them."""
    return 32 + 4 * n_tokens


class LLMTextSimulator:
    """The LLM predicts each token's activation (one call per sample, cached by the call layer)."""

    name: ClassVar[str] = "llm"

    def __init__(self, ask: Ask):
        self.ask = ask

    async def simulate(self, explanation: str, samples: list[list[str]]) -> list[np.ndarray]:
        async def one(tokens: list[str]) -> np.ndarray:
            if not tokens:
                return np.zeros(0, dtype=np.float32)
            answer = await self.ask(text_prompt(explanation, tokens), text_max_tokens(len(tokens)))
            return parse_token_values(answer, len(tokens))

        # All samples at once: the call layer bounds the requests in flight.
        return list(await asyncio.gather(*(one(t) for t in samples)))


class TokenMatchSimulator:
    """Baseline: 10 on tokens matching the explanation's content words, 0 elsewhere."""

    name: ClassVar[str] = "offline"

    async def simulate(self, explanation: str, samples: list[list[str]]) -> list[np.ndarray]:
        words = content_words(explanation)
        return [
            np.array([10.0 if matches(token_text(t), words) else 0.0 for t in tokens], dtype=np.float32)
            for tokens in samples
        ]
