"""Word error rate, the accuracy measure of speech recognition.

Used by tests and benchmarks to compare engines and code paths on the same audio; the
normalisation makes pocketsphinx output (``and(2)``, ``s.``) and reference transcripts
(``<s> ... </s>``, punctuation, case) comparable.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

# Apostrophes stay (``don't`` is one word); every other punctuation mark separates words.
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation if c != "'"})


def _strip_alternate(token: str) -> str:
    """``and(2)`` -> ``and``: pocketsphinx marks alternate pronunciations this way."""
    if token.endswith(")"):
        open_at = token.rfind("(")
        if open_at > 0 and token[open_at + 1 : -1].isdigit():
            return token[:open_at]
    return token


def normalize(text: str) -> list[str]:
    """Lower-case words without punctuation, alternates or markup (``<s>``, ``[noise]``)."""
    words: list[str] = []
    for token in text.lower().split():
        if (token[0] == "<" and token[-1] == ">") or (token[0] == "[" and token[-1] == "]"):
            continue
        for word in _strip_alternate(token).translate(_PUNCT_TO_SPACE).split():
            word = word.strip("'")
            if word:
                words.append(word)
    return words


def word_errors(ref_words: Sequence[str], hyp_words: Sequence[str]) -> int:
    """Minimum number of substitutions, deletions and insertions (word Levenshtein)."""
    if not ref_words:
        return len(hyp_words)
    previous = list(range(len(hyp_words) + 1))
    for i, ref in enumerate(ref_words, 1):
        current = [i]
        for j, hyp in enumerate(hyp_words, 1):
            current.append(
                min(
                    previous[j] + 1,  # deletion
                    current[j - 1] + 1,  # insertion
                    previous[j - 1] + (ref != hyp),  # substitution or match
                )
            )
        previous = current
    return previous[-1]


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus WER: all errors over all reference words (not a mean of per-sentence WERs).

    Pairs are normalised with :func:`normalize`. With no reference words at all the WER is
    0.0 when there are no hypothesis words either, and infinite otherwise.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    errors = 0
    ref_total = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        ref_words = normalize(ref)
        errors += word_errors(ref_words, normalize(hyp))
        ref_total += len(ref_words)
    if ref_total == 0:
        return 0.0 if errors == 0 else float("inf")
    return errors / ref_total
