"""A tiny tokenizer that HAS a BOS, Gemma-style: its post-processor puts ``<s>`` in front of every
encoded text while ``add_bos_token`` need not say so, and its chat template writes ``{{ bos_token }}``
itself and refuses a system role. The shared fixtures' ChatML tokenizer (SmolLM2-like) adds no BOS, so
without this one nothing would show a missing or doubled BOS."""

from __future__ import annotations

from conftest import TINY_CORPUS

BOS, EOS, PAD = "<s>", "<eos>", "<pad>"

GEMMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def build_bos_tokenizer(chat_template: str | None = GEMMA_LIKE):
    """Byte-level BPE (vocab ~400) whose post-processor adds ``<s>``; ``chat_template=None``: a base model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, EOS, BOS, "<start_of_turn>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=PAD)
    fast.chat_template = chat_template
    return fast


def build_bos_model(tok, seed: int = 0):
    """The shared tiny random Llama, its special-token ids set to this tokenizer's (BOS 2, eos 1)."""
    from conftest import build_tiny_model

    model = build_tiny_model(len(tok), seed=seed)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return model
