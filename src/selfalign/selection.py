"""Step 1's selection over parsed candidates: novelty, topic-pool balance, and the final merge.

Pure functions over records; every drop becomes a :class:`~selfalign.schemas.Reject` with its reason
(appended to the caller's list, or returned), which the stage writes and counts.

* :func:`filter_novel`: the paper's self-instruct filter -- the named predicates, then ROUGE-L F to every
  human seed and every earlier kept candidate at most a threshold (:class:`~selfalign.dedup.RougeLIndex`).
* :func:`balance_pools` / :func:`balance_topics`: case-insensitive de-dup of each type's topic pool and
  truncation to the smallest pool, so no adversarial type dominates.
* :func:`merge_prompts`: exact normalised de-dup across sources and the contamination guard (no prompt
  may match an evaluation question or probe), then a seeded shuffle.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from selfalign.dedup import RougeLIndex
from selfalign.filters import apply_filters
from selfalign.schemas import Prompt, Reject, Topic

__all__ = ["PROBE_KEY", "balance_pools", "balance_topics", "filter_novel", "merge_prompts", "normalise"]

STAGE = "red_team"  # the stage every reject written here belongs to
# the contamination guard's key for a principle probe ("probe:<id>"), counted apart from benchmark questions
PROBE_KEY = "probe:"


# ------------------------------------------------------------------------------------- candidates
def filter_novel(candidates: list[Prompt], predicates: list, references: list[tuple[str, str]],
                 threshold: float, rejects: list[Reject]) -> list[Prompt]:
    """Candidates passing ``predicates`` whose ROUGE-L F to every reference (the human seeds) and to
    every earlier kept candidate is at most ``threshold``; the others become counted rejects."""
    freq = RougeLIndex.document_frequencies([text for _, text in references] + [c.text for c in candidates])
    index = RougeLIndex(threshold, freq)
    for rid, text in references:
        index.add(rid, text)
    kept = []
    for cand in candidates:
        reason = apply_filters(cand, predicates)
        if reason is None and index.add_if_novel(cand.id, cand.text) is not None:
            reason = "near_duplicate"
        if reason is not None:
            rejects.append(Reject(id=cand.id, stage=STAGE, reason=reason, text=cand.text))
        else:
            kept.append(cand)
    return kept


# ----------------------------------------------------------------------------------------- topics
def balance_pools(pools: dict[str, list[str]], cap: int | None, balance: bool = True) -> dict[str, list[str]]:
    """Case-insensitive de-dup per type (first spelling wins), then truncate every type to the
    smallest type's count if ``balance`` (the paper) and to ``cap``, so no type dominates the set."""
    deduped: dict[str, list[str]] = {}
    for name, topics in pools.items():
        seen: set[str] = set()
        deduped[name] = [t for t in topics if not (t.lower() in seen or seen.add(t.lower()))]
    size = min(len(t) for t in deduped.values()) if balance else max(len(t) for t in deduped.values())
    if cap is not None:
        size = min(size, cap)
    return {name: topics[:size] for name, topics in deduped.items()}


def balance_topics(topics: dict[str, list[Topic]], cap: int | None, balance: bool,
                   rejects: list[Reject]) -> tuple[dict[str, list[Topic]], int]:
    """Apply :func:`balance_pools` to Topic records; drops are rejects (duplicate or balance)."""
    pools = balance_pools({n: [t.topic for t in pool] for n, pool in topics.items()}, cap, balance)
    out, dropped = {}, 0
    for name, pool in topics.items():
        keep = set(pools[name])
        first: dict[str, Topic] = {}
        for t in pool:
            if t.topic.lower() in first or t.topic not in keep:
                reason = "topic_duplicate" if t.topic.lower() in first else "topic_balance"
                rejects.append(Reject(id=t.id, stage=STAGE, reason=reason, text=t.topic))
                dropped += 1
                continue
            first[t.topic.lower()] = t
        out[name] = list(first.values())
    return out, dropped


# ------------------------------------------------------------------------------------------ merge
def normalise(text: str) -> str:
    """Lower-case, every non-alphanumeric run to one space (the paper's exact-dedup key)."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _contamination_key(text: str, bench_norm: dict[str, str], index: RougeLIndex) -> str | None:
    """The id of the evaluation item ``text`` equals (normalised) or near-duplicates, else None."""
    if normalise(text) in bench_norm:
        return bench_norm[normalise(text)]
    hit = index.find_duplicate(text)
    return hit[0] if hit is not None else None


def merge_prompts(sources: Sequence[Sequence[Prompt]], bench: dict[str, str], threshold: float,
                  seed: int) -> tuple[list[Prompt], list[Reject]]:
    """Concatenate sources, drop exact normalised duplicates (first wins) and prompts whose
    instruction or input matches a benchmark question (normalised equality or ROUGE-L F above
    ``threshold``), then shuffle with ``seed``."""
    bench_norm = {normalise(q): qid for qid, q in bench.items()}
    prompts = [p for src in sources for p in src]
    freq = RougeLIndex.document_frequencies(list(bench.values()) + [p.text for p in prompts])
    index = RougeLIndex(threshold, freq)
    for qid, q in bench.items():
        index.add(qid, q)
    kept, rejects, seen = [], [], set()
    for p in prompts:
        key = normalise(f"{p.text} {p.input}")
        if key in seen:
            rejects.append(Reject(id=p.id, stage=STAGE, reason="exact_duplicate", text=p.text))
            continue
        seen.add(key)
        fields = [p.text] + ([p.input] if p.input else [])
        hit = next((qid for f in fields if (qid := _contamination_key(f, bench_norm, index)) is not None), None)
        if hit is not None:
            # evaluation probes are keyed "probe:<id>": counted apart from the benchmark questions
            reason = "contamination_probe" if hit.startswith(PROBE_KEY) else "contamination"
            rejects.append(Reject(id=p.id, stage=STAGE, reason=reason, text=p.text))
            continue
        kept.append(p)
    random.Random(f"{seed}-merge").shuffle(kept)
    return kept, rejects
