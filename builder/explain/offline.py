"""The offline explainer: a deterministic statistical baseline that needs no LLM.

It sees exactly what the LLM explainer sees (the shown exemplars, never the held-out ones)
and is labelled `offline-baseline` in the data.

- text neurons: the tokens that carry the top activations. A token's weight is the sum,
  over the shown exemplars, of its highest activation in each (tokens compared stripped
  and lower-cased); the tokens with at least `offline_token_share` of the top weight are
  named, at most `offline_top_words`.
- visual neurons: the description words most over-represented among the shown samples
  against the rest of the corpus: the log-odds ratio with an informative Dirichlet prior
  (Monroe, Colaresi & Quinn 2008, "Fightin' Words"), prior pseudo-counts
  `offline_prior * corpus share`, as a z-score; words with z >= `offline_min_z` are named.
- multimodal neurons: both.

A neuron with no token above 1 (on 0-10) and no over-represented word fails `no_evidence`.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from builder.config import ExplainConfig
from builder.explain.records import ExplainFailure, NeuronExemplars

OFFLINE_NAME = "offline-baseline"
OFFLINE_VERSION = "offline-v1"

STOPWORDS = frozenset(
    "a an the and or of on in at to with by for from is are was were be been it its this that these those "
    "there here as into onto over under up down out off some any each which who whom what while near".split()
)
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
MIN_TOKEN_ACTIVATION = 1.0
"""Below this (on 0-10) a token is no evidence of anything."""


def words(text: str) -> list[str]:
    """Lower-cased words of a description, stopwords and one-letter words left out."""
    return [w for w in WORD.findall(text.lower()) if len(w) > 1 and w not in STOPWORDS]


class CorpusWords:
    """Word counts of every sample's description, for the log-odds."""

    def __init__(self, texts: dict[str, str]):
        self.per_sample = {sid: Counter(words(t)) for sid, t in texts.items()}
        self.total: Counter[str] = Counter()
        for c in self.per_sample.values():
            self.total.update(c)
        self.n_total = sum(self.total.values())

    def over_represented(self, sample_ids: list[str], prior: float, min_z: float, top: int) -> list[tuple[str, float]]:
        """(word, z) of the words over-represented in these samples' descriptions, best first."""
        group: Counter[str] = Counter()
        for sid in sample_ids:
            group.update(self.per_sample.get(sid, Counter()))
        n_i = sum(group.values())
        n_j = self.n_total - n_i
        if n_i == 0 or n_j <= 0:
            return []
        scored = []
        for w, y_i in group.items():
            y_j = self.total[w] - y_i
            a_w = prior * self.total[w] / self.n_total
            delta = math.log((y_i + a_w) / (n_i + prior - y_i - a_w)) - math.log((y_j + a_w) / (n_j + prior - y_j - a_w))
            z = delta / math.sqrt(1 / (y_i + a_w) + 1 / (y_j + a_w))
            if z >= min_z:
                scored.append((w, z))
        scored.sort(key=lambda t: (-t[1], t[0]))
        return scored[:top]


def top_tokens(neuron: NeuronExemplars, share: float, top: int) -> list[str]:
    """The tokens that carry the neuron's top activations over its shown exemplars."""
    weight: Counter[str] = Counter()
    for ex in neuron.exemplars:
        best: dict[str, float] = {}
        for tok, act in zip(ex.tokens, ex.activations):
            key = tok.strip().lower()
            if key and act >= MIN_TOKEN_ACTIVATION:
                best[key] = max(best.get(key, 0.0), float(act))
        weight.update(best)
    if not weight:
        return []
    ranked = sorted(weight.items(), key=lambda t: (-t[1], t[0]))
    cut = ranked[0][1] * share
    return [t for t, w in ranked if w >= cut][:top]


def _quoted(items: list[str]) -> str:
    q = [f'"{x}"' for x in items]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " and " + q[-1]


class OfflineExplainer:
    """The statistical baseline (see the module docstring)."""

    name = OFFLINE_NAME
    prompt_version = OFFLINE_VERSION

    def __init__(self, corpus: CorpusWords, cfg: ExplainConfig):
        self.corpus = corpus
        self.cfg = cfg

    def explain_now(self, neuron: NeuronExemplars) -> str:
        cfg = self.cfg
        phrases = []
        if neuron.category in ("visual", "multimodal"):
            found = self.corpus.over_represented(
                [e.sample_id for e in neuron.exemplars], cfg.offline_prior, cfg.offline_min_z, cfg.offline_top_words
            )
            if found:
                phrases.append(f"images of {_quoted([w for w, _ in found])}")
        if neuron.category in ("text", "multimodal"):
            tokens = top_tokens(neuron, cfg.offline_token_share, cfg.offline_top_words)
            if tokens:
                phrases.append(f"the word{'s' if len(tokens) > 1 else ''} {_quoted(tokens)}")
        if not phrases:
            raise ExplainFailure(
                "no_evidence",
                f"no over-represented description word (z >= {cfg.offline_min_z}) and no token activation >= "
                f"{MIN_TOKEN_ACTIVATION} among {len(neuron.exemplars)} shown exemplars",
            )
        return " and ".join(phrases)

    def prepare(self, neuron: NeuronExemplars) -> NeuronExemplars:
        return neuron

    async def explain(self, prepared: NeuronExemplars) -> str:
        return self.explain_now(prepared)
