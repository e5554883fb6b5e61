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

Tokenisation follows lm-eval's HFLM exactly (:func:`selfalign.generation.encoding.hflm_encode_pair`),
which is what makes the numbers equal HFLM's (tested to 1e-4). What is shared is always the context's own
tokens (its common token prefix with the head), so a head is only ever a speed hint.

The layout functions are pure; :class:`PackedScorer` runs them on an :class:`~selfalign.generation.hf.HFEngine`'s
model through the engine's public parts (model, tokenizer, prefix KV cache), and
:func:`loglikelihood_pairs` picks the way to score on any engine. Scoring lives here, not in the engine
module, so that a change to it re-runs the evaluation stages only, never the generating ones.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

from selfalign.generation.encoding import hflm_encode, hflm_encode_pair

if TYPE_CHECKING:
    from selfalign.generation.attention import SharedPrefix
    from selfalign.generation.hf import HFEngine

__all__ = ["PackedRow", "PackedScorer", "batch_rows", "can_score", "head_positions", "loglikelihood",
           "loglikelihood_pairs", "pack_rows", "plan", "row_cap", "split_by_reads", "split_context"]


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

    @property
    def read_positions(self) -> list[int]:
        """Distinct row positions whose logits are read, ascending (the last rest position serves every
        continuation of the row)."""
        return sorted({q for _, p, _ in self.reads for q in p})

    @property
    def n_reads(self) -> int:
        return len(self.read_positions)


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


# ------------------------------------------------------------------------------------ running the rows
_LOGIT_ELEMENTS = 1 << 26  # vocab x positions per LM-head call (a 256 MB float32 block)


def head_positions(vocab_size: int) -> int:
    """Read positions per forward so that its [positions, vocab] logits stay within ``_LOGIT_ELEMENTS``
    (1365 on SmolLM2's 49k vocabulary, 256 on Gemma 3's 262k)."""
    return max(1, _LOGIT_ELEMENTS // max(1, int(vocab_size)))


def split_by_reads(rows: Sequence[PackedRow], max_reads: int) -> Iterator[list[PackedRow]]:
    """Consecutive groups of ``rows`` whose read positions add up to at most ``max_reads`` (a row with
    more gets a group of its own): each group is one forward with the LM head on its reads only."""
    group: list[PackedRow] = []
    count = 0
    for row in rows:
        n = row.n_reads
        if group and count + n > max_reads:
            yield group
            group, count = [], 0
        group.append(row)
        count += n
    if group:
        yield group


class PackedScorer:
    """(sum log-prob, is_greedy) of (context, continuation) pairs on an HF engine's model, equal to lm-eval
    HFLM's: the packed prefix-tree layout above, run with the engine's shared-prefix KV cache."""

    def __init__(self, engine: "HFEngine"):
        self.engine = engine

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) under HFLM's convention, with the engine's tokenizer."""
        return hflm_encode_pair(self.engine.tok, context, continuation)

    def plan(self, pairs: Sequence[tuple[str, str]], heads: Mapping[str, str] | None = None
             ) -> tuple[dict[tuple[int, ...], list[PackedRow]], list[int], int]:
        """The rows :func:`plan` lays out for these pairs on this engine (its context limit and token budget)."""
        eng = self.engine
        heads = heads if eng.shares_prefix else None  # no shared-prefix attention: every row runs its whole context
        return plan(pairs, heads or {}, self.encode_pair, lambda h: hflm_encode(eng.tok, h), eng.max_context,
                    row_cap=row_cap(eng.gen.score_token_budget))

    def loglikelihood(self, context: str, continuations: Sequence[str]) -> list[tuple[float, bool]]:
        """(sum log-prob, is_greedy) per continuation of one context; the context runs once."""
        return self.loglikelihood_pairs([(context, c) for c in continuations])

    def loglikelihood_pairs(self, pairs: Sequence[tuple[str, str]], heads: Mapping[str, str] | None = None,
                            progress: bool = False) -> list[tuple[float, bool]]:
        """(sum log-prob, is_greedy) of each (context, continuation), equal to lm-eval HFLM's.

        ``heads`` maps a context to a prefix of it that many contexts share (a few-shot primer, the
        self-align preamble): its KV is computed once and read by all of them.
        """
        import torch
        from tqdm import tqdm

        with torch.inference_mode():
            rows_by_cache, index, n = self.plan(pairs, heads)
            out: list[tuple[float, bool]] = [(0.0, True)] * n
            total = sum(len(r) for rows in rows_by_cache.values() for r in rows)
            with tqdm(total=total, unit="tok", desc="loglikelihood", disable=not progress) as bar:
                for cache, rows in rows_by_cache.items():
                    shared = self.engine.prefix_cache(cache)
                    for batch in batch_rows(rows, self.engine.gen.score_token_budget):
                        for i, res in self.score_rows(batch, len(cache), shared):
                            out[i] = res
                        bar.update(sum(len(r) for r in batch))
        return [out[i] for i in index]

    def score_rows(self, rows: list[PackedRow], plen: int, shared: "SharedPrefix | None"
                   ) -> Iterator[tuple[int, tuple[float, bool]]]:
        """Run packed rows (right-padded) after ``plen`` cached tokens; read each continuation's log-prob and
        greediness as (result index, (log-prob, is_greedy)).

        Through the model's own ``forward`` with a boolean ``logits_to_keep`` (its output head and its
        final scaling / soft-capping rules apply, whatever the family), in groups of rows whose read
        positions fit :func:`head_positions`, so a 262k vocabulary never yields huge logit blocks."""
        for group in split_by_reads(rows, head_positions(self.engine.model.config.vocab_size)):
            yield from self._score_group(group, plen, shared)

    def _score_group(self, rows: list[PackedRow], plen: int, shared: "SharedPrefix | None"
                     ) -> Iterator[tuple[int, tuple[float, bool]]]:
        import torch

        from selfalign.generation.attention import packed_masks

        eng = self.engine
        dev = eng.device
        n, width = len(rows), max(len(r) for r in rows)
        ids = torch.full((n, width), eng.pad_id, dtype=torch.long, device=dev)
        seg = torch.full((n, width), -1, dtype=torch.long, device=dev)
        pos = torch.full((n, width), plen, dtype=torch.long, device=dev)
        keep = torch.zeros((n, width), dtype=torch.bool, device=dev)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r.ids, device=dev)
            seg[i, : len(r)] = torch.tensor(r.seg, device=dev)
            pos[i, : len(r)] = plen + torch.tensor(r.pos, device=dev)
            keep[i, r.read_positions] = True
        kwargs = {"shared_prefix": shared} if shared is not None else {}
        mask = packed_masks(eng.model.config, seg, pos, next(eng.model.parameters()).dtype)
        logits = eng.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep,
                           use_cache=False, **kwargs).logits.float()  # [kept positions, vocab], row-major
        at = (keep.flatten().cumsum(0) - 1).view(n, width)  # (row, position) -> its logits row
        reads = [(i, read) for i, r in enumerate(rows) for read in r.reads]
        row_idx = torch.tensor([i for i, (_, p, _) in reads for _ in p], device=dev)
        pos_idx = torch.tensor([q for _, (_, p, _) in reads for q in p], device=dev)
        idx = at[row_idx, pos_idx]
        target = torch.tensor([t for _, (_, _, c) in reads for t in c], device=dev)
        lse = logits.logsumexp(-1)
        logp_all = (logits[idx, target] - lse[idx]).tolist()
        greedy_all = (logits.argmax(-1)[idx] == target).tolist()
        at_read = 0
        for _, (res, p, _) in reads:
            yield res, (float(sum(logp_all[at_read:at_read + len(p)])), all(greedy_all[at_read:at_read + len(p)]))
            at_read += len(p)


# ------------------------------------------------------------------------------------ any engine
def can_score(engine: object) -> bool:
    """Whether :func:`loglikelihood_pairs` can score on ``engine`` (the HF engine, or one with ``loglikelihood``)."""
    from selfalign.generation.hf import HFEngine

    return isinstance(engine, HFEngine) or hasattr(engine, "loglikelihood")


def loglikelihood_pairs(engine: object, pairs: Sequence[tuple[str, str]], heads: Mapping[str, str] | None = None,
                        progress: bool = False) -> list[tuple[float, bool]]:
    """(log-prob, is_greedy) of each (context, continuation) pair on any scoring engine.

    The HF engine scores all pairs at once (:class:`PackedScorer`: shared heads encoded once,
    continuations packed per context); engines with only ``loglikelihood(context, continuations)`` (vLLM)
    get one call per distinct context, which is already how they batch best. ``heads`` is a speed hint only.
    """
    from selfalign.generation.hf import HFEngine

    if isinstance(engine, HFEngine):
        return PackedScorer(engine).loglikelihood_pairs(pairs, heads=heads, progress=progress)
    if not hasattr(engine, "loglikelihood"):
        raise TypeError(f"engine {getattr(engine, 'name', engine)!r} cannot score log-likelihoods; use the hf engine")
    by_context: dict[str, list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        by_context.setdefault(context, []).append(i)
    out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
    for context, idxs in by_context.items():
        conts = [pairs[i][1] for i in idxs]
        for i, res in zip(idxs, engine.loglikelihood(context, conts)):  # type: ignore[attr-defined]
            out[i] = res
    return out


def loglikelihood(engine: object, context: str, continuations: Sequence[str]) -> list[tuple[float, bool]]:
    """(sum log-prob, is_greedy) per continuation of one context, on any scoring engine."""
    return loglikelihood_pairs(engine, [(context, c) for c in continuations])
