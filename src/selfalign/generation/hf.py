"""Transformers engine: each distinct prefix is encoded once, its KV cache reused by every batch.

Why a hand-written decode loop instead of ``model.generate``: the sampling rules the pipeline needs are
per *row* — a seed derived from (sampling seed, request id) so a sample never depends on which other
requests share its batch, the paper's per-order n-gram penalties counted on the row's generated tokens
only, stop strings checked on the row's decoded text, rows leaving the batch as soon as they finish.

Token convention (both cached and uncached paths): ``prompt ids = tok(prefix) + tok(text)``, each
encoded without special tokens. Tokenising the joined string could merge BPE tokens across the boundary,
and then the cached and uncached prompts would not be the same sequence. The prefix cache holds
``tok(prefix)[:-1]``; the last prefix token is fed with each suffix so every row (even one with an
empty ``text``) has at least one new position to predict from.

Log-likelihood scoring is not here: :class:`selfalign.generation.scoring.PackedScorer` runs on this engine's
public parts (``model``, ``tok``, ``device``, ``pad_id``, ``max_context``, ``gen``, :meth:`HFEngine.prefix_cache`),
so a change to the scorer never invalidates generated data.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from selfalign.config import GenerationConfig
from selfalign.generation.attention import SharedPrefix, use_shared_prefix_attention, verify_shared_prefix
from selfalign.generation.base import Request, Result, SamplingParams, resolve_logit_bias, row_seed

log = logging.getLogger(__name__)

__all__ = ["HFEngine", "NgramCounter"]


class NgramCounter:
    """The paper's n-gram "frequency penalty" for one row.

    For order ``k`` a candidate token ``t`` loses ``coef_k x count`` where ``count`` is how often the
    row's last ``k-1`` generated tokens were already followed by ``t`` in its generated text (order 1:
    how often ``t`` was generated). The prompt is never counted.
    """

    def __init__(self, coefs: Sequence[float]):
        self.coefs = tuple(float(c) for c in coefs)
        self.tables: list[dict[tuple[int, ...], Counter]] = [defaultdict(Counter) for _ in self.coefs]
        self.tokens: list[int] = []

    def _contexts(self) -> Iterator[tuple[int, float, tuple[int, ...]]]:
        n = len(self.tokens)
        for k, coef in enumerate(self.coefs, 1):
            if coef != 0.0 and n >= k - 1:
                yield k, coef, tuple(self.tokens[n - (k - 1):]) if k > 1 else ()

    def penalties(self) -> dict[int, float]:
        """Token id -> amount to subtract from its logit before choosing the next token."""
        out: dict[int, float] = defaultdict(float)
        for k, coef, ctx in self._contexts():
            for tok, count in self.tables[k - 1].get(ctx, {}).items():
                out[tok] += coef * count
        return out

    def push(self, token: int) -> None:
        for k, _coef, ctx in self._contexts():
            self.tables[k - 1][ctx][token] += 1
        self.tokens.append(token)


@dataclass
class _Row:
    """One request being decoded."""

    req: Request
    suffix: list[int]  # fed after the cached prefix (starts with the prefix's last token)
    prompt_tokens: int
    truncated: int
    max_new: int
    generator: torch.Generator | None
    ngram: NgramCounter | None
    out: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None


class _Group:
    """Rows sharing one cached prefix (``cache_ids`` may be empty: no reuse possible)."""

    def __init__(self, cache_ids: tuple[int, ...]):
        self.cache_ids = cache_ids
        self.rows: list[_Row] = []


class HFEngine:
    """The transformers engine (CPU or one GPU). See the module docstring for the token convention."""

    name = "hf"

    def __init__(self, model, tokenizer, gen: GenerationConfig, model_id: str = "model"):
        self.model = model
        self.tok = tokenizer
        self.gen = gen
        self.model_id = model_id
        self.batch_size = gen.batch_size
        self.max_context = int(gen.max_context or model.config.max_position_embeddings)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = self._eos_ids()
        self._prefix_caches: OrderedDict[tuple[int, ...], SharedPrefix] = OrderedDict()
        # opt-in: an architecture the kernel cannot compute keeps its own attention and every row runs
        # its whole prompt (exact, slower; logged once); a served one is proven on one prompt first
        self.shares_prefix = use_shared_prefix_attention(model)
        if self.shares_prefix:
            verify_shared_prefix(model, self.max_context)

    @classmethod
    def from_pretrained(cls, gen: GenerationConfig, model_dir: str | Path, adapter_dir: str | Path | None = None,
                        dtype: str = "float32", trust_remote_code: bool = False) -> "HFEngine":
        from selfalign.models import load_model, load_tokenizer

        if gen.num_threads:
            torch.set_num_threads(gen.num_threads)
        device = "cuda" if torch.cuda.is_available() else None
        model = load_model(model_dir, adapter_dir=adapter_dir, dtype=dtype, device=device, merge_adapter=True,
                           trust_remote_code=trust_remote_code)
        return cls(model, load_tokenizer(model_dir, trust_remote_code=trust_remote_code), gen, model_id=str(model_dir))

    # ------------------------------------------------------------------------------------ helpers
    def _eos_ids(self) -> set[int]:
        ids = {self.tok.eos_token_id}
        cfg_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(cfg_eos, int):
            ids.add(cfg_eos)
        elif cfg_eos:
            ids.update(cfg_eos)
        return {i for i in ids if i is not None}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added (the generation convention)."""
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, keep_last: bool,
                 shared: SharedPrefix | None = None):
        kwargs = {"logits_to_keep": 1} if keep_last else {}
        if shared is not None:
            kwargs["shared_prefix"] = shared
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                          **kwargs)

    @torch.inference_mode()
    def prefix_cache(self, ids: tuple[int, ...]) -> SharedPrefix | None:
        """Per-layer (key, value) of ``ids`` (batch 1) and their count, computed once and kept in a small LRU.

        Sliding-window layers keep only the prefix's last ``window - 1`` keys (all a later token can see).
        None when there is nothing to share or the model runs without the shared-prefix attention."""
        if not ids or not self.shares_prefix:
            return None
        if ids in self._prefix_caches:
            self._prefix_caches.move_to_end(ids)
            return self._prefix_caches[ids]
        cache = self._new_cache()
        t = torch.tensor([ids], device=self.device)
        pos = torch.arange(len(ids), device=self.device)[None]
        self._forward(t, torch.ones_like(t), pos, cache, keep_last=True)
        kv = SharedPrefix.from_cache(cache, len(ids))
        self._prefix_caches[ids] = kv
        while len(self._prefix_caches) > self.gen.prefix_cache_entries:
            self._prefix_caches.popitem(last=False)
        return kv

    # ------------------------------------------------------------------------------------ overflow
    def _fit(self, req: Request, prefix_ids: list[int]) -> tuple[list[int], list[int], int]:
        """Apply the overflow policy; return (prefix ids, text ids, tokens removed)."""
        from selfalign.io import UserError

        limit = self.max_context - self.gen.min_new_tokens_reserved
        text_ids = self.encode(req.text)
        full = len(prefix_ids) + len(text_ids)
        if full <= limit:
            return prefix_ids, text_ids, 0
        policy = self.gen.overflow
        where = (f"request {req.id!r}: prompt of {full} tokens exceeds {limit} (generation.max_context "
                 f"{self.max_context} - min_new_tokens_reserved {self.gen.min_new_tokens_reserved})")
        if policy == "error":
            raise UserError(f"{where}; generation.overflow is 'error'")
        if policy == "truncate_left":
            ids = (prefix_ids + text_ids)[-limit:]
            return [], ids, full - len(ids)
        if len(prefix_ids) > limit:
            raise UserError(f"{where}: the shared prefix alone ({len(prefix_ids)} tokens) does not fit")
        text = req.text
        while len(prefix_ids) + len(text_ids) > limit and "\n" in text:
            text = text[: text.rstrip("\n").rfind("\n")] if "\n" in text.rstrip("\n") else ""
            text_ids = self.encode(text)
        if len(prefix_ids) + len(text_ids) > limit:  # one last paragraph still too long: cut it from the left
            text_ids = text_ids[len(text_ids) - (limit - len(prefix_ids)):] if limit > len(prefix_ids) else []
        return prefix_ids, text_ids, full - len(prefix_ids) - len(text_ids)

    def _plan(self, requests: Sequence[Request], sampling: SamplingParams) -> list[_Group]:
        from selfalign.io import UserError

        groups: dict[tuple[int, ...], _Group] = {}
        prefix_ids_of: dict[str, list[int]] = {}
        for req in requests:
            if req.prefix not in prefix_ids_of:
                prefix_ids_of[req.prefix] = self.encode(req.prefix)
            pids, tids, cut = self._fit(req, prefix_ids_of[req.prefix])
            ids = pids + tids
            if not ids:
                raise UserError(f"request {req.id!r}: empty prompt")
            # without the shared-prefix attention no prefix is cached: the row holds its whole prompt
            cache_ids = tuple(pids[:-1]) if self.shares_prefix else ()
            suffix = ids[len(cache_ids):]
            grp = groups.setdefault(cache_ids, _Group(cache_ids))
            gen = None
            if sampling.temperature > 0:
                gen = torch.Generator().manual_seed(row_seed(sampling.seed, req.id))
            ngram = NgramCounter(sampling.ngram_penalties) if any(sampling.ngram_penalties) else None
            grp.rows.append(_Row(req=req, suffix=suffix, prompt_tokens=len(ids), truncated=cut,
                                 max_new=min(sampling.max_new_tokens, self.max_context - len(ids)),
                                 generator=gen, ngram=ngram))
        return list(groups.values())

    # ------------------------------------------------------------------------------------ decoding
    def generate(self, requests: Sequence[Request], sampling: SamplingParams) -> Iterator[Result]:
        """Yield results batch by batch: per prefix group, suffixes length-sorted, ``batch_size`` at a time."""
        for r in self._decoded_rows(requests, sampling):
            yield Result(id=r.req.id, text=r.text, finish=r.finish or "length",
                         prompt_tokens=r.prompt_tokens, completion_tokens=len(r.out), truncated_tokens=r.truncated)

    def generate_token_ids(self, requests: Sequence[Request], sampling: SamplingParams
                           ) -> Iterator[tuple[str, list[int]]]:
        """(request id, generated token ids) per request, decoded exactly as :meth:`generate` decodes.

        For exactness checks against ``model.generate``, which compare token ids: text can hide a
        difference (two id sequences may decode to the same string). The ids are the ones
        ``completion_tokens`` counts: eos is not among them; a stop string is cut from the text only."""
        for r in self._decoded_rows(requests, sampling):
            yield r.req.id, list(r.out)

    def _decoded_rows(self, requests: Sequence[Request], sampling: SamplingParams) -> Iterator[_Row]:
        """Decode every request; yield its finished row, batch by batch."""
        bias = resolve_logit_bias(self.tok, dict(sampling.logit_bias))
        bias_vec = None
        if bias:
            bias_vec = torch.zeros(self.model.config.vocab_size, device=self.device)
            for i, b in bias.items():
                bias_vec[i] = b
        for grp in self._plan(requests, sampling):
            rows = sorted(grp.rows, key=lambda r: len(r.suffix), reverse=True)
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                self._decode_batch(grp.cache_ids, batch, sampling, bias_vec)
                yield from batch

    def _choose(self, logits: torch.Tensor, rows: list[_Row], sampling: SamplingParams,
                bias_vec: torch.Tensor | None) -> list[int]:
        """Next token per row: bias, n-gram penalties, then greedy or seeded nucleus sampling."""
        logits = logits.float()
        if bias_vec is not None:
            logits = logits + bias_vec[: logits.shape[-1]]
        for j, r in enumerate(rows):
            if r.ngram is not None:
                pen = r.ngram.penalties()
                if pen:
                    idx = torch.tensor(list(pen), device=logits.device)
                    logits[j, idx] -= torch.tensor(list(pen.values()), device=logits.device)
        if sampling.temperature == 0:
            return logits.argmax(-1).tolist()
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        if sampling.top_p < 1.0:
            drop = (sorted_p.cumsum(-1) - sorted_p) > sampling.top_p  # keeps at least the top token
            sorted_p = sorted_p.masked_fill(drop, 0.0)
        out = []
        for j, r in enumerate(rows):
            k = torch.multinomial(sorted_p[j].cpu(), 1, generator=r.generator).item()
            out.append(int(sorted_i[j, k]))
        return out

    def _push(self, row: _Row, token: int, stops: tuple[str, ...], max_stop: int) -> bool:
        """Record a token; return True when the row is finished (eos, stop string or length)."""
        if token in self.eos_ids:
            row.finish = "stop"
            row.text = self.tok.decode(row.out)
            return True
        if row.ngram is not None:
            row.ngram.push(token)
        row.out.append(token)
        if stops:
            prev_len = len(row.text)
            row.text = self.tok.decode(row.out)
            tail_start = max(0, prev_len - max_stop)
            hits = [row.text.find(s, tail_start) for s in stops]
            hits = [h for h in hits if h >= 0]
            if hits:
                row.text = row.text[: min(hits)]
                row.finish = "stop"
                return True
        if len(row.out) >= row.max_new:
            row.finish = "length"
            row.text = self.tok.decode(row.out)
            return True
        return False

    @torch.inference_mode()
    def _decode_batch(self, cache_ids: tuple[int, ...], rows: list[_Row], sampling: SamplingParams,
                      bias_vec: torch.Tensor | None) -> None:
        live = [r for r in rows if r.max_new > 0]
        for r in rows:
            if r.max_new <= 0:
                r.finish = "length"
        if not live:
            return
        dev = self.device
        n, width, plen = len(live), max(len(r.suffix) for r in live), len(cache_ids)
        shared = self.prefix_cache(cache_ids)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((n, width), dtype=torch.long, device=dev)  # covers the rows' own tokens only
        for i, r in enumerate(live):  # left-pad: padding sits between the shared prefix and the suffix
            ids[i, width - len(r.suffix):] = torch.tensor(r.suffix, device=dev)
            mask[i, width - len(r.suffix):] = 1
        pos = plen + (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        logits = self._forward(ids, mask, pos, cache, keep_last=True, shared=shared).logits[:, -1, :]
        next_pos = pos[:, -1] + 1
        stops = tuple(sampling.stop)
        max_stop = max((len(s) for s in stops), default=0)
        while live:
            toks = self._choose(logits, live, sampling, bias_vec)
            keep = [j for j, (r, t) in enumerate(zip(live, toks)) if not self._push(r, t, stops, max_stop)]
            if not keep:
                break
            if len(keep) < len(live):  # finished rows leave the batch (and its KV cache)
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, next_pos = mask[sel], next_pos[sel]
                live, toks = [live[j] for j in keep], [toks[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            step = torch.tensor(toks, device=dev)[:, None]
            logits = self._forward(step, mask, next_pos[:, None], cache, keep_last=True,
                                   shared=shared).logits[:, -1, :]
            next_pos = next_pos + 1

    def close(self) -> None:
        self._prefix_caches.clear()
