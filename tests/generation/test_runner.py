"""Resumable runner: per-result fsync'd appends, skip done ids, atomic final file, SIGKILL-safe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fakes import FakeEngine

from selfalign.config import GenerationConfig
from selfalign.generation import make_engine
from selfalign.generation.base import Request, SamplingParams
from selfalign.generation.runner import partial_path, run_resumable

PREFIX = "User: What is the capital of France?\n\nAssistant: "


def _requests(n: int) -> list[Request]:
    return [Request(f"q{i:03d}", PREFIX, f"The quick brown fox {i}") for i in range(n)]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_runner_writes_final_in_request_order_and_removes_partial(tmp_path):
    reqs = list(reversed(_requests(5)))
    engine = FakeEngine(lambda r: r.text.upper())
    out = tmp_path / "out.jsonl"
    records = run_resumable(engine, reqs, SamplingParams(), out,
                            make_record=lambda q, r: {"id": q.id, "answer": r.text, "finish": r.finish})
    assert [r["id"] for r in records] == [r.id for r in reqs]
    assert _lines(out) == records
    assert records[0]["answer"] == reqs[0].text.upper()
    assert not partial_path(out).exists()


def test_runner_resumes_skipping_done_ids_and_torn_tail(tmp_path):
    reqs = _requests(6)
    out = tmp_path / "out.jsonl"
    part = partial_path(out)
    done = {"id": "q001", "text": "from before", "finish": "stop", "prompt_tokens": 1, "completion_tokens": 2,
            "truncated_tokens": 0}
    part.write_text(json.dumps(done) + "\n" + '{"id": "q002", "text": "torn')  # killed mid-write
    engine = FakeEngine(lambda r: "new")
    records = run_resumable(engine, reqs, SamplingParams(), out)
    assert [r.id for r in engine.seen] == [r.id for r in reqs if r.id != "q001"]
    assert records[1] == done
    assert [r["id"] for r in _lines(out)] == [r.id for r in reqs]


def test_runner_rejects_duplicate_ids_and_foreign_records(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        run_resumable(FakeEngine(["x"]), _requests(2) * 2, SamplingParams(), tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match="keep id"):
        run_resumable(FakeEngine(["x"]), _requests(2), SamplingParams(), tmp_path / "b.jsonl",
                      make_record=lambda q, r: {"id": "other"})


SCRIPT = textwrap.dedent("""
    import sys
    from selfalign.config import GenerationConfig
    from selfalign.generation import make_engine
    from selfalign.generation.base import Request, SamplingParams
    from selfalign.generation.runner import run_resumable
    model_dir, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reqs = [Request(f"q{i:03d}", PREFIX, f"The quick brown fox {i}") for i in range(n)]
    engine = make_engine(GenerationConfig(batch_size=1), model_dir)
    run_resumable(engine, reqs, SamplingParams(max_new_tokens=16), out)
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

    records = run_resumable(make_engine(GenerationConfig(batch_size=1), tiny_model_dir),
                            [Request(f"q{i:03d}", PREFIX, f"The quick brown fox {i}") for i in range(n)],
                            SamplingParams(max_new_tokens=16), out)
    final = _lines(out)
    ids = [r["id"] for r in final]
    assert ids == [f"q{i:03d}" for i in range(n)]  # all present, once, in request order
    by_id = {r["id"]: r for r in final}
    assert all(by_id[r["id"]] == r for r in complete)  # nothing written before the kill was lost/redone
    assert records == final and not part.exists()
    # and the result equals an uninterrupted run
    fresh = run_resumable(make_engine(GenerationConfig(batch_size=1), tiny_model_dir),
                          [Request(f"q{i:03d}", PREFIX, f"The quick brown fox {i}") for i in range(n)],
                          SamplingParams(max_new_tokens=16), tmp_path / "fresh.jsonl")
    assert fresh == final
