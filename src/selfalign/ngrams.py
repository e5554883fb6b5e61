"""Word n-grams: the one definition of "a reply loops" and of "an answer recites a text".

A leaf module (stdlib only): the step-2 and step-4 filters (:mod:`selfalign.filters`) and the do-no-harm
check (:mod:`selfalign.evaluation.harm`) count with the same code, so "the teacher's answer looped" and
"the student's reply loops" are the same statement.

Why word n-grams: a small model that has learnt a phrase repeats it ("I am a static model. I am a static
model. ..."), while ordinary prose repeats *pairs* of function words ("of the") in different company;
counting 3-word chunks tells the two apart, and numbers count as words, so a numbered list ("1. Mix the
flour 2. Mix the eggs") is not a loop.
"""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["loops", "max_ngram_count", "word_ngrams", "words"]

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` (runs of letters, digits and underscores; punctuation drops)."""
    return _WORD.findall(text.lower())


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The distinct runs of ``n`` consecutive words of ``text`` (case and punctuation ignored)."""
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def max_ngram_count(text: str, n: int) -> int:
    """How often the most frequent word n-gram of ``text`` occurs (overlapping occurrences count); 0 when
    the text has fewer than ``n`` words."""
    w = words(text)
    counts = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return max(counts.values(), default=0)


def loops(text: str, ngram_words: int, min_count: int) -> bool:
    """Does the text loop: some ``ngram_words``-word chunk occurs at least ``min_count`` times?"""
    return max_ngram_count(text, ngram_words) >= min_count
