"""Serve a model (+ optional LoRA adapter) over an OpenAI-compatible HTTP API (completions + chat).

``selfalign serve --model models/base --adapter models/verbose`` listens on 127.0.0.1:8000 (loopback only unless
``--host`` says otherwise) and answers ``POST /v1/completions``, ``POST /v1/chat/completions`` and ``GET
/v1/models`` with the HF engine, batching concurrent requests; chat uses the training chat format with
``engrave.system_prompt_file`` as the default system prompt. Extensions (``ngram_penalties``,
``selfalign.truncated_tokens``): docs/engine.md (Serving a model).
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from selfalign.config import Config
from selfalign.generation.base import Request, Result, SamplingParams

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request the API rejects with HTTP 400 (message returned to the client)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/base", help="model directory (default: models/base)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory (e.g. models/verbose)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (printed on start)")
    parser.add_argument("--served-name", default=None, help="model name clients send (default: generation.openai.model)")
    parser.add_argument("--max-tokens", type=int, default=512, help="max_tokens when a chat request sends none")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to gather concurrent requests")


def main(args: argparse.Namespace, config: Config) -> None:
    from selfalign.generation.hf import HFEngine

    from selfalign.models import require_model_dirs

    require_model_dirs(args.model, args.adapter)
    engine = HFEngine.from_pretrained(config.generation, args.model, adapter_dir=args.adapter,
                                      dtype=config.model.dtype)
    app = App(engine, config, name=args.served_name or config.generation.openai.model,
              default_max_tokens=args.max_tokens, batch_wait_s=args.batch_wait_ms / 1000)
    server = make_server(app, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"selfalign serve: listening on http://{host}:{port}/v1 (model {app.name})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()


# ----------------------------------------------------------------------------------------- batching
@dataclass
class _Job:
    requests: list[Request]
    sampling: SamplingParams
    future: Future


class Batcher:
    """One worker thread owns the engine; concurrent jobs with equal sampling share a decode batch.

    Request ids carry each client's seed (``"<seed>:<index>"``, see :meth:`App._requests`), so jobs with
    different seeds can share a batch; jobs whose ids collide wait for the next batch.
    """

    def __init__(self, engine, wait_s: float):
        self.engine = engine
        self.wait_s = wait_s
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def submit(self, requests: list[Request], sampling: SamplingParams) -> list[Result]:
        job = _Job(requests, sampling, Future())
        self._q.put(job)
        return job.future.result()

    def _gather(self, first: _Job) -> tuple[list[_Job], list[_Job]]:
        same, other = [first], []
        ids = {r.id for r in first.requests}
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                job = self._q.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                return same, other
            if job is None:
                self._q.put(None)
                return same, other
            mine = {r.id for r in job.requests}
            if job.sampling == first.sampling and not ids & mine:
                same.append(job)
                ids |= mine
            else:
                other.append(job)

    def _loop(self) -> None:
        pending: list[_Job] = []
        while True:
            job = pending.pop(0) if pending else self._q.get()
            if job is None:
                return
            same, other = self._gather(job)
            pending += other
            self._run(same)

    def _run(self, jobs: list[_Job]) -> None:
        requests = [r for job in jobs for r in job.requests]
        try:
            by_id = {res.id: res for res in self.engine.generate(requests, jobs[0].sampling)}
        except Exception as exc:  # delivered to the waiting HTTP handler, which answers 400/500
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job in jobs:
            job.future.set_result([by_id[r.id] for r in job.requests])

    def close(self) -> None:
        self._q.put(None)


# ----------------------------------------------------------------------------------------- the API
class App:
    """Turns OpenAI request bodies into engine requests and results into OpenAI responses."""

    def __init__(self, engine, config: Config, name: str, default_max_tokens: int, batch_wait_s: float):
        self.engine = engine
        self.config = config
        self.name = name
        self.default_max_tokens = default_max_tokens
        self.batcher = Batcher(engine, batch_wait_s)

    def close(self) -> None:
        self.batcher.close()

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "selfalign"}]}

    @staticmethod
    def _requests(body: dict[str, Any], parts: list[tuple[str, str]]) -> list[Request]:
        """Engine requests; the id carries the client's seed, so sampling is seeded per prompt."""
        seed = body.get("seed")
        try:
            seed = int(seed) if seed is not None else secrets.randbits(31)
        except (TypeError, ValueError):
            raise BadRequest(f"seed must be an integer, got {seed!r}") from None
        return [Request(f"{seed}:{i}", prefix, text) for i, (prefix, text) in enumerate(parts)]

    def _sampling(self, body: dict[str, Any], default_max: int, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        if body.get("stream"):
            raise BadRequest("stream=true is not supported")
        if int(body.get("n", 1)) != 1:
            raise BadRequest("only n=1 is supported")
        if body.get("echo") or body.get("logprobs"):
            raise BadRequest("echo/logprobs are not supported")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        bias = {}
        for key, value in (body.get("logit_bias") or {}).items():  # OpenAI keys are token ids
            try:
                bias[self.engine.tok.convert_ids_to_tokens(int(key))] = float(value)
            except (TypeError, ValueError):
                raise BadRequest(f"logit_bias keys must be token ids, got {key!r}") from None
        temperature = body.get("temperature")
        try:
            return SamplingParams(
                temperature=1.0 if temperature is None else float(temperature),
                top_p=float(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0),
                max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or default_max),
                stop=stop + extra_stop,
                logit_bias=bias,
                ngram_penalties=tuple(float(x) for x in body.get("ngram_penalties") or ()),
                seed=0,  # the client's seed is in the request id (see _requests)
            )
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"bad sampling parameter: {exc}") from None

    def _usage(self, results: list[Result]) -> dict[str, Any]:
        p = sum(r.prompt_tokens for r in results)
        c = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompts = [self.engine.tok.decode(prompt)]
        else:
            raise BadRequest("prompt must be a string, a list of strings or a list of token ids")
        sampling = self._sampling(body, default_max=16)  # OpenAI's completions default
        results = self.batcher.submit(self._requests(body, [("", p) for p in prompts]), sampling)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": i, "text": r.text, "finish_reason": r.finish, "logprobs": None}
                        for i, r in enumerate(results)],
            "usage": self._usage(results),
            "selfalign": {"truncated_tokens": [r.truncated_tokens for r in results]},
        }

    def chat_prompt(self, messages: list[dict[str, Any]]) -> tuple[str, str]:
        """(shared prefix, rest) of the rendered conversation; the prefix is the system part."""
        from selfalign.prompts.training import (
            PLAIN_ASSISTANT_HEADER,
            PLAIN_USER_HEADER,
            has_chat_template,
            load_system_prompt,
        )

        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise BadRequest("messages must be a non-empty list of {role, content} with string content")
        engrave = self.config.engrave
        turns = [m for m in messages if m.get("role") != "system"]
        systems = [m["content"] for m in messages if m.get("role") == "system"]
        system = systems[0] if systems else load_system_prompt(engrave.system_prompt_file)
        if not turns or turns[0].get("role") != "user":
            raise BadRequest("the first non-system message must come from the user")
        if engrave.template == "chat" and has_chat_template(self.engine.tok):
            msgs = ([{"role": "system", "content": system}] if system is not None else [])
            msgs += [{"role": m["role"], "content": m["content"]} for m in turns]
            full = self.engine.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            head = f"{system}\n\n" if system else ""
            body = "".join(f"{PLAIN_USER_HEADER if m['role'] == 'user' else PLAIN_ASSISTANT_HEADER}\n"
                           f"{m['content']}\n\n" for m in turns)
            full = f"{head}{body}{PLAIN_ASSISTANT_HEADER}\n"
        cut = full.find(turns[0]["content"])
        return (full[:cut], full[cut:]) if cut > 0 else ("", full)

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        from selfalign.prompts.training import end_of_answer

        prefix, text = self.chat_prompt(body.get("messages") or [])
        eoa = end_of_answer(self.engine.tok, self.config.engrave.template)
        extra = (eoa,) if eoa and eoa != self.engine.tok.eos_token else ()
        sampling = self._sampling(body, default_max=self.default_max_tokens, extra_stop=extra)
        (result,) = self.batcher.submit(self._requests(body, [(prefix, text)]), sampling)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish}],
            "usage": self._usage([result]),
            "selfalign": {"truncated_tokens": [result.truncated_tokens]},
        }


def make_server(app: App, host: str, port: int) -> ThreadingHTTPServer:
    """A threading HTTP server routing the OpenAI paths to ``app``."""
    from selfalign.io import UserError

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str) -> None:
            self._send(status, {"error": {"message": message, "type": kind}})

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, app.models())
            elif self.path.rstrip("/") in ("/health", "/v1/health"):
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"unknown path {self.path}", "not_found")

        def do_POST(self) -> None:  # noqa: N802
            routes = {"/v1/completions": app.completions, "/v1/chat/completions": app.chat}
            handler = routes.get(self.path.rstrip("/"))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if handler is None:
                self._error(404, f"unknown path {self.path}", "not_found")
                return
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("request body must be a JSON object")
                self._send(200, handler(body))
            except (json.JSONDecodeError, BadRequest, UserError) as exc:
                self._error(400, str(exc), "invalid_request_error")
            except Exception as exc:  # an engine failure must answer 500, not kill the connection
                log.exception("request failed")
                self._error(500, f"{type(exc).__name__}: {exc}", "server_error")

    return ThreadingHTTPServer((host, port), Handler)
