"""Stage-one throughput: treg's vLLM scorer vs the transformers reference scorer on the same
sequences, the overhead of prompt log-prob scoring over a plain prefill of the same tokens in
the same engine (with and without vLLM's prefix cache), and scoring time against total tokens.

    python pipelines/bench/scoring.py --size medium --pairs 40 --sizes 10,20,40
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SIZES, local_model, pairs_file  # noqa: E402


def requests_for(model: str, n: int, work: Path):
    from transformers import AutoTokenizer

    from treg_data.encoding import LengthLimits, PairEncoder
    from treg_data.inputs import open_source
    from treg_data.pairs import Columns, parse_pair
    from treg_data.revision_prompts import DEFAULT_REVISION_PROMPTS

    encoder = PairEncoder(AutoTokenizer.from_pretrained(model), DEFAULT_REVISION_PROMPTS, LengthLimits(512, 256, 2048))
    source = open_source(str(pairs_file(work, n)))
    pairs = [encoder.encode(parse_pair(row, Columns())) for _, row in source.rows(0, source.num_rows)]
    return [request for p in pairs for request in p.requests()]


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--sizes", default="100,200,400", help="pair counts for the time-vs-tokens table")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--work", default="/tmp/treg-bench-scoring")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without compilation (faster start)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from treg_data.scorers import EngineOptions
    from treg_data.scorers.hf_scorer import HFScorer
    from treg_data.scorers.vllm_scorer import VLLMScorer

    model = local_model(work, args.size)
    requests = requests_for(model, args.pairs, work)
    tokens = sum(len(p) + len(r) for p, r in requests)
    options = EngineOptions(model=model, dtype=args.dtype, max_model_len=2048,
                            engine={"enforce_eager": args.enforce_eager})

    vllm_scorer = VLLMScorer(options)
    warm = requests[:60]
    vllm_scorer.score(warm)  # first batches compile and warm caches
    prompts = [TokensPrompt(prompt_token_ids=p + r) for p, r in requests]
    llm = vllm_scorer.llm

    def plain_prefill(read_cache: bool) -> float:
        llm.reset_prefix_cache()
        params = SamplingParams(max_tokens=1, detokenize=False, skip_reading_prefix_cache=not read_cache)
        return timed(lambda: llm.generate(prompts, params, use_tqdm=False))

    def every_row_logprobs() -> float:  # the path before cached_prefix_rows: every position gets logits
        llm.reset_prefix_cache()
        return timed(lambda: llm.generate(prompts, vllm_scorer.flat_params(read_cache=False), use_tqdm=False))

    llm.generate(prompts[:60], SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
    t_prefill_cached, t_prefill, t_every_row = plain_prefill(True), plain_prefill(False), every_row_logprobs()
    llm.reset_prefix_cache()  # the scorer fills the cache itself, as in a real run
    cached_before = vllm_scorer.cached_tokens
    t_vllm = timed(vllm_scorer.score, requests)
    cached = vllm_scorer.cached_tokens - cached_before
    scaling = []
    for n in [int(x) for x in args.sizes.split(",") if x]:
        subset = requests[: 6 * n]
        vllm_scorer.llm.reset_prefix_cache()
        scaling.append((n, sum(len(p) + len(r) for p, r in subset), timed(vllm_scorer.score, subset)))
    vllm_scorer.close()

    hf = HFScorer(options)
    hf.score(warm)
    t_hf = timed(hf.score, requests)

    print(f"\nmodel {args.size} ({model}) | {args.pairs} pairs = {len(requests)} sequences, {tokens:,} tokens | "
          f"{args.dtype} | vLLM path {vllm_scorer.scoring_path} | {os.cpu_count()} CPU cores")
    print(f"{'scorer':<58}{'seconds':>9}{'tokens/s':>12}{'vs reference':>14}")
    for name, seconds in (("transformers reference (length-sorted batches)", t_hf),
                          (f"treg vLLM scorer ({vllm_scorer.scoring_path})", t_vllm),
                          ("vLLM prompt log-probs on every row, no prefix cache", t_every_row),
                          ("vLLM plain prefill, same tokens, prefix cache (default)", t_prefill_cached),
                          ("vLLM plain prefill, same tokens, no prefix cache", t_prefill)):
        print(f"{name:<58}{seconds:>9.2f}{tokens / seconds:>12,.0f}{t_hf / seconds:>13.2f}x")
    print(f"treg scorer over plain prefill: {100 * (t_vllm / t_prefill_cached - 1):+.1f}% with the prefix cache, "
          f"{100 * (t_vllm / t_prefill - 1):+.1f}% without; the prefix cache served {100 * cached / tokens:.0f}% "
          f"of the scorer's tokens | engine environment: {vllm_scorer.engine_environment}")
    print(f"\n{'pairs':>7}{'tokens':>12}{'seconds':>9}{'µs/token':>10}   (vLLM scorer: time should grow linearly)")
    for n, n_tokens, seconds in scaling:
        print(f"{n:>7}{n_tokens:>12,}{seconds:>9.2f}{1e6 * seconds / n_tokens:>10.2f}")


if __name__ == "__main__":
    main()
