"""Log-likelihood scoring with packed prefix trees: each context runs once, all its continuations with it.

Multiple-choice evaluation asks for ``log p(continuation | context)`` for several continuations of the
same context, and many contexts share a long head (a few-shot primer, the self-align preamble).
lm-eval's ``HFLM`` runs every (context, continuation) pair as its own sequence, so the primer and the
question are recomputed once per choice. Here the work is laid out as a three-level tree:

1. the **shared head** (e.g. the primer) is encoded once into a KV cache and read by every row through
   the engine's shared-prefix attention;
2. each **row** holds one context's remaining tokens (the question) once, followed by its
   continuations packed side by side;
3. a 4-D attention mask lets each continuation see the head, the question and itself, never a
   sibling, and position ids restart after the question for every continuation, so each continuation
   is computed exactly as if it were alone.

Rows are length-sorted and batched under a token budget (little padding), and the LM head runs only on
the positions that predict a continuation token (it is ~20% of a small model's FLOPs, and
``log_softmax`` over a 49k vocabulary at every position is not free either).

Tokenisation follows lm-eval's HFLM exactly (:func:`selfalign.generation.hf.hflm_encode_pair`), which
is what makes the numbers equal HFLM's (tested to 1e-4). What is shared is always the context's own
tokens (its common token prefix with the head), so a head is only ever a speed hint.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

__all__ = ["PackedRow", "batch_rows", "pack_rows", "row_cap", "split_context"]


def row_cap(token_budget: int) -> int:
    """Tokens after which a context's continuations start a new row: bounds each row's T x T mask."""
    return max(64, token_budget // 8)

# A continuation's tokens are predicted from the position before each of them, so its last token is
# never fed to the model: a row holds the context rest, then ``cont[:-1]`` for each continuation.


@dataclass
class PackedRow:
    """One model row: ``rest`` tokens, then each continuation's inputs, plus what to read out."""

    cache: tuple[int, ...]  # head tokens whose KV is shared (may be empty)
    ids: list[int] = field(default_factory=list)
    seg: list[int] = field(default_factory=list)  # 0 = context rest, k >= 1 = k-th continuation here
    pos: list[int] = field(default_factory=list)  # position ids relative to len(cache)
    # (result index, row positions that predict the continuation's tokens, the continuation's token ids)
    reads: list[tuple[int, list[int], list[int]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def split_context(ctx_ids: Sequence[int], head_ids: Sequence[int] | None) -> tuple[tuple[int, ...], list[int]]:
    """(shared cache ids, rest ids) of one context: the cache is the context's common token prefix with the head.

    The head is a string cut (e.g. at a paragraph break), and BPE may tokenise the cut differently on
    its own (SmolLM2 encodes a trailing ``"\n\n"`` as one token, but ``"\n\nQ"`` as two ``"\n"`` tokens
    and ``"Q"``). Taking the longest common token prefix keeps the cache made of the context's own
    tokens, so scores are exact whatever the head, and every context after the same head gets the same
    cache. The rest keeps at least one token: the first continuation token is predicted from the last
    context token, which must therefore be in the row.
    """
    n = 0
    if head_ids:
        limit = min(len(head_ids), len(ctx_ids) - 1)
        while n < limit and ctx_ids[n] == head_ids[n]:
            n += 1
    return tuple(ctx_ids[:n]), list(ctx_ids[n:])


def pack_rows(cache: tuple[int, ...], rest: list[int], conts: Sequence[tuple[int, list[int]]],
              row_cap: int) -> list[PackedRow]:
    """Pack one context's continuations behind its rest, starting a new row when ``row_cap`` is reached.

    ``conts`` are (result index, continuation ids), each non-empty. A continuation never shares a row
    with another context, and a continuation longer than ``row_cap`` still gets a row of its own.
    """
    rows: list[PackedRow] = []
    row: PackedRow | None = None
    for idx, cont in conts:
        inputs = cont[:-1]
        if row is None or (len(row) + len(inputs) > row_cap and len(row.reads) > 0):
            row = PackedRow(cache=cache, ids=list(rest), seg=[0] * len(rest), pos=list(range(len(rest))))
            rows.append(row)
        k = len(row.reads) + 1
        start = len(row)
        row.ids += inputs
        row.seg += [k] * len(inputs)
        row.pos += [len(rest) + j for j in range(len(inputs))]
        # token j of the continuation is predicted at the last rest position (j = 0) or at its own input j-1
        row.reads.append((idx, [len(rest) - 1] + [start + j for j in range(len(inputs))], list(cont)))
    return rows


def batch_rows(rows: Sequence[PackedRow], token_budget: int, min_fill: float = 0.75) -> Iterator[list[PackedRow]]:
    """Rows of one cache group, longest first, in batches within ``token_budget`` padded tokens.

    A row joins the current batch only if it is at least ``min_fill`` of the batch's width (its first,
    longest row): padding costs the same as real tokens, and more so in attention, which is quadratic.
    """
    batch: list[PackedRow] = []
    for row in sorted(rows, key=len, reverse=True):
        if batch and ((len(batch) + 1) * len(batch[0]) > token_budget or len(row) < min_fill * len(batch[0])):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def plan(pairs: Sequence[tuple[str, str]], heads: Mapping[str, str], encode_pair: Callable[[str, str], tuple],
         encode_head: Callable[[str], list[int]], max_context: int, row_cap: int
         ) -> tuple[dict[tuple[int, ...], list[PackedRow]], list[int], int]:
    """Rows per shared cache for the distinct pairs; returns (rows by cache, pair -> distinct index, n distinct).

    Identical (context, continuation) pairs are scored once (TruthfulQA MC1 and MC2 share questions and
    many answers; an HHH dialogue recurs with the same good answer in several items).
    """
    from selfalign.io import UserError

    distinct: dict[tuple[str, str], int] = {}
    index = [distinct.setdefault((c, x), len(distinct)) for c, x in pairs]
    # grouped by (context, its token ids): HFLM's empty-context convention can move a leading
    # continuation token into the context, so one context string may carry different ids
    by_context: dict[tuple[str, tuple[int, ...]], list[tuple[int, list[int]]]] = defaultdict(list)
    for (context, cont), i in distinct.items():
        ctx, cont_ids = encode_pair(context, cont)
        if len(ctx) + len(cont_ids) > max_context + 1:
            raise UserError(f"score: context + continuation ({len(ctx) + len(cont_ids)} tokens) exceed "
                            f"max_context {max_context}")
        by_context[(context, tuple(ctx))].append((i, list(cont_ids)))
    head_ids: dict[str, list[int]] = {}
    rows: dict[tuple[int, ...], list[PackedRow]] = defaultdict(list)
    for (context, ctx), conts in by_context.items():
        head = heads.get(context, "")
        if head and head not in head_ids:
            head_ids[head] = encode_head(head)
        cache, rest = split_context(ctx, head_ids.get(head))
        scored = [(i, c) for i, c in conts if c]  # an empty continuation scores (0.0, greedy)
        if scored:
            rows[cache].extend(pack_rows(cache, rest, scored, row_cap))
    return dict(rows), index, len(distinct)
