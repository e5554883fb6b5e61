"""The OpenAI engine against a real `selfalign serve` subprocess on loopback (tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from selfalign.io import UserError
from selfalign.config import project_section
from selfalign.generation import make_engine
from selfalign.generation.base import Request, SamplingParams, by_id
from selfalign.generation.openai import OpenAIEngine

PROMPTS = ["User: What is the capital of France?\n\nAssistant:", "The quick brown fox", "def sort_numbers(xs):",
           "Question: Is the sky blue? Answer:", "1. Instruction: Write a short poem", "Hello!"]


def _start_server(project_root: Path, model_dir: Path, *extra: str):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfalign.cli", "serve", "--params", "params.yaml", "--model", str(model_dir),
         "--port", "0", *extra],
        cwd=project_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if "listening on " in line:
            url = line.split("listening on ", 1)[1].split()[0]
            return proc, url
    proc.kill()
    raise RuntimeError("server did not start:\n" + "".join(lines))


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(project_root, tiny_model_dir):
    proc, url = _start_server(project_root, tiny_model_dir)
    yield url
    _stop(proc)


def _client(url: str, **kw) -> OpenAIEngine:
    return OpenAIEngine(project_section("generation.openai", base_url=url, **kw))


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_openai_engine_greedy_equals_local_hf_engine(server, tiny_model_dir):
    reqs = [Request(f"p{i}", "", p) for i, p in enumerate(PROMPTS)]
    sampling = SamplingParams(max_new_tokens=12)
    remote = by_id(_client(server, concurrency=3).generate(reqs, sampling))
    local = by_id(make_engine(project_section("generation"), tiny_model_dir).generate(reqs, sampling))
    assert set(remote) == set(local)
    for rid in local:
        assert remote[rid].text == local[rid].text
        assert (remote[rid].finish, remote[rid].completion_tokens, remote[rid].prompt_tokens) == (
            local[rid].finish, local[rid].completion_tokens, local[rid].prompt_tokens)


def test_openai_engine_seeded_sampling_is_independent_of_concurrency(server, tiny_model_dir):
    reqs = [Request(f"s{i}", "", p) for i, p in enumerate(PROMPTS)]
    sampling = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10, seed=11, stop=("\n",),
                              ngram_penalties=(0.5,))
    a = by_id(_client(server, concurrency=1).generate(reqs, sampling))
    b = by_id(_client(server, concurrency=6).generate(list(reversed(reqs)), sampling))
    assert {k: v.text for k, v in a.items()} == {k: v.text for k, v in b.items()}
    assert all("\n" not in r.text for r in a.values())
    c = by_id(_client(server, concurrency=6).generate(reqs, SamplingParams(
        temperature=1.0, top_p=0.95, max_new_tokens=10, seed=12, stop=("\n",), ngram_penalties=(0.5,))))
    assert any(c[k].text != a[k].text for k in a)


def test_logit_bias_goes_through_as_token_ids(server, tiny_model_dir):
    client = OpenAIEngine(project_section("generation.openai", base_url=server), tokenizer_dir=tiny_model_dir)
    res = list(client.generate([Request("e", "", "Hello!")],
                               SamplingParams(max_new_tokens=8, logit_bias={"<|im_end|>": 100.0})))
    assert res[0].text == "" and res[0].finish == "stop" and res[0].completion_tokens == 0
    with pytest.raises(UserError, match="tokenizer"):
        list(_client(server).generate([Request("e", "", "Hi")], SamplingParams(logit_bias={"x": 1.0})))


def test_chat_completions_and_models(server, tiny_model_dir, config):
    from selfalign.generation.server import App

    models = json.loads(urllib.request.urlopen(server + "/models", timeout=30).read())
    assert models["data"][0]["id"] == "selfalign"
    body = {"model": "selfalign", "messages": [{"role": "user", "content": "Is the sky blue?"}],
            "max_tokens": 10, "temperature": 0}
    resp = _post(server, "/chat/completions", body)
    msg = resp["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert resp["choices"][0]["finish_reason"] in ("stop", "length")
    assert resp["usage"]["total_tokens"] == resp["usage"]["prompt_tokens"] + resp["usage"]["completion_tokens"]
    # the same rendering and decoding in-process gives the same answer
    engine = make_engine(config.generation, tiny_model_dir)
    app = App(engine, config, name="selfalign", default_max_tokens=10, batch_wait_s=0.0)
    try:
        local = app.chat(dict(body))
    finally:
        app.close()
    assert local["choices"][0]["message"]["content"] == msg["content"]
    prefix, text = app.chat_prompt(body["messages"])
    assert "Is the sky blue?" in text and "Is the sky blue?" not in prefix


def test_client_errors_fail_fast_and_unreachable_server_is_retried(server):
    t0 = time.monotonic()
    with pytest.raises(UserError, match="HTTP 400"):
        _client(server, max_retries=3)._post("/completions", {"prompt": "x", "n": 2})
    assert time.monotonic() - t0 < 5  # no backoff on a 400
    dead = _client("http://127.0.0.1:9/v1", max_retries=2, retry_backoff_s=0.05, timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(UserError, match="gave up after 3 attempts"):
        list(dead.generate([Request("x", "", "hi")], SamplingParams(max_new_tokens=2)))
    assert time.monotonic() - t0 >= 0.05 + 0.1


class _Flaky:
    """A loopback HTTP server answering ``fail`` times with ``status`` before a valid completion."""

    def __init__(self, fail: int, status: int = 503):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.calls: list[float] = []
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                flaky.calls.append(time.monotonic())
                ok = len(flaky.calls) > fail
                body = json.dumps({"choices": [{"text": "ok", "finish_reason": "stop"}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode() if ok else b"busy"
                self.send_response(200 if ok else status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_transient_http_statuses_are_retried_with_exponential_backoff():
    flaky = _Flaky(fail=2)
    try:
        res = list(_client(flaky.url, max_retries=3, retry_backoff_s=0.1).generate(
            [Request("x", "", "hi")], SamplingParams(max_new_tokens=2)))
        assert [r.text for r in res] == ["ok"] and len(flaky.calls) == 3
        gaps = [b - a for a, b in zip(flaky.calls, flaky.calls[1:])]
        assert gaps[0] >= 0.1 and gaps[1] >= 0.2  # retry_backoff_s x 2^(retry - 1)
    finally:
        flaky.close()
    flaky = _Flaky(fail=5, status=429)
    try:
        with pytest.raises(UserError, match="gave up after 2 attempts: HTTP 429: busy"):
            _client(flaky.url, max_retries=1, retry_backoff_s=0.01)._post("/completions", {"prompt": "x"})
        assert len(flaky.calls) == 2
    finally:
        flaky.close()


def test_serve_with_adapter_changes_the_model(project_root, tiny_model_dir, tmp_path, server):
    import torch
    from peft import LoraConfig, get_peft_model

    from selfalign.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=32, init_lora_weights=False,
                                                                 target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    proc, url = _start_server(project_root, tiny_model_dir, "--adapter", str(adapter))
    try:
        reqs = [Request(f"a{i}", "", p) for i, p in enumerate(PROMPTS)]
        sampling = SamplingParams(max_new_tokens=12)
        with_adapter = by_id(_client(url).generate(reqs, sampling))
        base = by_id(_client(server).generate(reqs, sampling))
        assert any(with_adapter[k].text != base[k].text for k in base)
    finally:
        _stop(proc)


def test_the_tokenizer_loads_with_model_trust_remote_code(remote_code_model_dir):
    """``model.trust_remote_code`` reaches the served model's tokenizer (make_engine passes it through)."""
    with pytest.raises(ValueError, match="trust_remote_code"):
        OpenAIEngine(project_section("generation.openai"), tokenizer_dir=remote_code_model_dir)
    engine = make_engine(project_section("generation", engine="openai"), remote_code_model_dir, trust_remote_code=True)
    try:
        assert type(engine.tok).__name__ == "RemoteTok"
    finally:
        engine.close()
