"""Fixtures for the evaluation stages: ``evaluate`` run once per session on the tiny model (base and a
LoRA variant), whose outputs the ``evaluate``, ``judge`` and ``evaluate_report`` stage tests read."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A random (non-zero) LoRA on the tiny model, saved as a PEFT adapter directory."""
    from peft import LoraConfig, get_peft_model

    from selfalign.models import load_model

    out = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_config():
    """params.yaml with a 2-item evaluation, every part enabled (paper-style MC is off in the CPU default)."""
    import yaml

    from selfalign.config import parse_config

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    ev = data["evaluate"]
    ev.update(limit=2, bootstrap_iters=200)
    ev["paper"].update(enabled=True, limit=2)
    ev["vicuna"].update(per_category=1, max_new_tokens=6)
    ev["probes"].update(max_new_tokens=4)
    return parse_config(data)


@pytest.fixture(scope="session")
def evaluated(small_config, tiny_model_dir, tiny_adapter, small_bench, tmp_path_factory):
    """``evaluate`` for base and engraved: (output root with results/ and samples/, results per variant)."""
    from selfalign.stages.evaluate import run

    out = tmp_path_factory.mktemp("eval")
    results = {}
    for variant, adapter in (("base", None), ("engraved", str(tiny_adapter))):
        results[variant] = run(small_config, variant, str(tiny_model_dir), adapter, str(small_bench),
                               str(ROOT / "eval" / "tasks"), str(out / "results" / f"{variant}.json"),
                               str(out / "samples" / variant))
    return out, results
