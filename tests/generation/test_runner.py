"""Resumable runner: per-result fsync'd appends, skip done ids, atomic final file, SIGKILL-safe, and a
fingerprint that keeps a resume from mixing records made under other models, adapters, sampling or code."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fakes import FakeEngine

from selfalign.config import project_section
from selfalign.generation import make_engine
from selfalign.generation.base import Request, SamplingParams
from selfalign.generation.runner import (
    fingerprint_path,
    generation_fingerprint,
    model_identity,
    partial_path,
    resume_fingerprint,
    run_resumable,
    source_sha256,
)

PREFIX = "User: What is the capital of France?\n\nAssistant: "
FP = {"model": "tiny", "adapter_sha256": None}


def _requests(n: int) -> list[Request]:
    return [Request(f"q{i:03d}", PREFIX, f"The quick brown fox {i}") for i in range(n)]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_runner_writes_final_in_request_order_and_removes_partial(tmp_path):
    reqs = list(reversed(_requests(5)))
    engine = FakeEngine(lambda r: r.text.upper())
    out = tmp_path / "out.jsonl"
    records = run_resumable(engine, reqs, SamplingParams(), out, fingerprint=FP,
                            make_record=lambda q, r: {"id": q.id, "answer": r.text, "finish": r.finish})
    assert [r["id"] for r in records] == [r.id for r in reqs]
    assert _lines(out) == records  # the fingerprint never reaches the output
    assert records[0]["answer"] == reqs[0].text.upper()
    assert not partial_path(out).exists() and not fingerprint_path(out).exists()


def test_runner_resumes_skipping_done_ids_and_torn_tail(tmp_path):
    reqs = _requests(6)
    out = tmp_path / "out.jsonl"
    part = partial_path(out)
    done = {"id": "q001", "text": "from before", "finish": "stop", "prompt_tokens": 1, "completion_tokens": 2,
            "truncated_tokens": 0}
    part.write_text(json.dumps(done) + "\n" + '{"id": "q002", "text": "torn')  # killed mid-write
    fingerprint_path(out).write_text(json.dumps(resume_fingerprint(FP, reqs, SamplingParams())))
    engine = FakeEngine(lambda r: "new")
    records = run_resumable(engine, reqs, SamplingParams(), out, fingerprint=FP)
    assert [r.id for r in engine.seen] == [r.id for r in reqs if r.id != "q001"]
    assert records[1] == done
    assert [r["id"] for r in _lines(out)] == [r.id for r in reqs]


def test_runner_rejects_duplicate_ids_and_foreign_records(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        run_resumable(FakeEngine(["x"]), _requests(2) * 2, SamplingParams(), tmp_path / "a.jsonl", fingerprint=FP)
    with pytest.raises(ValueError, match="keep id"):
        run_resumable(FakeEngine(["x"]), _requests(2), SamplingParams(), tmp_path / "b.jsonl", fingerprint=FP,
                      make_record=lambda q, r: {"id": "other"})


SCRIPT = textwrap.dedent("""
    import sys
    from selfalign.config import project_section
    from selfalign.generation import make_engine
    from selfalign.generation.base import Request, SamplingParams
    from selfalign.generation.runner import run_resumable
    model_dir, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reqs = [Request(f"q{i:03d}", PREFIX, f"The quick brown fox {i}") for i in range(n)]
    engine = make_engine(project_section("generation", batch_size=1), model_dir)
    run_resumable(engine, reqs, SamplingParams(max_new_tokens=16), out, fingerprint={"model": "tiny"})
""").replace("PREFIX", repr(PREFIX))


def test_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(tmp_path, tiny_model_dir):
    n = 40
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.jsonl"
    part = partial_path(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(out), str(n)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if part.exists() and part.read_text().count("\n") >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "generation finished (or died) before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    complete = [json.loads(x) for x in part.read_text().split("\n")[:-1]]  # a torn last line is dropped
    assert 3 <= len(complete) < n

    records = run_resumable(make_engine(project_section("generation", batch_size=1), tiny_model_dir),
                            [Request(f"q{i:03d}", PREFIX, f"The quick brown fox {i}") for i in range(n)],
                            SamplingParams(max_new_tokens=16), out, fingerprint={"model": "tiny"})
    final = _lines(out)
    ids = [r["id"] for r in final]
    assert ids == [f"q{i:03d}" for i in range(n)]  # all present, once, in request order
    by_id = {r["id"]: r for r in final}
    assert all(by_id[r["id"]] == r for r in complete)  # nothing written before the kill was lost/redone
    assert records == final and not part.exists()
    # and the result equals an uninterrupted run
    fresh = run_resumable(make_engine(project_section("generation", batch_size=1), tiny_model_dir),
                          [Request(f"q{i:03d}", PREFIX, f"The quick brown fox {i}") for i in range(n)],
                          SamplingParams(max_new_tokens=16), tmp_path / "fresh.jsonl", fingerprint={"model": "tiny"})
    assert fresh == final


# ------------------------------------------------------------------------------- resume fingerprint
class DyingEngine(FakeEngine):
    """Answers ``"<tag> <id>"``; with ``die_after`` it raises after that many results (a killed run)."""

    def __init__(self, tag: str, die_after: int | None = None):
        super().__init__(lambda req: f"{tag} {req.id}")
        self.die_after = die_after

    def generate(self, requests, sampling):
        for i, res in enumerate(super().generate(requests, sampling)):
            if self.die_after is not None and i >= self.die_after:
                raise RuntimeError("engine killed")
            yield res


def _adapter(root: Path, name: str, seed: int) -> Path:
    """A directory holding an adapter weights file (what ``adapter_sha256`` hashes)."""
    import torch
    from safetensors.torch import save_file

    out = root / name
    out.mkdir()
    gen = torch.Generator().manual_seed(seed)
    save_file({"lora_A.weight": torch.randn(2, 8, generator=gen)}, str(out / "adapter_model.safetensors"))
    return out


def _killed_run(out: Path, reqs, sampling: SamplingParams, fingerprint, k: int = 3) -> list[dict]:
    with pytest.raises(RuntimeError, match="engine killed"):
        run_resumable(DyingEngine("old", die_after=k), reqs, sampling, out, fingerprint=fingerprint)
    assert not out.exists()
    old = _lines(partial_path(out))
    assert len(old) == k
    return old


CODE = ["selfalign.generation.runner"]


@pytest.mark.parametrize("change", ["temperature", "adapter"])
def test_resume_under_another_temperature_or_adapter_keeps_nothing_old(change, tiny_model_dir, tmp_path, caplog):
    gen = project_section("generation")
    reqs, out = _requests(6), tmp_path / "raw.jsonl"
    sampling = SamplingParams(temperature=0.7, seed=3)
    teacher = _adapter(tmp_path, "engraved-1", seed=1)
    _killed_run(out, reqs, sampling, generation_fingerprint(gen, tiny_model_dir, adapter_dir=teacher, code=CODE))
    if change == "temperature":
        sampling = dataclasses.replace(sampling, temperature=1.0)
    else:  # engrave re-ran: same path, new weights
        shutil.rmtree(teacher)
        teacher = _adapter(tmp_path, "engraved-1", seed=2)
    engine = DyingEngine("new")
    with caplog.at_level(logging.WARNING, logger="selfalign.generation.runner"):
        records = run_resumable(engine, reqs, sampling, out,
                                fingerprint=generation_fingerprint(gen, tiny_model_dir, adapter_dir=teacher, code=CODE))
    assert [r.id for r in engine.seen] == [r.id for r in reqs]  # everything generated again
    assert [r["text"] for r in records] == [f"new {r.id}" for r in reqs]
    assert ("sampling.temperature" if change == "temperature" else "adapter_sha256") in caplog.text
    assert not partial_path(out).exists() and not fingerprint_path(out).exists()


def test_resume_under_the_same_fingerprint_reuses_old_records(tiny_model_dir, tmp_path):
    gen = project_section("generation")
    reqs, out = _requests(6), tmp_path / "raw.jsonl"
    sampling = SamplingParams(temperature=0.7, seed=3)
    teacher = _adapter(tmp_path, "engraved", seed=1)
    old = _killed_run(out, reqs, sampling, generation_fingerprint(gen, tiny_model_dir, adapter_dir=teacher, code=CODE))
    engine = DyingEngine("new")
    # rebuilt from the same inputs (as a new process would): it matches, so the partial file is resumed
    records = run_resumable(engine, reqs, sampling, out,
                            fingerprint=generation_fingerprint(gen, tiny_model_dir, adapter_dir=teacher, code=CODE))
    assert [r.id for r in engine.seen] == [r.id for r in reqs[3:]]  # only the rest is generated
    assert records[:3] == old and [r["text"] for r in records[3:]] == [f"new {r.id}" for r in reqs[3:]]


def test_partial_without_fingerprint_or_with_edited_requests_is_discarded(tmp_path, caplog):
    reqs, out = _requests(4), tmp_path / "raw.jsonl"
    _killed_run(out, reqs, SamplingParams(), FP, k=2)
    fingerprint_path(out).unlink()  # what older code (or a kill before the sidecar existed) leaves
    engine = DyingEngine("new")
    with caplog.at_level(logging.WARNING, logger="selfalign.generation.runner"):
        run_resumable(engine, reqs, SamplingParams(), out, fingerprint=FP)
    assert len(engine.seen) == 4 and "no fingerprint" in caplog.text

    # upstream ids are positional: the same id with another prompt text must not resume
    out2 = tmp_path / "raw2.jsonl"
    _killed_run(out2, reqs, SamplingParams(), FP, k=2)
    edited = [Request(r.id, r.prefix, r.text + " (edited upstream)") if r.id == "q003" else r for r in reqs]
    engine = DyingEngine("new")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selfalign.generation.runner"):
        run_resumable(engine, edited, SamplingParams(), out2, fingerprint=FP)
    assert len(engine.seen) == 4 and "requests_sha256" in caplog.text


def test_fingerprint_follows_parser_source_model_content_and_context_policy(tiny_model_dir, tmp_path, monkeypatch):
    parser = tmp_path / "fp_probe_parser.py"
    parser.write_text("def parse(text):\n    return text\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    gen = project_section("generation")
    before = generation_fingerprint(gen, tiny_model_dir, code=["fp_probe_parser"])
    parser.write_text("def parse(text):\n    return text.strip()\n")
    after = generation_fingerprint(gen, tiny_model_dir, code=["fp_probe_parser"])
    assert before["code_sha256"] != after["code_sha256"]
    assert {**before, "code_sha256": None} == {**after, "code_sha256": None}  # nothing else moved
    assert before["engine"]["code_sha256"] == source_sha256(["selfalign.generation.attention", "selfalign.generation.hf",
                                                              "selfalign.generation.base", "selfalign.generation.encoding",
                                                              "selfalign.generation.sampling", "selfalign.models"])
    # performance knobs do not invalidate a partial file; the context policy does
    assert generation_fingerprint(gen.model_copy(update={"batch_size": 1, "score_token_budget": 64}), tiny_model_dir,
                                  code=["fp_probe_parser"]) == after
    assert generation_fingerprint(gen.model_copy(update={"overflow": "truncate_left"}), tiny_model_dir,
                                  code=["fp_probe_parser"]) != after
    # the model is identified by content, not by its path
    copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_identity(copy) == model_identity(tiny_model_dir)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_identity(copy) != model_identity(tiny_model_dir)


# config parsing and error types: they do not turn a request into a completion, so no engine's code list names them
_PLUMBING = {"selfalign.config", "selfalign.io"}


@pytest.mark.parametrize("engine", [
    "hf",
    "vllm",
    "openai",
])
def test_engine_code_names_exactly_the_modules_the_engine_imports(engine):
    """A stale entry (vLLM listing hf.py after it stopped importing it) re-keys caches for nothing; a missing
    one lets a resume reuse records made by other code. Function-level imports count (hf loads models lazily)."""
    from test_dvc_deps import imported_names, module_file

    from selfalign.generation.runner import ENGINE_CODE

    own = f"selfalign.generation.{engine}"
    imported = {n for n in imported_names(module_file(own)) if module_file(n) is not None}
    assert set(ENGINE_CODE[engine]) == {own} | (imported - _PLUMBING)
