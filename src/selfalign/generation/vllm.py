"""vLLM engine (GPU): prefix caching on, tensor parallel from params, LoRA adapters per request.

Optional: ``pip install .[vllm]``. Nothing imports :mod:`vllm` until this engine is built, so CPU
installs never need it; building it without vLLM installed raises a one-line :class:`UserError`.

Sampling mapping: seeds are per request (``row_seed``), temperature/top-p/stop/max-tokens map directly,
``logit_bias`` token strings become ids through the tokenizer. vLLM has no per-order n-gram penalty:
order 1 maps to vLLM's ``frequency_penalty`` (the same rule: coefficient x count of the token in the
generated text); higher orders are ignored with a warning (outputs then differ from the HF engine's).
Scoring (:meth:`VLLMEngine.loglikelihood`, called through :func:`selfalign.generation.scoring.loglikelihood_pairs`)
uses ``prompt_logprobs`` with lm-eval HFLM's tokenisation (:mod:`selfalign.generation.encoding`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Sequence

from selfalign.config import GenerationConfig
from selfalign.generation.base import Request, Result, SamplingParams, resolve_logit_bias, row_seed
from selfalign.generation.encoding import hflm_encode_pair

log = logging.getLogger(__name__)


class VLLMEngine:
    name = "vllm"

    def __init__(self, gen: GenerationConfig, model_dir: str | Path, adapter_dir: str | Path | None = None,
                 dtype: str = "float32", trust_remote_code: bool = False):
        from selfalign.io import UserError

        try:
            import vllm
        except ImportError:
            raise UserError("generation.engine is 'vllm' but vllm is not installed "
                            "(pip install '.[vllm]' on a GPU machine, or use engine: hf)") from None
        self._vllm = vllm
        self.gen = gen
        self.llm = vllm.LLM(
            model=str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code, enable_prefix_caching=True,
            tensor_parallel_size=gen.vllm.tensor_parallel_size,
            gpu_memory_utilization=gen.vllm.gpu_memory_utilization,
            max_model_len=gen.vllm.max_model_len or gen.max_context,
            enable_lora=adapter_dir is not None,
        )
        self.tok = self.llm.get_tokenizer()
        self.lora = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(adapter_dir))

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def _params(self, sampling: SamplingParams, rid: str):
        bias = resolve_logit_bias(self.tok, sampling.logit_bias)
        pens = tuple(sampling.ngram_penalties)
        if any(pens[1:]):
            log.warning("vllm engine: n-gram penalties of order >= 2 are not supported and are ignored")
        return self._vllm.SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None, seed=row_seed(sampling.seed, rid) % (2**31 - 1),
            logit_bias=bias or None, frequency_penalty=pens[0] if pens else 0.0,
        )

    def generate(self, requests: Sequence[Request], sampling: SamplingParams) -> Iterator[Result]:
        """All requests in one ``LLM.generate`` call (vLLM schedules and caches shared prefixes)."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=self._encode(r.prefix) + self._encode(r.text)) for r in requests]
        params = [self._params(sampling, r.id) for r in requests]
        outs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        for req, out in zip(requests, outs):
            c = out.outputs[0]
            yield Result(id=req.id, text=c.text, finish="length" if c.finish_reason == "length" else "stop",
                         prompt_tokens=len(out.prompt_token_ids), completion_tokens=len(c.token_ids))

    def loglikelihood(self, context: str, continuations: Sequence[str]) -> list[tuple[float, bool]]:
        """(sum log-prob, is_greedy) per continuation with lm-eval HFLM's context/continuation split."""
        from vllm.inputs import TokensPrompt

        pairs = [hflm_encode_pair(self.tok, context, c) for c in continuations]
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ctx + cont) for ctx, cont in pairs], params,
                                 lora_request=self.lora, use_tqdm=False)
        res = []
        for (ctx, cont), out in zip(pairs, outs):
            total, greedy = 0.0, True
            for pos, tid in zip(range(len(ctx), len(ctx) + len(cont)), cont):
                entry = out.prompt_logprobs[pos][tid]
                total += entry.logprob
                greedy = greedy and entry.rank == 1
            res.append((total, greedy))
        return res
