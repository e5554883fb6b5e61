"""OpenAI-compatible engine: run generation on an existing serving cluster (vLLM, TGI, SGLang, `serve`).

Requests go to ``POST {base_url}/completions`` with ``prompt = prefix + text`` (the server's own prefix
caching does the reuse), ``concurrency`` of them in flight on a thread pool. Connection errors, timeouts,
HTTP 429 and 5xx are retried with exponential backoff (``retry_backoff_s x 2^attempt``); other 4xx
answers are the caller's mistake and fail at once with the server's message. Results are the same
:class:`Result` records the HF engine yields.

Sampling mapping: the per-request seed is ``row_seed(seed, id)`` (batch-independent, as in the HF
engine); ``logit_bias`` token strings are turned into ids with the local tokenizer (OpenAI expects ids);
n-gram penalties travel as the ``ngram_penalties`` extension that ``selfalign serve`` honours and other
servers ignore (a warning says so).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator, Sequence

from selfalign.config import OpenAIEngineConfig
from selfalign.generation.base import Request, Result, SamplingParams, row_seed

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAIEngine:
    """Any server speaking the OpenAI completions API."""

    name = "openai"

    def __init__(self, cfg: OpenAIEngineConfig, tokenizer_dir: str | Path | None = None):
        self.cfg = cfg
        self.base_url = cfg.base_url.rstrip("/")
        self.api_key = os.environ.get(cfg.api_key_env, "")
        self.tok = None
        if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer_config.json").exists():
            from selfalign.models import load_tokenizer

            self.tok = load_tokenizer(tokenizer_dir)

    # ------------------------------------------------------------------------------------ http
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON with retries on transient failures; raise UserError on a client error."""
        from selfalign.io import UserError

        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(f"{self.base_url}{path}", data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:500]
                if exc.code not in _RETRY_STATUS:
                    raise UserError(f"{self.base_url}{path}: HTTP {exc.code}: {detail}") from None
                last = RuntimeError(f"HTTP {exc.code}: {detail}")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = exc
            log.warning("%s%s: attempt %d/%d failed: %s", self.base_url, path, attempt + 1,
                        self.cfg.max_retries + 1, last)
        raise UserError(f"{self.base_url}{path}: gave up after {self.cfg.max_retries + 1} attempts: {last}")

    # ------------------------------------------------------------------------------------ sampling
    def _logit_bias(self, bias: dict[str, float]) -> dict[str, float]:
        from selfalign.io import UserError

        if not bias:
            return {}
        if self.tok is None:
            raise UserError("logit_bias with the openai engine needs the model's tokenizer locally "
                            "(pass the model directory) to turn token strings into ids")
        vocab = self.tok.get_vocab()
        out = {}
        for s, b in bias.items():
            ids = [vocab[s]] if s in vocab else self.tok(s, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise UserError(f"logit_bias: {s!r} is not a single token of this tokenizer")
            out[str(ids[0])] = float(b)
        return out

    def _body(self, req: Request, sampling: SamplingParams, bias: dict[str, float]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "prompt": req.prompt,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": row_seed(sampling.seed, req.id) % (2**31 - 1),
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if bias:
            body["logit_bias"] = bias
        if any(sampling.ngram_penalties):
            body["ngram_penalties"] = list(sampling.ngram_penalties)
        return body

    def _complete(self, req: Request, sampling: SamplingParams, bias: dict[str, float]) -> Result:
        resp = self._post("/completions", self._body(req, sampling, bias))
        choice = resp["choices"][0]
        usage = resp.get("usage") or {}
        truncated = (resp.get("selfalign") or {}).get("truncated_tokens") or [0]
        return Result(id=req.id, text=choice.get("text") or "",
                      finish="length" if choice.get("finish_reason") == "length" else "stop",
                      prompt_tokens=int(usage.get("prompt_tokens", 0)),
                      completion_tokens=int(usage.get("completion_tokens", 0)),
                      truncated_tokens=int(truncated[0]))

    def generate(self, requests: Sequence[Request], sampling: SamplingParams) -> Iterator[Result]:
        """Yield results as they complete (``concurrency`` requests in flight)."""
        bias = self._logit_bias(dict(sampling.logit_bias))
        if any(sampling.ngram_penalties):
            log.warning("ngram_penalties are sent as an extension field: `selfalign serve` applies them, "
                        "other OpenAI-compatible servers ignore them")
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            futures = [pool.submit(self._complete, r, sampling, bias) for r in requests]
            try:
                for fut in as_completed(futures):
                    yield fut.result()
            finally:
                for fut in futures:
                    fut.cancel()

    def score(self, context: str, continuations: Sequence[str]) -> list[float]:
        """Not offered: log-likelihood scoring runs on the HF engine (``generation.engine: hf``)."""
        from selfalign.io import UserError

        raise UserError("score() needs the hf engine; the openai engine only generates")
