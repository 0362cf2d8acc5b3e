"""The GPU figures in one command: a randomly initialised model of Llama-3.2-1B's shape and long
conversational pairs, scored by the transformers scorer (and by vLLM where it is installed), then treg-train
against TRL's DPOTrainer, every treg row paired with TRL at the same activation checkpointing. It prints
tokens/s, peak GB, model FLOPs utilisation and compilation seconds, and writes them to --out as JSON. On one
H200 it finishes within 8 minutes; rows that would not fit the time left are listed as skipped.

    python pipelines/bench/gpu.py --out gpu.json
    python pipelines/bench/gpu.py --size tiny --pairs 16 --batch 4 --steps 3 --max-length 256   # a CPU dry run

A bare CUDA machine with torch, transformers, peft, accelerate, pyarrow and typer needs these Python packages
beside them: datasets, dill, multiprocess, trl and liger-kernel (wheels: pip download --no-deps).
MFU counts 6 x the matrix-multiply parameters (decoder layers and output layer) per trained token, and 2 x per
scored token, against 989 TFLOP/s, an H100/H200's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_vs_trl  # noqa: E402
from common import local_model  # noqa: E402

PEAK_FLOPS = 989e12
LLAMA_1B = dict(hidden_size=2048, num_layers=16, num_heads=32, intermediate_size=8192, model_vocab_size=128256,
                config_overrides={"num_key_value_heads": 8}, max_position_embeddings=131072)
# In order of what the figures need most, as the time may not allow them all.
ROWS = ["trl", "trl_gc", "defaults", "dpo_reg_gc", "trl_liger", "trl_liger_gc", "liger", "liger_gc", "compile",
        "sdpa", "selective", "dpo_reg", "flex"]
ROW_SECONDS = {"compile": 150, "flex": 200}  # the most one row may take; others 100


def build_model(work: Path, size: str) -> str:
    import torch
    from tiny_model import build_tiny_model

    if size == "tiny":
        return local_model(work, "tiny")
    folder = work / "model-1b"
    if not (folder / "config.json").exists():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        build_tiny_model(folder, dtype="bfloat16", device=device, **LLAMA_1B)
    return str(folder)


def long_pairs(path: Path, count: int, seed: int = 0) -> Path:
    """Conversational pairs with a system turn, of about 450 to 1,400 tokens a sequence."""
    from tiny_model import _WORDS

    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(words)) + "."

    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            prompt = [{"role": "system", "content": text(rng.randint(20, 60))},
                      {"role": "user", "content": text(rng.randint(150, 500))}]
            handle.write(json.dumps({"id": f"long-{i}", "prompt": prompt, "chosen": text(rng.randint(200, 650)),
                                     "rejected": text(rng.randint(200, 650))}) + "\n")
    return path


def score(model: str, pairs: Path, output: Path, backend: str, max_length: int) -> dict:
    from treg_data import pipeline

    summary = pipeline.run(pipeline.ScoreConfig(
        model=model, dataset=str(pairs), output=str(output), backend=backend, dtype="bfloat16",
        max_length=max_length, max_prompt_length=max_length // 2, batch_size=64, shard_size=1000, overwrite=True,
        reward_check=False))
    return {"backend": f"{backend} ({summary.scoring_path})", "tokens": summary.tokens,
            "tokens_per_s": summary.tokens / max(summary.score_seconds, 1e-9), "pairs": summary.pairs_scored}


def free_gpu_memory() -> None:
    """The scorer's model is this process's garbage once scored: return its memory before the training rows."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def matmul_params(model: str) -> int:
    """Decoder layers and output layer: the parameters a token's forward multiplies by."""
    from treg_train.model import decoder_layers, empty_causal_lm

    lm = empty_causal_lm(model)
    return sum(p.numel() for layer in decoder_layers(lm) for p in layer.parameters()) + \
        lm.get_output_embeddings().weight.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["1b", "tiny"], default="1b")
    parser.add_argument("--work", default="/tmp/treg-bench-gpu")
    parser.add_argument("--pairs", type=int, default=80)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--seconds", type=float, default=450, help="time for the training rows")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    args.model = build_model(work, args.size)
    flops = matmul_params(args.model)
    pairs = long_pairs(work / "pairs.jsonl", args.pairs)
    print(f"model {args.model}: {flops / 1e9:.3f} B matmul parameters; built in {time.perf_counter() - started:.0f} s",
          flush=True)
    scoring = [score(args.model, pairs, work / "scored-hf", "hf", args.max_length)]
    free_gpu_memory()
    try:
        import vllm  # noqa: F401

        scoring.append(score(args.model, pairs, work / "scored-vllm", "vllm", args.max_length))
    except ImportError:
        print("vLLM is not installed here: its scoring is not measured", flush=True)
    for s in scoring:
        s["mfu"] = 2 * flops * s["tokens_per_s"] / PEAK_FLOPS
        print(f"scoring {s['backend']}: {s['pairs']} pairs, {s['tokens']:,} tokens, {s['tokens_per_s']:,.0f} tokens/s, "
              f"MFU {s['mfu']:.0%}", flush=True)
    args.data, args.work = str(work / "scored-hf"), str(work)
    deadline = time.perf_counter() + args.seconds
    results = {}
    for side in train_vs_trl.sides_to_run(args.rows):
        budget = ROW_SECONDS.get(side, 100)
        if time.perf_counter() + budget > deadline:
            results[side] = {"error": "skipped: not enough time left"}
        else:
            results[side] = train_vs_trl.launch(args, side, 1, timeout=budget)
        print(train_vs_trl.table({side: results[side]}, 1, 6 * flops, PEAK_FLOPS)[-1], flush=True)
    lines = train_vs_trl.table(results, 1, 6 * flops, PEAK_FLOPS)
    print("\n" + "\n".join(lines) + f"\n\nwhole benchmark: {time.perf_counter() - started:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"scoring": scoring, "training": results, "table": lines,
                                              "matmul_params": flops}, indent=1))


if __name__ == "__main__":
    main()
