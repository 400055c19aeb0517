"""The content words of an explanation and the normalised text of a token.

Shared by the offline simulators: both look for the explanation's words, not its
boilerplate ("words related to ...", "the presence of ...").
"""

from __future__ import annotations

import re

STOPWORDS = frozenset(
    """
    a an the and or nor but of to in on at by for from with without into onto over under as is are was were be
    been being this that these those it its their there here which who whom whose what when where how not no
    any some such other others various e g eg etc ie i.e like including include includes especially mostly
    often typically usually very also more most less few many much all each every
    neuron neurons activates activate activation fires fire firing responds respond
    word words token tokens term terms phrase phrases text mention mentions mentioned mentioning
    related relating relates associated involving presence present element elements concept concepts
    thing things kind kinds type types form forms part parts
    """.split()
)
"""Function words and explanation boilerplate that carry no concept."""

_WORD = re.compile(r"[a-z0-9]+")


def content_words(explanation: str) -> list[str]:
    """The explanation's lower-cased alphanumeric words minus stopwords, in order, unique."""
    out: list[str] = []
    for w in _WORD.findall(explanation.lower()):
        if w not in STOPWORDS and w not in out:
            out.append(w)
    return out


def token_text(token: str) -> str:
    """A token's text lower-cased with word-boundary markers (Ġ, ▁) and punctuation removed."""
    return "".join(_WORD.findall(token.replace("Ġ", " ").replace("▁", " ").lower()))


def matches(token: str, words: list[str], min_prefix: int = 3) -> bool:
    """Whether a normalised token is one of `words` or shares a whole-prefix with one
    (`train`/`trains`, a word's first sub-word piece), both at least `min_prefix` long."""
    if not token:
        return False
    for w in words:
        if token == w:
            return True
        if len(token) >= min_prefix and len(w) >= min_prefix and (w.startswith(token) or token.startswith(w)):
            return True
    return False
