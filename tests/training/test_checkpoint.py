"""Epoch selection on the held-out answers (selfalign.training.checkpoint): the rule on recorded curves, and
run_sft on the tiny model saving exactly the chosen epoch's adapter, reproducibly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sft_assets import PAIRS, SYSTEM, train_cfg

from selfalign.config import project_section
from selfalign.prompts.training import end_of_answer, training_prompt
from selfalign.training import checkpoint
from selfalign.training.checkpoint import select_epoch
from selfalign.training.data import SFTData, SFTExample
from selfalign.training.lora import TIMING_KEYS, run_sft

HELDOUT_PAIRS = [
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Is the sea blue?", "Yes, the sea is blue on a clear day."),
    ("Say a cat fact.", "Cats sleep for most of the day."),
]


# ----------------------------------------------------------------------------------------- the rule
def test_select_epoch_takes_the_lowest_trained_epoch_ties_to_the_earlier():
    assert select_epoch([3.0, 2.0, 1.5, 2.5], 3, "heldout_nll") == (2, checkpoint.LOWEST)
    assert select_epoch([3.0, 2.0, 1.5, 1.5], 3, "heldout_nll") == (2, checkpoint.LOWEST)  # tie: fewer updates
    assert select_epoch([3.0, 2.0, 1.9, 1.5], 3, "heldout_nll") == (3, checkpoint.LOWEST)


def test_select_epoch_never_picks_the_untrained_adapter_or_a_non_finite_score():
    assert select_epoch([1.0, 2.0, 3.0], 2, "heldout_nll") == (1, checkpoint.LOWEST)  # epoch 0 best: still 1
    assert select_epoch([3.0, math.nan, 2.5], 2, "heldout_nll") == (2, checkpoint.LOWEST)
    assert select_epoch([3.0, math.nan, math.inf], 2, "heldout_nll") == (2, checkpoint.NOT_FINITE)


def test_select_epoch_falls_back_to_the_last_epoch():
    assert select_epoch([], 3, "heldout_nll") == (3, checkpoint.NO_HELDOUT)
    assert select_epoch([3.0, 1.0, 2.0, 2.5], 3, "last") == (3, checkpoint.LAST)
    with pytest.raises(ValueError, match="select must be"):
        select_epoch([3.0, 1.0], 1, "best")


# ------------------------------------------------------------------------------------------ run_sft
def _data(tok, pairs, prefix) -> SFTData:
    return SFTData(examples=[SFTExample(f"{prefix}{i}", training_prompt(tok, q, system=SYSTEM), a)
                             for i, (q, a) in enumerate(pairs)], end_marker=end_of_answer(tok))


def _run(model_dir, tok, out, heldout=True, epochs=3, dropout=0.1, **kw) -> dict:
    """run_sft on the six pairs (LoRA dropout on: scoring must not disturb its random numbers)."""
    lora = project_section("lora", r=4, alpha=8, dropout=dropout)
    return run_sft(model_dir, _data(tok, PAIRS, "e"), lora, train_cfg(epochs=epochs, micro_batch_size=2, **kw),
                   out / "adapter", out / "metrics.json", out / "loss.csv", stage="t", dtype="float32",
                   heldout=_data(tok, HELDOUT_PAIRS, "h") if heldout else None, show_progress=False)


def _files(out) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((out / "adapter").iterdir())} | \
        {"loss.csv": (out / "loss.csv").read_bytes()}


def _saved(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture()
def scripted_curve(monkeypatch):
    """Replace the held-out scorer by a recorded curve (epoch k -> curve[k] for every answer) and record the
    model's LoRA weights after every epoch, to check which epoch's weights were saved."""
    from selfalign.training import heldout

    curve = [3.0, 2.0, 1.5, 2.5]
    calls, weights = [], {}

    def fake_nll(model, encoded, pad_id, batch_rows):
        epoch = len(calls)
        calls.append(epoch)
        weights[epoch] = {k.replace(".default", ""): v.detach().clone() for k, v in model.state_dict().items()
                          if "lora_" in k}
        return [curve[epoch]] * len(encoded)

    monkeypatch.setattr(heldout, "answer_nll", fake_nll)
    return curve, weights, calls


def test_the_saved_adapter_is_the_chosen_epochs_weights(tiny_model_dir, tiny_tokenizer, tmp_path, scripted_curve):
    curve, weights, _ = scripted_curve
    m = _run(tiny_model_dir, tiny_tokenizer, tmp_path)
    assert (m["select"], m["best_epoch"], m["select_reason"]) == ("heldout_nll", 2, checkpoint.LOWEST)
    assert m["heldout_nll_by_epoch"] == curve and sorted(weights) == [0, 1, 2, 3]
    saved = _saved(tmp_path)
    assert saved.keys() == weights[2].keys()
    assert all(torch.equal(saved[k], weights[2][k]) for k in saved)
    assert any(not torch.equal(weights[2][k], weights[3][k]) for k in saved)  # the last epoch differs
    # the adapter directory records the choice (no timings: it is a DVC output)
    resolved = json.loads((tmp_path / "adapter" / "training_config.json").read_text())
    assert resolved["metrics"]["best_epoch"] == 2 and resolved["train"]["select"] == "heldout_nll"
    assert not set(TIMING_KEYS) & set(resolved["metrics"]) and m["heldout_scoring_s"] >= 0


def test_selecting_an_earlier_epoch_is_byte_identical_run_to_run(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                  scripted_curve):
    _, _, calls = scripted_curve
    for name in ("a", "b"):
        calls.clear()  # the scripted curve restarts at epoch 0
        assert _run(tiny_model_dir, tiny_tokenizer, tmp_path / name)["best_epoch"] == 2
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_select_last_trains_and_saves_exactly_what_a_run_without_scoring_does(tiny_model_dir, tiny_tokenizer,
                                                                               tmp_path):
    """Held-out scoring after every epoch (real scorer, dropout on) changes no step: ``select: last`` saves the
    bytes of a run that scores nothing, and records the curve."""
    scored = _run(tiny_model_dir, tiny_tokenizer, tmp_path / "scored", select="last")
    plain = _run(tiny_model_dir, tiny_tokenizer, tmp_path / "plain", heldout=False, select="last")
    files = {name: _files(tmp_path / name) for name in ("scored", "plain")}
    configs = {name: json.loads(files[name].pop("training_config.json")) for name in files}
    assert files["scored"] == files["plain"]  # adapter weights, adapter config, loss curve
    assert configs["scored"]["metrics"].pop("heldout_nll_by_epoch") == scored["heldout_nll_by_epoch"]
    configs["plain"]["metrics"].pop("heldout_nll_by_epoch")
    assert configs["scored"] == configs["plain"]
    assert (scored["best_epoch"], scored["select_reason"]) == (3, checkpoint.LAST)
    assert len(scored["heldout_nll_by_epoch"]) == 4 and all(math.isfinite(v) for v in scored["heldout_nll_by_epoch"])
    assert plain["heldout_nll_by_epoch"] == [] and plain["heldout_scoring_s"] == 0
    timing = {"tokens_per_s", "train_time_s", "wall_time_s", "heldout_scoring_s", "heldout_nll_by_epoch"}
    assert {k: v for k, v in scored.items() if k not in timing} == {k: v for k, v in plain.items() if k not in timing}


def test_no_heldout_answers_save_the_last_epoch_and_say_why(tiny_model_dir, tiny_tokenizer, tmp_path):
    empty = _run(tiny_model_dir, tiny_tokenizer, tmp_path / "empty", heldout=False, epochs=2)
    last = _run(tiny_model_dir, tiny_tokenizer, tmp_path / "last", heldout=False, epochs=2, select="last")
    assert (empty["best_epoch"], empty["select_reason"]) == (2, checkpoint.NO_HELDOUT)
    assert empty["heldout_nll_by_epoch"] == []
    assert _saved(tmp_path / "empty").keys() == _saved(tmp_path / "last").keys()
    assert all(torch.equal(a, b) for a, b in zip(_saved(tmp_path / "empty").values(),
                                                  _saved(tmp_path / "last").values()))


def test_real_scores_pick_an_earlier_epoch_reproducibly_and_cost_little(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                        capsys):
    """The real scorer on the tiny model at a high learning rate, where the held-out NLL is lowest after epoch 3
    of 5 and clearly higher after epochs 4-5 (recorded: 6.20 | 6.53 5.70 5.68 6.00 6.05): that epoch is saved,
    not the last, twice the same bytes. The scoring time is printed (issue 20: it must stay cheap)."""
    fast = dict(learning_rate=1e-1, epochs=5)
    a = _run(tiny_model_dir, tiny_tokenizer, tmp_path / "a", **fast)
    b = _run(tiny_model_dir, tiny_tokenizer, tmp_path / "b", **fast)
    last = _run(tiny_model_dir, tiny_tokenizer, tmp_path / "last", select="last", **fast)
    curve = a["heldout_nll_by_epoch"]
    assert len(curve) == 6 and a["best_epoch"] == min(range(1, 6), key=lambda k: (curve[k], k))
    assert a["best_epoch"] < 5 and min(curve[4:]) > curve[a["best_epoch"]] + 0.1  # overfitting after the best
    assert _files(tmp_path / "a") == _files(tmp_path / "b") and curve == b["heldout_nll_by_epoch"]
    assert last["heldout_nll_by_epoch"] == curve  # the same training, another saved epoch
    saved, final = _saved(tmp_path / "a"), _saved(tmp_path / "last")
    assert any(not torch.equal(saved[k], final[k]) for k in saved)
    with capsys.disabled():
        print(f"\n[held-out scoring] {len(HELDOUT_PAIRS)} answers x {len(curve)} scorings: "
              f"{a['heldout_scoring_s']:.3f} s in all vs {a['train_time_s']:.3f} s training; best epoch "
              f"{a['best_epoch']}; curve {[round(v, 3) for v in curve]}")
