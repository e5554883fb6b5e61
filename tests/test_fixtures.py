"""The tiny model fixture is a real, loadable checkpoint that generates text."""

import torch


def test_tiny_model_roundtrip(tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer("User: What is the capital of France?", return_tensors="pt").input_ids
    assert ids.shape[1] > 3
    with torch.no_grad():
        out = tiny_model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    assert tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
