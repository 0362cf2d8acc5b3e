"""Prompt log-prob scoring with the vLLM engine (docs/DESIGN.md, stage one).

Two paths, the fastest available is used:
- `token_id_rows` (GPU, V2 model runner): `prompt_logprob_start` + `prompt_logprob_token_ids`
  computes logits only for the response rows and returns one NumPy array per request;
- `flat_prompt_logprobs` (elsewhere): `prompt_logprobs=0` with `flat_logprobs=True`; the actual
  token's log-prob is always included, one entry per position.
"""

from __future__ import annotations

import os

import numpy as np

from treg_data.scorers import EngineOptions, ScoreRequest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


class VLLMScorer:
    def __init__(self, options: EngineOptions):
        from vllm import LLM, SamplingParams

        self._sampling_params = SamplingParams
        self.llm = LLM(
            model=options.model,
            revision=options.revision,
            dtype=options.dtype,
            max_model_len=options.max_model_len,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            enforce_eager=options.enforce_eager,
            seed=options.seed,
            enable_prefix_caching=False,  # prompt-logprob requests never read it
        )
        config = self.llm.llm_engine.vllm_config
        has_rows = hasattr(SamplingParams, "prompt_logprob_token_ids")  # vLLM >= 0.32
        uses_v2 = getattr(config, "use_v2_model_runner", False)
        self.scoring_path = "token_id_rows" if has_rows and uses_v2 else "flat_prompt_logprobs"

    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=prefix + response) for prefix, response in requests]
        if self.scoring_path == "token_id_rows":
            params = [self._row_params(prefix, response) for prefix, response in requests]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            return [out.prompt_token_id_logprobs[:, 0].astype(np.float32) for out in outputs]
        params = self._sampling_params(max_tokens=1, prompt_logprobs=0, flat_logprobs=True, detokenize=False)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [flat_response_logprobs(out.prompt_logprobs, prefix, response)
                for (prefix, response), out in zip(requests, outputs)]

    def close(self) -> None:
        """Stop the engine processes now rather than at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()

    def _row_params(self, prefix: list[int], response: list[int]):
        # Row i scores prompt token start + i + 1: start at the last prefix position.
        return self._sampling_params(
            max_tokens=1,
            detokenize=False,
            prompt_logprob_start=len(prefix) - 1,
            prompt_logprob_token_ids=np.asarray(response, dtype=np.int32)[:, None],
        )


def flat_response_logprobs(flat, prefix: list[int], response: list[int]) -> np.ndarray:
    """Pick the response tokens' log-probs out of a FlatLogprobs of the whole sequence.

    Position p's entries are flat.logprobs[start_indices[p]:end_indices[p]]; with
    prompt_logprobs=0 that is exactly the actual token, so one entry per position.
    """
    first = len(prefix)
    starts = np.asarray(flat.start_indices[first:first + len(response)])
    token_ids = np.asarray(flat.token_ids)[starts]
    if not np.array_equal(token_ids, np.asarray(response)):
        raise RuntimeError("vLLM returned log-probs for other tokens than the response; report this as a bug")
    return np.asarray(flat.logprobs, dtype=np.float32)[starts]
