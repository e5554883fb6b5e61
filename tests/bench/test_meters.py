"""Benchmark meters: the analytic FLOP count adds up."""

from __future__ import annotations

from selfalign.bench.meters import ModelShape, engine_flops


def test_engine_flops_counts_prefix_once_and_rows(tiny_model):
    shape = ModelShape.of(tiny_model)
    cfg = tiny_model.config
    per_layer = 2 * cfg.hidden_size * cfg.hidden_size + 2 * cfg.hidden_size * 32 + 3 * cfg.hidden_size * cfg.intermediate_size
    assert shape.linear_params == cfg.num_hidden_layers * per_layer
    assert shape.head_params == cfg.vocab_size * cfg.hidden_size
    only_prefix = engine_flops(shape, 11, [])
    assert only_prefix == sum(shape.token_flops(p, False) for p in range(10))
    one_row = engine_flops(shape, 11, [(3, 4)]) - only_prefix
    expected = (shape.token_flops(10, False) + shape.token_flops(11, False) + shape.token_flops(12, True)
                + sum(shape.token_flops(13 + i, True) for i in range(3)))
    assert one_row == expected
