"""What the recipe trains on (selfalign.training.data): the loss mask, truncation and the train.limit selection."""

from __future__ import annotations

import pytest
from sft_assets import SYSTEM, train_cfg

from selfalign.prompts.training import end_of_answer, training_prompt
from selfalign.training.data import IGNORE_INDEX, SFTData, SFTExample, encode_example


# ---------------------------------------------------------------------------------------- masking


def test_loss_mask_covers_exactly_the_answer_and_end_marker(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = training_prompt(tok, "What is the capital of France?", system=SYSTEM)
    answer = "The capital of France is Paris."
    marker = end_of_answer(tok)
    assert marker == "<|im_end|>" == tok.eos_token
    enc = encode_example(tok, "a", prompt, answer, marker, max_length=256)
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert all(t != IGNORE_INDEX for t in enc.labels[n_prompt:])
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert tok.decode(enc.labels[n_prompt:]) == answer + marker
    assert enc.labels[-1] == tok.eos_token_id  # the model is taught to stop
    assert tok.decode(enc.input_ids[:n_prompt]) == prompt


def test_truncation_keeps_prompt_and_drops_unanswerable(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = training_prompt(tok, "Hello!", system=SYSTEM)
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    enc = encode_example(tok, "a", prompt, "word " * 200, "<|im_end|>", max_length=n_prompt + 5)
    assert len(enc.input_ids) == n_prompt + 5 and enc.n_answer == 5
    assert encode_example(tok, "b", prompt, "hi", "<|im_end|>", max_length=n_prompt) is None


# ------------------------------------------------------------------------------------------ limit


def _limit_data(n_plain: int = 10, n_identity: int = 3) -> SFTData:
    plain = [SFTExample(f"p{i}", f"q{i}", f"a{i}") for i in range(n_plain)]
    identity = [SFTExample(f"identity-{i:03d}", f"who{i}", f"me{i}") for i in range(n_identity)]
    return SFTData(examples=plain + identity, end_marker="</s>",
                   always_train=frozenset(ex.id for ex in identity))


def test_limit_keeps_every_identity_example_and_samples_the_rest_by_seed():
    from selfalign.training.data import select_examples

    data = _limit_data()
    picked = select_examples(data, 4, seed=0)
    ids = [ex.id for ex in picked]
    assert ids[-3:] == ["identity-000", "identity-001", "identity-002"]  # the file's tail, never dropped
    plain = ids[:-3]
    assert len(plain) == 4 and plain == sorted(plain, key=lambda i: int(i[1:]))  # file order kept
    assert [ex.id for ex in select_examples(data, 4, seed=0)] == ids  # deterministic
    # a seeded sample of the non-identity rows, not the head of the file
    samples = {tuple(ex.id for ex in select_examples(data, 4, seed=s))[:-3] for s in range(5)}
    assert len(samples) > 1 and any(sample != ("p0", "p1", "p2", "p3") for sample in samples)
    assert select_examples(data, None, seed=0) == list(data.examples)
    assert select_examples(data, 50, seed=0) == list(data.examples)


def test_limit_zero_is_an_error_not_all(params_data):
    from selfalign.config import ConfigError, parse_config
    from selfalign.training.data import select_examples

    params_data["engrave"]["train"]["limit"] = 0
    with pytest.raises(ConfigError, match=r"params.yaml: engrave.train.limit: expected a number >= 1, got 0"):
        parse_config(params_data)
    unchecked = train_cfg().model_copy(update={"limit": 0})  # a config built in code, past validation
    with pytest.raises(ConfigError, match="train.limit"):
        select_examples(_limit_data(), unchecked.limit, seed=0)
