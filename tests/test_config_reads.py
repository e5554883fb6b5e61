"""Every param a stage reads at run time is declared in that stage's dvc.yaml ``params:``.

tests/test_dvc_deps.py scans the stage module's own ``config.<section>.<field>`` chains; reads inside the
helpers a stage calls (the prompter, the filters, the training loop) and through aliases escape that scan.
Here each stage runs for real in a small configuration under :func:`selfalign.config.record_reads`, and
every dotted key it read must be covered by a declared key (equal, or a declared section above it).

Covered: red_team (scripted completions), engrave (tiny model, 1 epoch), evaluate@prompted (tiny model with
a long context: the ~5k-token preamble), track (a real MLflow sqlite store), fetch_benchmarks (the mirror).
Not run here: self_align, verbose_clone, judge, evaluate's other variants, evaluate_report, prepare_model
(their own-module reads are still checked by tests/test_dvc_deps.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from selfalign.config import parse_config, record_reads

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    """A test module by file (tests/stages/ is not a package: its helpers are reused, not copied)."""
    spec = importlib.util.spec_from_file_location(f"_reads_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DEPS = _load(ROOT / "tests" / "test_dvc_deps.py")


def undeclared(stage: str, reads: set[str]) -> list[str]:
    keys = DEPS._param_keys(DEPS.STAGES[stage]["params"])
    return sorted(r for r in reads if not any(r == k or r.startswith(k + ".") for k in keys))


def test_recording_sees_reads_through_helpers_and_copies(config):
    """The mechanism: leaf reads reached from a Config, through an alias and a model_copy, are recorded."""
    with record_reads() as reads:
        ev = config.evaluate
        _ = ev.judge.openai.base_url
        gen = config.generation.model_copy(update={"engine": "hf"})
        _ = gen.batch_size, gen.engine  # engine was set by code, not read from params.yaml
    assert reads == {"evaluate.judge.openai.base_url", "generation.batch_size"}
    assert undeclared("judge", {"evaluate.judge.openai.base_url", "evaluate.prompted_thought_tokens"}) == \
        ["evaluate.prompted_thought_tokens"]


@pytest.mark.slow
def test_red_team_reads_only_declared_params(params_data, project_root, tmp_path, tiny_model_dir):
    from fakes import FakeEngine
    from red_team_assets import write_annotation, write_benchmarks

    rt_tests = _load(ROOT / "tests" / "stages" / "test_red_team.py")
    with record_reads() as reads:
        config = rt_tests.make_config(params_data, project_root, *write_annotation(tmp_path))
        rt_tests.run_stage(config, tmp_path, tiny_model_dir, write_benchmarks(tmp_path / "bench"),
                           FakeEngine(rt_tests.respond))
    assert "red_team.rouge_threshold" in reads  # the filters' reads, not only the stage module's
    assert not undeclared("red_team", reads)


@pytest.mark.slow
def test_engrave_reads_only_declared_params(params_data, project_root, tmp_path, tiny_model_dir):
    from selfalign.io import write_jsonl
    from selfalign.stages import engrave

    eg_tests = _load(ROOT / "tests" / "stages" / "test_engrave.py")
    params_data["engrave"]["system_prompt_file"] = str(project_root / "principles/assistant.md")
    params_data["engrave"]["train"].update(epochs=1, micro_batch_size=2, warmup_steps=0, max_length=512)
    params_data["lora"].update(r=4, alpha=4)
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    write_jsonl(train, eg_tests.EXAMPLES)
    write_jsonl(heldout, eg_tests.HELDOUT)
    with record_reads() as reads:
        engrave.run(parse_config(params_data), train, tiny_model_dir, tmp_path / "out", tmp_path / "m.json",
                    tmp_path / "p.csv", heldout_path=heldout, heldout_nll_path=tmp_path / "nll.jsonl")
    assert "engrave.train.learning_rate" in reads and "model.dtype" in reads
    assert not undeclared("engrave", reads)


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory) -> Path:
    """The tiny random Llama with room for the prompted variant's preamble (as tests/test_e2e_pipeline.py)."""
    from conftest import build_tiny_model, build_tiny_tokenizer

    out = tmp_path_factory.mktemp("tiny-long")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok))
    model.config.max_position_embeddings = 8192
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_evaluate_prompted_reads_only_declared_params(params_data, long_context_model, small_bench, tmp_path):
    from selfalign.stages import evaluate

    ev = params_data["evaluate"]
    ev.update(limit=2, bootstrap_iters=50)
    ev["vicuna"].update(per_category=1, max_new_tokens=4)
    ev["probes"].update(max_new_tokens=4)
    ev["prompted_thought_tokens"] = 4
    with record_reads() as reads:
        evaluate.run(parse_config(params_data), "prompted", str(long_context_model), None, str(small_bench),
                     str(ROOT / "eval" / "tasks"), str(tmp_path / "prompted.json"), str(tmp_path / "samples"))
    assert "evaluate.prompted_thought_tokens" in reads and "self_align.template_file" in reads
    assert not undeclared("evaluate@prompted", reads)


@pytest.mark.slow
def test_track_reads_only_declared_params(params_data, tmp_path, monkeypatch):
    tr_tests = _load(ROOT / "tests" / "stages" / "test_track.py")
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/store/mlflow.db")
    root = tmp_path / "ws"
    tr_tests._workspace(root, params_data)
    with record_reads() as reads:
        tr_tests._run(parse_config(params_data), root, headline_path="eval/headline.json")
    assert any(r.startswith("tracking.") for r in reads)
    assert not undeclared("track", reads)


def test_fetch_benchmarks_reads_only_declared_params(config, benchmarks_dir, tmp_path, monkeypatch):
    from selfalign.stages import fetch_benchmarks

    monkeypatch.setenv(config.benchmarks.dir_env, str(benchmarks_dir))
    with record_reads() as reads:
        fetch_benchmarks.run(config, str(tmp_path / "out"))
    assert "benchmarks.expected_counts" in reads
    assert not undeclared("fetch_benchmarks", reads)
