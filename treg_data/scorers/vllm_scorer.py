"""Prompt log-prob scoring with the vLLM engine (docs/DESIGN.md, stage one).

Two paths, the fastest available is used; both compute logits for the response rows, not for
the prefix, which is most of each sequence (the revision prompts quote the whole conversation):
- `token_id_rows` (GPU, V2 model runner): `prompt_logprob_start` + `prompt_logprob_token_ids`
  asks for exactly those rows and returns one NumPy array per request;
- `cached_prefix_rows` (elsewhere, e.g. the CPU build): the V1 runner computes prompt log-probs
  for every position it runs, and a prefix read from the prefix cache is not run. So a chunk of
  sequences is scored in two passes: a plain prefill of each prefix (without its last token, whose
  row predicts the first response token) puts the prefix into the cache, then each sequence, with
  `skip_reading_prefix_cache=False`, runs only its remaining tokens. The cached positions' entries
  are left unset by vLLM and never read; a prefix evicted from the cache is simply run again, and
  the response's token ids are checked against what vLLM returns, so the cache changes the time
  only, never the values.
Neither is trusted on faith: a scorer's first sequences also go through the plain path (every row's
log-prob, no prefix cache), and a disagreement stops the run (`check_against_every_row`).

The top-K tokens at each response position (`score_topk`, treg-score --ref-topk) are vLLM's prompt log-probs with
`prompt_logprobs=K`: each position's entries are the actual token (with its rank), then the K most likely, ranks
1..K. Where the scores take `cached_prefix_rows` they do too (only the response rows are run); elsewhere every
position of the sequence is run, without the cache, as `prompt_logprob_token_ids` has no top-K form.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

from treg_core.errors import UserError
from treg_data.scorers.base import EngineOptions, ScoreRequest, TopK, sorted_topk
from treg_data.scorers.cpu_engine import CPU_BLOCK_SIZE, cpu_engine_environment
from treg_data.scorers.engine_log import OutputTail, root_cause, start_failure
from treg_data.scorers.watchdog import RESUME, EngineWatchdog, children_pids

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
CHECKED_SEQUENCES = 8
# Largest difference allowed between the fast path and the every-row path on the same engine. Both run the same
# model in the same precision; what they may differ in is kernel order (batch shapes, cached KV), a fraction of
# the precision's resolution. A path reading the wrong rows is off by nats.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05, "auto": 0.1}
ENGINE_STOP_GRACE_S = 1.0  # seconds the engine processes get to leave before they are killed (close())
DEFAULT_MAX_LOGPROBS = 20  # vLLM's own max_logprobs: a larger --ref-topk raises it


class VLLMScorer:
    def __init__(self, options: EngineOptions):
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        self._sampling_params = SamplingParams
        before, what = children_pids(), f"vLLM ({options.model})"
        with cpu_engine_environment(options.tensor_parallel_size) as self.engine_environment, \
                OutputTail() as self.engine_log:
            try:
                self.llm = LLM(
                    model=options.model,
                    revision=options.revision,
                    dtype=options.dtype,
                    max_model_len=options.max_model_len,
                    enable_prefix_caching=True,  # read only by the cached_prefix_rows path
                    block_size=CPU_BLOCK_SIZE if current_platform.is_cpu() else None,
                    **({"max_logprobs": options.topk} if options.topk > DEFAULT_MAX_LOGPROBS else {}),
                    **options.engine,
                )
            except (RuntimeError, ValueError) as err:  # an engine process failed to start, or vLLM refused a setting
                raise UserError(start_failure(what, err, self.engine_log)) from None
        self.watchdog = EngineWatchdog.of_new_children(before, what)
        config = self.llm.llm_engine.vllm_config
        has_rows = hasattr(SamplingParams, "prompt_logprob_token_ids")  # vLLM >= 0.32
        uses_v2 = getattr(config, "use_v2_model_runner", False)
        self.scoring_path = "token_id_rows" if has_rows and uses_v2 else "cached_prefix_rows"
        # Prefix tokens per chunk: half the KV cache, so the prefixes of a chunk stay cached while the
        # sequences that read them take the other half (an evicted prefix costs time, never values).
        cache = config.cache_config
        self.chunk_tokens = max(cache.block_size, (cache.num_gpu_blocks or 2**14) * cache.block_size // 2)
        self.tolerance = TOLERANCE.get(options.dtype, 0.1)
        self.checked = False  # the fast path agreed with the every-row path (check_against_every_row)
        self.cached_tokens = 0  # prompt tokens the prefix cache served, over all score() calls
        self.rerun_sequences = 0  # sequences run again because the cache reached into their response

    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        with self._engine_death_said():
            scored = (self.score_token_id_rows if self.scoring_path == "token_id_rows"
                      else self.score_cached_prefix_rows)(requests)
            if not self.checked:
                self.check_against_every_row(requests[:CHECKED_SEQUENCES], scored[:CHECKED_SEQUENCES])
        return scored

    def score_topk(self, requests: list[ScoreRequest], k: int) -> list[TopK]:
        """Per request, the K most likely tokens at each response position and their log-probs (base.TopK)."""
        def extract(flat, prefix: list[int], response: list[int]) -> TopK:
            return flat_response_topk(flat, prefix, response, k)

        with self._engine_death_said():
            if self.scoring_path == "cached_prefix_rows":
                return self._cached_prefix_rows(requests, k, extract)
            outputs = self.llm.generate(_prompts(requests), self.flat_params(read_cache=False, prompt_logprobs=k),
                                        use_tqdm=False)
        return [extract(out.prompt_logprobs, prefix, response)
                for (prefix, response), out in zip(requests, outputs, strict=True)]

    @contextmanager
    def _engine_death_said(self):
        """An engine that stopped and said so (a Ctrl-C only it received) as one line: faster than the watchdog."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            yield
        except EngineDeadError:
            cause = root_cause(self.engine_log.settled()) or "it stopped on a signal or an error it reported above"
            raise UserError(f"the {self.watchdog.what} engine died: {cause}; {RESUME}") from None

    def check_against_every_row(self, requests: list[ScoreRequest], scored: list[np.ndarray]) -> None:
        """The fast path's first sequences against the plain one (every row's log-prob, no prefix cache), which
        does not depend on the features the fast path reads: a vLLM where they behave otherwise stops the run
        before a wrong log-prob is written."""
        import vllm

        outputs = self.llm.generate(_prompts(requests), self.flat_params(read_cache=False), use_tqdm=False)
        plain = [flat_response_logprobs(out.prompt_logprobs, prefix, response)
                 for (prefix, response), out in zip(requests, outputs, strict=True)]
        largest = max((float(np.abs(a - b).max()) for a, b in zip(scored, plain, strict=True) if len(a)), default=0.0)
        if not largest <= self.tolerance:  # NaN fails too
            raise UserError(f"vLLM {vllm.__version__}: the {self.scoring_path} path disagrees with the every-row path "
                            f"on the first {len(requests)} sequences by up to {largest:.3g} (tolerance "
                            f"{self.tolerance:g}); nothing was written: score with --backend hf, or another vLLM")
        self.checked = True

    def score_token_id_rows(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        """One request per sequence that asks for exactly its response rows (V2 model runner)."""
        params = [self._row_params(prefix, response) for prefix, response in requests]
        outputs = self.llm.generate(_prompts(requests), params, use_tqdm=False)
        dropped = [i for i, out in enumerate(outputs) if out.prompt_token_id_logprobs is None]
        if dropped:  # vLLM drops the rows of a request it had to resume (preemption): run those again
            again = self.llm.generate(_prompts([requests[i] for i in dropped]), [params[i] for i in dropped],
                                      use_tqdm=False)
            for i, out in zip(dropped, again, strict=True):
                outputs[i] = out
        if any(out.prompt_token_id_logprobs is None for out in outputs):
            raise RuntimeError("vLLM returned no prompt_token_id_logprobs for a request, twice; report this as a bug")
        return [out.prompt_token_id_logprobs[:, 0].astype(np.float32) for out in outputs]

    def score_cached_prefix_rows(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        """Per chunk: the prefixes into the prefix cache, then the sequences, whose cached positions are not run."""
        return self._cached_prefix_rows(requests, 0, flat_response_logprobs)

    def _cached_prefix_rows(self, requests: list[ScoreRequest], prompt_logprobs: int, extract) -> list:
        """score_cached_prefix_rows with `prompt_logprobs` most likely tokens per position besides the actual one;
        `extract(prompt_logprobs, prefix, response)` makes each sequence's result."""
        fill = self._sampling_params(max_tokens=1, detokenize=False)
        scored: list = []
        for start, stop in prefix_chunks(requests, self.chunk_tokens):
            chunk = requests[start:stop]
            prefixes = {tuple(prefix[:-1]) for prefix, _ in chunk if len(prefix) > 1}
            self.llm.generate(_prompts([(list(p), []) for p in prefixes]), fill, use_tqdm=False)
            outputs = self.llm.generate(_prompts(chunk), self.flat_params(read_cache=True,
                                                                          prompt_logprobs=prompt_logprobs),
                                        use_tqdm=False)
            # A cache hit that reaches into the response (a repeated sequence, or two responses with a
            # common start) leaves response rows unset: run those sequences again without the cache.
            again = [i for i, out in enumerate(outputs) if (out.num_cached_tokens or 0) > len(chunk[i][0]) - 1]
            if again:
                rerun = self.llm.generate(_prompts([chunk[i] for i in again]),
                                          self.flat_params(read_cache=False, prompt_logprobs=prompt_logprobs),
                                          use_tqdm=False)
                for i, out in zip(again, rerun, strict=True):
                    outputs[i] = out
            self.cached_tokens += sum(out.num_cached_tokens or 0 for out in outputs)
            self.rerun_sequences += len(again)
            scored += [extract(out.prompt_logprobs, prefix, response)
                       for (prefix, response), out in zip(chunk, outputs, strict=True)]
        return scored

    def close(self) -> None:
        """Stop the engine processes now rather than at interpreter exit."""
        self.watchdog.stop()
        # Every score is read by now. On a CPU vLLM's engine process outlives SIGTERM past its default grace of
        # 5 s (its workers wait for work) and is killed then; a short grace ends it as surely, sooner.
        self.llm.llm_engine.engine_core.shutdown(timeout=ENGINE_STOP_GRACE_S)

    def flat_params(self, read_cache: bool, prompt_logprobs: int = 0):
        """Prompt log-probs of the actual token at every position run, and of the `prompt_logprobs` most likely ones;
        with read_cache, prefixes come from the cache."""
        return self._sampling_params(max_tokens=1, prompt_logprobs=prompt_logprobs, flat_logprobs=True,
                                     detokenize=False, skip_reading_prefix_cache=not read_cache)

    def _row_params(self, prefix: list[int], response: list[int]):
        # Row i scores prompt token start + i + 1: start at the last prefix position.
        return self._sampling_params(
            max_tokens=1,
            detokenize=False,
            prompt_logprob_start=len(prefix) - 1,
            prompt_logprob_token_ids=np.asarray(response, dtype=np.int32)[:, None],
        )


def _prompts(requests: list[ScoreRequest]):
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=prefix + response) for prefix, response in requests]


def prefix_chunks(requests: list[ScoreRequest], max_prefix_tokens: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) ranges whose prefixes add up to at most max_prefix_tokens (one request at least)."""
    chunks, start, tokens = [], 0, 0
    for index, (prefix, _) in enumerate(requests):
        if index > start and tokens + len(prefix) > max_prefix_tokens:
            chunks.append((start, index))
            start, tokens = index, 0
        tokens += len(prefix)
    if start < len(requests):
        chunks.append((start, len(requests)))
    return chunks


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


def flat_response_topk(flat, prefix: list[int], response: list[int], k: int) -> TopK:
    """Pick the response positions' K most likely tokens out of a FlatLogprobs of the whole sequence (prompt_logprobs
    k): position p's entries are the actual token, with its rank, then those of ranks 1..k."""
    if flat is None or len(flat) < len(prefix) + len(response):
        raise RuntimeError("vLLM returned no prompt log-probs for some response positions; report this as a bug")
    first = len(prefix)
    starts = np.asarray(flat.start_indices[first:first + len(response)], dtype=np.int64)
    ends = np.asarray(flat.end_indices[first:first + len(response)], dtype=np.int64)
    if not len(response):
        return np.zeros((0, k), dtype=np.int32), np.zeros((0, k), dtype=np.float32)
    low, high = int(starts[0]), int(ends[-1])  # only the response's entries are converted
    token_ids = np.asarray(flat.token_ids[low:high])
    if not np.array_equal(ends - starts, np.full(len(response), k + 1)) or not np.array_equal(
            token_ids[starts - low], np.asarray(response)):
        raise RuntimeError("vLLM returned prompt log-probs for other tokens than the response, or not the top "
                           f"{k} of each; report this as a bug")
    index = starts[:, None] - low + 1 + np.arange(k)  # the entries after the actual token's
    if not (np.asarray(flat.ranks[low:high])[index] == np.arange(1, k + 1)).all():
        raise RuntimeError(f"vLLM's prompt log-probs at a response position are not ranks 1..{k}; report this as a bug")
    return sorted_topk(token_ids[index], np.asarray(flat.logprobs[low:high], dtype=np.float32)[index])
