"""Choosing the next token of each row: logit bias, n-gram penalties, then greedy or seeded nucleus sampling.

The reference rule (:func:`reference_nucleus`) sorts each row's whole probability vector, zeroes the
tail past ``top_p`` and draws ``torch.multinomial`` over the *sorted* vector with the row's generator.
For a 262k-token vocabulary the sort dominates a decode step. :func:`nucleus_sample` picks the same
tokens for the same generator states without it:

* ``torch.multinomial`` draws one exponential per element of its input (the CPU kernel: argmax of
  p / Exp(1)), so a shorter vector would consume the generator differently and change every later
  token of the row. The draw therefore runs over a vector *equal* to the reference's: the first ``k``
  sorted probabilities come from an exact ``torch.topk`` (the same float values in the same order),
  masked with the same cumulative-sum test, and every later position is zero. That holds when the
  kept mass of the top ``k`` exceeds ``top_p`` by :data:`MASS_MARGIN` (so no later position can be
  kept, whatever the rounding); otherwise the next, larger ``k`` of :data:`TOPK_TIERS` is tried, and
  past the last the row takes the reference's full sort.
* Only the token at the drawn position can differ: tokens of equal probability may sit in another
  order in ``topk``'s output than in ``sort``'s. When the drawn position's probability equals a
  neighbour's (or lies past the top k, which only a zero exponential can pick), the row's full sort names
  the token.

What remains per row is O(V): the softmax and the multinomial's own draw, which byte-identical output
needs. ``top_p >= 1`` keeps every token, so it is the reference rule (its position order is the sort's).
Rows draw in row order, as the reference does, so rows sharing one generator also match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

__all__ = ["LogitBias", "TOPK_TIERS", "MASS_MARGIN", "apply_bias_and_penalties", "choose", "nucleus_sample",
           "reference_nucleus"]

#: Prefilter sizes tried in turn. Why these: at the pipeline's settings (temperature <= 1, top_p <= 0.98)
#: a nucleus rarely holds more than a few hundred tokens, and ``torch.topk`` with k = 256 costs about a
#: twentieth of a full sort at 262k entries; 4096 catches the flat rows before the sort (whose cost is
#: then only paid by rows whose nucleus is a sizeable fraction of the vocabulary). Results never depend on
#: them, only speed.
TOPK_TIERS: tuple[int, ...] = (256, 4096)

#: How far the top-k mass must exceed ``top_p`` before the positions past ``k`` are known to be dropped.
#: The reference's test ``cumsum - p > top_p`` carries float32 rounding of a few 1e-7 (torch's CPU cumsum
#: accumulates in double); 1e-4 is far above that, and a row this close to the edge just tries a larger k.
MASS_MARGIN = 1e-4


@dataclass(frozen=True)
class LogitBias:
    """A sparse logit bias: the few biased token ids and their amounts (float32, as a dense bias vector holds them)."""

    ids: torch.Tensor  # long, unique
    values: torch.Tensor  # float32

    @classmethod
    def from_dict(cls, bias: Mapping[int, float], device: torch.device | str | None = None) -> "LogitBias | None":
        """None for an empty bias (nothing to add)."""
        if not bias:
            return None
        return cls(ids=torch.tensor(list(bias), dtype=torch.long, device=device),
                   values=torch.tensor(list(bias.values()), dtype=torch.float32, device=device))


def apply_bias_and_penalties(logits: torch.Tensor, bias: LogitBias | None,
                             penalties: Sequence[Mapping[int, float] | None]) -> torch.Tensor:
    """float32 logits + bias, minus each row's n-gram penalties, touching only the affected ids.

    The same float32 operations in the same order as adding a dense bias vector (``x + 0.0 == x``) and
    subtracting the penalties per row; the input tensor is never modified."""
    out = logits.float()
    rows: list[int] = []
    cols: list[int] = []
    amounts: list[float] = []
    for j, pen in enumerate(penalties):
        if pen:
            rows += [j] * len(pen)
            cols += list(pen)
            amounts += list(pen.values())
    if bias is None and not rows:
        return out
    out = out.clone() if out is logits else out
    if bias is not None:
        inside = bias.ids < out.shape[-1]  # a bias vector longer than the logits is cut to their width
        ids, values = bias.ids[inside], bias.values[inside]
        out[:, ids] += values
    if rows:
        dev = out.device
        r, c = torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)
        out[r, c] -= torch.tensor(amounts, dtype=torch.float32, device=dev)
    return out


def reference_nucleus(probs: torch.Tensor, top_p: float, generators: Sequence[torch.Generator | None]) -> list[int]:
    """The full-sort rule: sort, zero the tail past ``top_p``, multinomial over the sorted vector."""
    sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
    if top_p < 1.0:
        drop = (sorted_p.cumsum(-1) - sorted_p) > top_p  # keeps at least the top token
        sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = []
    for j, g in enumerate(generators):
        k = torch.multinomial(sorted_p[j].cpu(), 1, generator=g).item()
        out.append(int(sorted_i[j, k]))
    return out


class _Row:
    """One row's sorted-order probability vector (on CPU, for the draw) and how a position maps to a token."""

    def __init__(self, probs_row: torch.Tensor, vec: torch.Tensor, vals: torch.Tensor | None = None,
                 idx: torch.Tensor | None = None, sorted_i: torch.Tensor | None = None):
        self.probs_row, self.vec, self.vals, self.idx, self.sorted_i = probs_row, vec, vals, idx, sorted_i

    def token(self, pos: int) -> int:
        if self.sorted_i is None and not self._unambiguous(pos):
            self.sorted_i = self.probs_row.sort(dim=-1, descending=True)[1]
        if self.sorted_i is not None:
            return int(self.sorted_i[pos])
        return int(self.idx[pos])

    def _unambiguous(self, pos: int) -> bool:
        """topk's token at ``pos`` is the sort's: its probability differs from both neighbours' (the right
        one known: a drawn position past the top k, or the last of a whole-vocabulary k, asks the sort)."""
        vals = self.vals
        if pos >= len(vals) - 1:
            return False
        return not (vals[pos] == vals[pos + 1] or (pos > 0 and vals[pos] == vals[pos - 1]))


def _prefiltered(probs: torch.Tensor, top_p: float, rows: list[int], k: int) -> dict[int, _Row]:
    """Rows among ``rows`` whose nucleus lies inside their top ``k`` (or k is the whole vocabulary)."""
    width = probs.shape[-1]
    sub = probs if len(rows) == probs.shape[0] else probs[rows]
    vals, idx = sub.topk(k, dim=-1)  # sorted descending: the sort's first k values
    cs = vals.cumsum(-1)
    kept = vals.masked_fill((cs - vals) > top_p, 0.0)
    done = [True] * len(rows) if k == width else (cs[:, k - 2] > top_p + MASS_MARGIN).tolist()
    out = {}
    for n, (j, ok) in enumerate(zip(rows, done)):
        if ok:
            vec = torch.zeros(width, dtype=probs.dtype)
            vec[:k] = kept[n].cpu()
            out[j] = _Row(probs[j], vec, vals=vals[n].cpu(), idx=idx[n].cpu())
    return out


def nucleus_sample(probs: torch.Tensor, top_p: float, generators: Sequence[torch.Generator | None],
                   tiers: Sequence[int] = TOPK_TIERS) -> list[int]:
    """Token per row, equal to :func:`reference_nucleus` for the same generator states (see the module doc)."""
    width = probs.shape[-1]
    if top_p >= 1.0:
        return reference_nucleus(probs, top_p, generators)
    found: dict[int, _Row] = {}
    pending = list(range(probs.shape[0]))
    for k in sorted({min(t, width) for t in tiers}):
        if not pending:
            break
        found.update(_prefiltered(probs, top_p, pending, k))
        pending = [j for j in pending if j not in found]
    if pending:  # nucleus too wide for every tier: the reference's sort, for those rows only
        sorted_p, sorted_i = probs[pending].sort(dim=-1, descending=True)
        sorted_p = sorted_p.masked_fill((sorted_p.cumsum(-1) - sorted_p) > top_p, 0.0)
        for n, j in enumerate(pending):
            found[j] = _Row(probs[j], sorted_p[n].cpu(), sorted_i=sorted_i[n])
    return [found[j].token(torch.multinomial(found[j].vec, 1, generator=g).item())
            for j, g in enumerate(generators)]


def choose(logits: torch.Tensor, temperature: float, top_p: float, bias: LogitBias | None,
           penalties: Sequence[Mapping[int, float] | None],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """Next token per row: bias, n-gram penalties, then greedy (temperature 0) or seeded nucleus sampling."""
    logits = apply_bias_and_penalties(logits, bias, penalties)
    if temperature == 0:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits / temperature, dim=-1)
    return nucleus_sample(probs, top_p, generators)
