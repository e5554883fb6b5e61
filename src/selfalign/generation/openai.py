"""OpenAI-compatible engine: run generation on an existing serving cluster (vLLM, TGI, SGLang, `serve`).

Requests go to ``POST {base_url}/completions`` with ``prompt = prefix + text`` (the server's own prefix
caching does the reuse), ``concurrency`` of them in flight on a thread pool sharing one ``httpx`` client
(kept-alive connections). Connection errors, timeouts, HTTP 408/409/429 and 5xx are retried by
``tenacity`` with exponential backoff (``retry_backoff_s x 2^(retry - 1)``, at most ``max_retries``
retries); other 4xx answers are the caller's mistake and fail at once with the server's message.
Results are the same :class:`Result` records the HF engine yields.

Sampling mapping: the per-request seed is ``row_seed(seed, id)`` (batch-independent, as in the HF
engine); ``logit_bias`` token strings are turned into ids with the local tokenizer (OpenAI expects ids);
n-gram penalties travel as the ``ngram_penalties`` extension that ``selfalign serve`` honours and other
servers ignore (a warning says so).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from selfalign.config import OpenAIEngineConfig
from selfalign.generation.base import Request, Result, SamplingParams, resolve_logit_bias, row_seed

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class TransientHTTPError(Exception):
    """An HTTP answer worth retrying (overload, timeout, server error): its status and the server's message."""


class OpenAIEngine:
    """Any server speaking the OpenAI completions API."""

    name = "openai"

    def __init__(self, cfg: OpenAIEngineConfig, tokenizer_dir: str | Path | None = None,
                 trust_remote_code: bool = False):
        """``tokenizer_dir``: the served model's tokenizer (for chat templates and token counts), loaded
        with ``trust_remote_code`` (``model.trust_remote_code``) as the other engines load theirs."""
        self.cfg = cfg
        self.base_url = cfg.base_url.rstrip("/")
        self.api_key = os.environ.get(cfg.api_key_env, "")
        self.tok = None
        if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer_config.json").exists():
            from selfalign.models import load_tokenizer

            self.tok = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
        # one client for all worker threads (httpx.Client is thread-safe): connections are reused, and the
        # pool holds as many as there are requests in flight; timeout_s bounds connect, each read and write
        self.http = httpx.Client(timeout=cfg.timeout_s,
                                 limits=httpx.Limits(max_connections=cfg.concurrency,
                                                     max_keepalive_connections=cfg.concurrency))

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------------------------ http
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON with retries on transient failures; raise UserError on a client error or when retries run out."""
        from selfalign.io import UserError

        url = f"{self.base_url}{path}"
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempts = self.cfg.max_retries + 1

        def log_failure(state: RetryCallState) -> None:
            log.warning("%s: attempt %d/%d failed: %s", url, state.attempt_number, attempts, state.outcome.exception())

        retrying = Retrying(stop=stop_after_attempt(attempts),
                            wait=wait_exponential(multiplier=self.cfg.retry_backoff_s),
                            retry=retry_if_exception_type((httpx.TransportError, TransientHTTPError)),
                            after=log_failure)
        try:
            return retrying(self._post_once, url, data, headers)
        except RetryError as exc:
            raise UserError(f"{url}: gave up after {attempts} attempts: {exc.last_attempt.exception()}") from None

    def _post_once(self, url: str, data: bytes, headers: dict[str, str]) -> dict[str, Any]:
        """One POST: the decoded JSON answer, TransientHTTPError on a retryable status, UserError on another."""
        from selfalign.io import UserError

        resp = self.http.post(url, content=data, headers=headers)
        if resp.is_success:
            return json.loads(resp.content)
        detail = resp.content.decode("utf-8", "replace")[:500]
        if resp.status_code in _RETRY_STATUS:
            raise TransientHTTPError(f"HTTP {resp.status_code}: {detail}")
        raise UserError(f"{url}: HTTP {resp.status_code}: {detail}")

    # ------------------------------------------------------------------------------------ sampling
    def _logit_bias(self, bias: dict[str, float]) -> dict[str, float]:
        """Token-id strings -> bias, as the OpenAI API expects (ids from the local tokenizer)."""
        from selfalign.io import UserError

        if not bias:
            return {}
        if self.tok is None:
            raise UserError("logit_bias with the openai engine needs the model's tokenizer locally "
                            "(pass the model directory) to turn token strings into ids")
        return {str(i): b for i, b in resolve_logit_bias(self.tok, bias).items()}

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
