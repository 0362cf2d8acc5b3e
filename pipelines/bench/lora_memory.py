"""Peak memory and throughput of treg-train, full fine-tuning against LoRA, on the same model, data, batch,
sequence length and precision, each in its own process (1 process, FSDP2 as in any run).

    python pipelines/bench/lora_memory.py --size small --pairs 128 --steps 6 --batch 8

Full fine-tuning holds the fp32 weights, their gradients and AdamW's two moments (16 bytes a parameter);
LoRA holds the frozen weights once (4 bytes a parameter) and the rest for the adapters only. Neither holds
a reference model: the reference log-probs come from the shards. Peak memory is the process's peak RSS on
the CPU (what treg-train logs as peak_memory_gb), peak allocated GPU memory on a GPU; tokens/s is the
median over the steps after the first, as train_vs_trl.py measures it.

On the CPU the runs use a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_): with glibc's default,
freed activations stay in the heap, and RSS then shows how the allocator fragmented rather than what
each way of training allocates (`--default-malloc` measures it that way).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from train_vs_trl import peak_memory_gb, prepare  # noqa: E402

SIDES = ("full", "lora")


def run_side(args, side: str) -> dict:
    """One training run in this process; returns its throughput, peak memory (while training, as the run logs
    it, and of the whole process, export included), the size of its checkpoint and its first and last loss."""
    from treg_train.config import build_config
    from treg_train.train import train

    output = Path(args.work) / f"lora-memory-{side}"
    shutil.rmtree(output, ignore_errors=True)  # the previous measurement's run
    lora = dict(lora_r=args.lora_r) if side == "lora" else {}
    config = build_config(None, dict(
        model=args.model, data=args.data, output=str(output), loss="dpo_reg", beta=0.1,
        learning_rate=5e-4 if side == "lora" else 1e-5, global_batch_size=args.batch, max_steps=args.steps,
        max_length=args.max_length, micro_batch_tokens=args.micro_batch_tokens or 2 * args.max_length,
        logging_steps=1, save_steps=args.steps - 1, warmup_ratio=0.0, **lora,
    ))
    train(config)
    logged = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    checkpoint = next((output / "checkpoints").iterdir())
    return {"tokens_per_s": statistics.median(m["tokens_per_second_per_device"] for m in logged[1:]),
            "training_peak_gb": logged[-1]["peak_memory_gb"], "process_peak_gb": peak_memory_gb(),
            "first_loss": logged[0]["loss"], "last_loss": logged[-1]["loss"],
            "checkpoint_mb": sum(f.stat().st_size for f in checkpoint.iterdir()) / 2**20}


def parameter_counts(model: str, r: int) -> tuple[int, int]:
    """All parameters of the model with LoRA adapters on every linear layer of the decoder, and the adapters'."""
    from treg_train.lora import LoraSettings, add_adapters
    from treg_train.model import empty_causal_lm

    lm = add_adapters(empty_causal_lm(model), LoraSettings(r, 16.0, 0.0, "all-linear", 0), model)
    return sum(p.numel() for p in lm.parameters()), sum(p.numel() for p in lm.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or Hub id (default: build a local Llama of --size)")
    parser.add_argument("--data", help="treg-score output folder (default: score generated pairs)")
    parser.add_argument("--size", choices=["tiny", "small", "medium"], default="small")
    parser.add_argument("--work", default="/tmp/treg-bench-lora")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--micro-batch-tokens", type=int, help="tokens per forward (default: one pair's worth)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's default mmap threshold")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # set for the child processes
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (a checkpoint is written before the last step)")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.side:
        print("RESULT " + json.dumps(run_side(args, args.side)))
        return
    prepare(args)
    results = {}
    for side in SIDES:
        command = [sys.executable, str(HERE), "--side", side, "--model", args.model, "--data", args.data,
                   "--work", args.work, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--max-length", str(args.max_length), "--lora-r", str(args.lora_r),
                   *(["--micro-batch-tokens", str(args.micro_batch_tokens)] if args.micro_batch_tokens else [])]
        malloc = {} if args.default_malloc else {"MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **malloc})
        line = next((printed for printed in done.stdout.splitlines() if printed.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
        results[side] = json.loads(line[len("RESULT "):])
    total, adapters = parameter_counts(args.model, args.lora_r)
    import torch

    print(f"\nmodel {args.model} ({(total - adapters) / 1e6:.1f} M parameters) | data {args.data} | "
          f"global batch {args.batch} pairs | max length {args.max_length} | micro-batch tokens "
          f"{args.micro_batch_tokens or 2 * args.max_length} | {args.steps} steps | 1 process, "
          f"fp32 on {'cuda' if torch.cuda.is_available() else 'cpu'} | LoRA r={args.lora_r}, all-linear | "
          f"{'default malloc' if args.default_malloc else 'MALLOC_MMAP_THRESHOLD_=65536'}")
    print("| run | trainable parameters | tokens/s | peak memory while training GB | vs full "
          "| peak with the export GB | checkpoint MB | loss first → last |")
    print("|---|---|---|---|---|---|---|---|")
    full = results["full"]
    for side, trainable in (("full", total - adapters), ("lora", adapters)):
        r = results[side]
        label = "full fine-tuning" if side == "full" else f"LoRA r={args.lora_r}"
        print(f"| {label} | {trainable / 1e6:.2f} M | {r['tokens_per_s']:,.0f} | {r['training_peak_gb']:.2f} | "
              f"{r['training_peak_gb'] / full['training_peak_gb']:.2f}× | {r['process_peak_gb']:.2f} | "
              f"{r['checkpoint_mb']:.1f} | {r['first_loss']:.4f} → {r['last_loss']:.4f} |")


if __name__ == "__main__":
    main()
