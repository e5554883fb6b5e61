"""Same params + same seed -> byte-identical stage outputs.

Each generating stage (red_team, self_align, verbose_clone) runs twice from scratch on a tiny random
model, with sampling on (temperature > 0), each time into a new empty directory with a new engine
(no raw cache, no partial file to resume), and every data JSONL it writes must be identical byte
for byte. Metrics are not compared: they hold wall-clock times.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from conftest import build_tiny_model, build_tiny_tokenizer

from selfalign.config import parse_config
from selfalign.io import read_jsonl, write_jsonl
from selfalign.schemas import Prompt
from selfalign.stages import red_team, self_align, verbose_clone

PROMPTS = [
    Prompt(id="si-1", text="Explain how a rainbow forms.", source="self_instruct"),
    Prompt(id="si-2", text="Summarise this text.", input="The quick brown fox jumps over the lazy dog.",
           source="self_instruct"),
    Prompt(id="rt-1", text="Who will win the next football world cup?", source="red_team", type="future_events",
           topic="Sports"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny random Llama with an 8k context: the self-align preamble is ~5k tiny-tokenizer tokens."""
    out = tmp_path_factory.mktemp("tiny-long")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok))
    model.config.max_position_embeddings = 8192
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engraved_dir(model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) weights: a teacher that differs from the base model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    out = tmp_path_factory.mktemp("engraved")
    peft.save_pretrained(out)
    return out


@pytest.fixture()
def params(params_data, project_root) -> dict:
    """The project params with annotation paths made absolute and everything small."""
    p = params_data
    p["generation"].update(batch_size=4, num_threads=1)
    rt = p["red_team"]
    for key in ("seed_tasks_file", "types_file", "self_instruct_template", "topic_template", "question_template"):
        rt[key] = str(project_root / rt[key])
    rt.update(self_instruct_requests=3, max_new_tokens=16, topic_rounds=1, topic_prompts_per_type=1,
              topic_max_new_tokens=12, max_topics_per_type=2, balance_topics=False, question_per_pair=True,
              new_hints=2, question_max_new_tokens=12)
    sa = p["self_align"]
    for key in ("principles_file", "exemplars_file", "template_file", "persona_file", "identity_file"):
        sa[key] = str(project_root / sa[key])
    # the tiny tokenizer has no single "Sorry" token: bias one it has
    sa.update(limit=None, max_new_tokens=12, min_answer_chars=0, logit_bias={"<|endoftext|>": -100.0})
    p["engrave"]["system_prompt_file"] = str(project_root / p["engrave"]["system_prompt_file"])
    vc = p["verbose_clone"]
    vc.update(prompt_file=str(project_root / vc["prompt_file"]), identity_file=str(project_root / vc["identity_file"]),
              limit=None, max_new_tokens=12, min_chars=0)
    vc["train"].update(epochs=1, micro_batch_size=4, grad_accum_steps=1, warmup_steps=0, max_length=512)
    p["lora"].update(r=4, alpha=4)
    assert rt["temperature"] > 0 and rt["topic_temperature"] > 0 and sa["temperature"] > 0 and vc["temperature"] > 0
    return p


def _data(out: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl"))}
    assert files, f"{out}: the stage wrote no JSONL"
    return files


def _twice(tmp_path: Path, run_once: Callable[[Path], Path]) -> dict[str, bytes]:
    """Run into two fresh directories; assert every JSONL is byte-identical; return run a's files."""
    a, b = _data(run_once(tmp_path / "a")), _data(run_once(tmp_path / "b"))
    assert a.keys() == b.keys()
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, f"outputs differ between two identical runs: {differ}"
    return a


def _bench(root: Path) -> Path:
    write_jsonl(root / "truthfulqa" / "mc.jsonl", [{"id": "tqa-0", "question": "Why do knuckles crack?"}])
    write_jsonl(root / "hhh" / "honest.jsonl", [{"id": "hhh-0", "input": "Who was the sixth US president?"}])
    write_jsonl(root / "vicuna" / "questions.jsonl", [{"id": "v-1", "text": "How can I sleep better?"}])
    return root


def test_red_team_twice_from_scratch_is_byte_identical(params, model_dir, tmp_path):
    config = parse_config(params)
    bench = _bench(tmp_path / "benchmarks")

    def run_once(out: Path) -> Path:
        red_team.run(config, model_dir, bench, out, out / "raw", out / "metrics.json")
        return out

    _twice(tmp_path, run_once)
    raw_a, raw_b = _data(tmp_path / "a" / "raw"), _data(tmp_path / "b" / "raw")
    assert raw_a == raw_b  # the raw cache files too: same names (fingerprints) and contents
    completions = [r["completion"] for name in raw_a for r in read_jsonl(tmp_path / "a" / "raw" / name)]
    assert len(completions) >= 3 + 20 and any(completions)  # self-instruct + one brainstorm per type


def test_self_align_twice_from_scratch_is_byte_identical(params, model_dir, tmp_path):
    config = parse_config(params)
    prompts = tmp_path / "all.jsonl"
    write_jsonl(prompts, PROMPTS)

    def run_once(out: Path) -> Path:
        self_align.run(config, prompts, model_dir, out, out / "metrics.json", out / "citations.csv")
        return out

    files = _twice(tmp_path, run_once)
    assert {"raw.jsonl", "train.jsonl", "rejects.jsonl"} <= files.keys()
    assert any(r["output"] for r in read_jsonl(tmp_path / "a" / "raw.jsonl"))


def test_verbose_clone_twice_from_scratch_is_byte_identical(params, model_dir, engraved_dir, tmp_path):
    config = parse_config(params)
    prompts = tmp_path / "all.jsonl"
    write_jsonl(prompts, PROMPTS)

    def run_once(out: Path) -> Path:
        verbose_clone.run(config, prompts, model_dir, engraved_dir, out / "data", out / "model",
                          out / "metrics.json", out / "loss.csv")
        return out / "data"

    files = _twice(tmp_path, run_once)
    assert {"raw.jsonl", "train.jsonl", "rejects.jsonl"} <= files.keys()
    raw = list(read_jsonl(tmp_path / "a" / "data" / "raw.jsonl"))
    assert any(r["output"] for r in raw) and raw[0]["generator"]["adapter_sha256"]


# ------------------------------------------------------------------------ red_team's raw cache key
def test_red_team_raw_cache_is_keyed_by_parser_code_engine_and_annotation_files(params, tiny_model_dir, tmp_path):
    """The persisted raw cache is reused only under the code and files that wrote it: an edit to a
    template / annotation file (even one that renders the same requests) or to the parsing module or
    the engine changes every file name, so a later run regenerates instead of parsing stale text."""
    import shutil

    from fakes import FakeEngine

    from selfalign.generation.runner import ENGINE_CODE, source_sha256

    types = tmp_path / "types.yaml"
    shutil.copy(params["red_team"]["types_file"], types)
    params["red_team"]["types_file"] = str(types)
    config = parse_config(params)
    fp = red_team._raw_fingerprint(config, tiny_model_dir)
    assert fp["code_sha256"] == source_sha256(red_team.PARSING_CODE)  # stage, parsers, raw-record builder
    assert fp["engine"]["code_sha256"] == source_sha256(ENGINE_CODE[config.generation.engine])
    assert set(fp["files_sha256"]) == {"seed_tasks_file", "types_file", "self_instruct_template", "topic_template",
                                       "question_template"}

    bench, out = _bench(tmp_path / "benchmarks"), tmp_path / "out"

    def run(engine: FakeEngine) -> set[str]:
        red_team.run(config, tiny_model_dir, bench, out, out / "raw", out / "metrics.json",
                     engine_factory=lambda: engine)
        return {p.name for p in (out / "raw").iterdir()}

    first = run(FakeEngine(lambda req: " A short continuation.\n"))
    again = FakeEngine(lambda req: " A short continuation.\n")
    assert run(again) == first and again.seen == []  # unchanged: every phase read back from the cache
    types.write_text(types.read_text() + "\n# a comment: the same types, the same rendered requests\n")
    config = parse_config(params)
    edited = FakeEngine(lambda req: " A short continuation.\n")
    assert not run(edited) & first and edited.seen  # regenerated; the old files pruned
