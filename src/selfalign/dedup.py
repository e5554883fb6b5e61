"""ROUGE-L near-duplicate index: same decisions as brute-force ``rouge_score``, without the O(n^2).

Self-instruct rejects a new instruction when its ROUGE-L F-measure (rouge_score, no stemming) to any
seed or already-kept instruction is *above* a threshold. Brute force scores every pair, which at the
paper's scale (hundreds of thousands of instructions) is days of CPU. This index skips pairs that
provably cannot exceed the threshold and scores the rest exactly:

* **Bound.** LCS(x, y) <= |x ∩ y| (multiset overlap) <= min(|x|, |y|), and F = 2·LCS / (|x| + |y|),
  so F > t needs an overlap > t·(|x| + |y|) / 2 and a length ratio inside [t/(2-t), (2-t)/t].
* **Prefix filter** (Chaudhuri et al., 2006). Turn a token list into a *set* of (token, occurrence)
  elements, sorted by one fixed global order (rarest first). If two sets share >= a elements, their
  prefixes of length |x| - a + 1 and |y| - a + 1 share one. With a = the smallest overlap any
  partner could need (t·|x| / (2-t), rounded down conservatively) only prefix elements are indexed
  and probed, and prefixes consist of rare tokens, so posting lists stay short.
* **Exact score** for the survivors: the LCS length by a bit-parallel algorithm (Hyyrö 2004; an
  integer, so exact) fed into rouge_score's own ``scoring.fmeasure`` on rouge_score's own tokens,
  hence the very float brute force compares with the threshold.

The filters only ever *skip* pairs whose F cannot exceed the threshold (bounds rounded toward
keeping a pair), so accept/reject decisions equal :func:`brute_force_keep` exactly; tests and
``selfalign bench dedup`` check this.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from rouge_score import scoring, tokenizers

__all__ = ["RougeLIndex", "brute_force_keep", "lcs_length", "rouge_l_f", "rouge_tokens"]

# float slack on the bounds: always in the direction that keeps a pair for exact scoring
_EPS = 1e-9

_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=False)


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's tokenisation (lower-case, alphanumeric runs, no stemming)."""
    return _TOKENIZER.tokenize(text)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel, O(|a|·|b|/w)).

    Each token of ``a`` gets a bit mask of its positions; one pass over ``b`` updates a bit vector
    whose zero bits count the LCS (Hyyrö's formulation of Allison-Dix). Python's big ints make the
    word size unbounded, so an instruction of any length is one integer.
    """
    if not a or not b:
        return 0
    return _lcs_with_masks(_masks(a), len(a), b)


def _lcs_with_masks(masks: Mapping[str, int], m: int, b: Sequence[str]) -> int:
    full = (1 << m) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


def _f_from_lcs(lcs: int, m: int, n: int) -> float:
    """rouge_score's ROUGE-L F for prediction length m, target length n (same float ops)."""
    if m == 0 or n == 0:
        return 0.0
    precision = lcs / m
    recall = lcs / n
    return scoring.fmeasure(precision, recall)


def rouge_l_f(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts, equal to ``RougeScorer(['rougeL']).score(b, a).fmeasure``."""
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    return _f_from_lcs(lcs_length(ta, tb), len(ta), len(tb))


@dataclass
class _Entry:
    key: str
    tokens: list[str]


class RougeLIndex:
    """Indexed texts answering "does this text have ROUGE-L F > threshold to any of them?".

    ``doc_freq`` fixes the global token order (rare first); any fixed order is *correct*, a good
    one is *fast*: pass document frequencies over the texts you are about to index and query.
    Tokens missing from it count as frequency 0 (rarest), which is the right guess for new words.
    """

    def __init__(self, threshold: float, doc_freq: Mapping[str, int] | None = None):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold
        self._freq: Mapping[str, int] = doc_freq or {}
        self._entries: list[_Entry] = []
        self._postings: dict[tuple[str, int], list[int]] = {}
        # pairs scored exactly (for benchmarks: how much the filters saved)
        self.exact_comparisons = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def document_frequencies(texts: Iterable[str]) -> Counter:
        """Number of texts containing each token (the cheap global order for the prefix filter)."""
        freq: Counter = Counter()
        for text in texts:
            freq.update(set(rouge_tokens(text)))
        return freq

    # -- bounds ---------------------------------------------------------------------------------
    def _min_overlap(self, m: int) -> int:
        """Smallest overlap any partner of a length-m text needs for F > t (rounded down, >= 1)."""
        t = self.threshold
        return max(1, math.ceil(t * m / (2.0 - t) - _EPS))

    def _prefix(self, tokens: Sequence[str]) -> list[tuple[str, int]]:
        seen: Counter = Counter()
        elements = []
        for tok in tokens:
            elements.append((tok, seen[tok]))
            seen[tok] += 1
        elements.sort(key=lambda e: (self._freq.get(e[0], 0), e[0], e[1]))
        m = len(elements)
        return elements[: max(0, m - self._min_overlap(m) + 1)] if m else []

    def _lengths_compatible(self, m: int, n: int) -> bool:
        """2·min(m, n)/(m + n) > t is necessary for F > t (checked with slack toward True)."""
        return 2.0 * min(m, n) >= self.threshold * (m + n) - _EPS

    # -- queries --------------------------------------------------------------------------------
    def find_duplicate(self, text: str) -> tuple[str, float] | None:
        """(key, F) of the first indexed text with ROUGE-L F > threshold, or None."""
        tokens = rouge_tokens(text)
        return self._find(tokens)

    def _find(self, tokens: list[str]) -> tuple[str, float] | None:
        m = len(tokens)
        if m == 0:
            return None
        masks: dict[str, int] | None = None
        checked: set[int] = set()
        for element in self._prefix(tokens):
            for idx in self._postings.get(element, ()):
                if idx in checked:
                    continue
                checked.add(idx)
                entry = self._entries[idx]
                n = len(entry.tokens)
                if not self._lengths_compatible(m, n):
                    continue
                if masks is None:
                    masks = _masks(tokens)
                self.exact_comparisons += 1
                # prediction = the new text, target = the indexed one (F is symmetric anyway)
                f = _f_from_lcs(_lcs_with_masks(masks, m, entry.tokens), m, n)
                if f > self.threshold:
                    return entry.key, f
        return None

    def add(self, key: str, text: str) -> None:
        """Index a text unconditionally (seeds, benchmark questions)."""
        self._add(key, rouge_tokens(text))

    def _add(self, key: str, tokens: list[str]) -> None:
        idx = len(self._entries)
        self._entries.append(_Entry(key, tokens))
        for element in self._prefix(tokens):
            self._postings.setdefault(element, []).append(idx)

    def add_if_novel(self, key: str, text: str) -> tuple[str, float] | None:
        """Index ``text`` unless it near-duplicates an indexed text; returns that match (or None)."""
        tokens = rouge_tokens(text)
        match = self._find(tokens)
        if match is None:
            self._add(key, tokens)
        return match


def _masks(tokens: Sequence[str]) -> dict[str, int]:
    masks: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    return masks


def brute_force_keep(candidates: Sequence[str], reference: Sequence[str], threshold: float) -> list[bool]:
    """The definition, with rouge_score itself: keep a candidate iff its ROUGE-L F to every
    reference text and every earlier *kept* candidate is <= threshold. O(n^2); for tests/benchmarks."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept_texts = list(reference)
    decisions = []
    for text in candidates:
        dup = any(scorer.score(ref, text)["rougeL"].fmeasure > threshold for ref in kept_texts)
        decisions.append(not dup)
        if not dup:
            kept_texts.append(text)
    return decisions
