"""Training throughput and peak memory: treg-train (dpo, dpo_reg) vs TRL's DPOTrainer on the same
model, data, batch, sequence length and precision, each side in its own process.

    python pipelines/bench/train_vs_trl.py --size small --pairs 256 --steps 12 --batch 8

Needs `pip install trl` (not a treg dependency). CPU by default; on a GPU both sides use it.
tokens/s counts real (unpadded) tokens of [prompt+chosen; prompt+rejected], median over steps
after the first; peak memory is the process's peak RSS (CPU) or peak allocated GPU memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from common import local_model, pairs_file, peak_rss_gb  # noqa: E402


def peak_memory_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else peak_rss_gb()


def run_treg(args, loss: str) -> dict:
    from treg_train.config import build_config
    from treg_train.train import train

    output = Path(args.work) / f"treg-{loss}"
    config = build_config(None, dict(
        model=args.model, data=args.data, output=str(output), loss=loss, beta=0.1, learning_rate=1e-5,
        global_batch_size=args.batch, max_steps=args.steps, max_length=args.max_length,
        micro_batch_tokens=args.batch * 2 * args.max_length, logging_steps=1, save_steps=0, warmup_ratio=0.0,
    ))
    train(config)
    logged = (output / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(line)["tokens_per_second_per_device"] for line in logged]
    return {"tokens_per_s": statistics.median(rates[1:]), "peak_memory_gb": peak_memory_gb()}


def run_trl(args) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = datasets.load_dataset("parquet", data_dir=str(Path(args.data) / "data"), split="train")
    rows = rows.select_columns(["prompt", "chosen", "rejected"])
    step_tokens: list[int] = []
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()
            step_tokens.append(0)

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.start)

    class CountingDPOTrainer(DPOTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            step_tokens[-1] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *rest, **kw)

    config = DPOConfig(
        output_dir=str(Path(args.work) / "trl"), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=1e-5, beta=0.1, max_length=args.max_length, logging_steps=1,
        save_strategy="no", report_to="none", bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
        warmup_steps=0, dataloader_num_workers=0, seed=42,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    trainer = CountingDPOTrainer(model=model, args=config, train_dataset=rows,
                                 processing_class=AutoTokenizer.from_pretrained(args.model), callbacks=[Timer()])
    trainer.train()
    rates = [n / t for n, t in zip(step_tokens, step_times)]
    return {"tokens_per_s": statistics.median(rates[1:]), "peak_memory_gb": peak_memory_gb()}


def child(args) -> None:
    result = run_trl(args) if args.side == "trl" else run_treg(args, args.side)
    print("RESULT " + json.dumps(result))


def prepare(args) -> None:
    """A local model and scored pairs, built when not given."""
    work = Path(args.work)
    if not args.model:
        args.model = local_model(work, args.size)
    if not args.data:
        from treg_data import pipeline

        args.data = str(work / f"scored-{args.size}")
        pipeline.run(pipeline.ScoreConfig(model=args.model, dataset=str(pairs_file(work, args.pairs)), output=args.data,
                                          backend="hf", dtype="float32", max_length=args.max_length,
                                          max_prompt_length=args.max_length // 2, overwrite=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or Hub id (default: build a tiny local Llama)")
    parser.add_argument("--data", help="treg-score output folder (default: score generated pairs)")
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny", help="the generated model's size")
    parser.add_argument("--work", default="/tmp/treg-bench-train")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--side", choices=["dpo", "dpo_reg", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.side:
        return child(args)
    prepare(args)
    results = {}
    for side in ("trl", "dpo", "dpo_reg"):
        command = [sys.executable, str(HERE), "--side", side, "--model", args.model, "--data", args.data,
                   "--work", args.work, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--max-length", str(args.max_length)]
        done = subprocess.run(command, capture_output=True, text=True)
        line = next((printed for printed in done.stdout.splitlines() if printed.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
        results[side] = json.loads(line[len("RESULT "):])
    print(f"\nmodel {args.model} | data {args.data} | global batch {args.batch} pairs | max length {args.max_length} | "
          f"{args.steps} steps | fp32 on CPU unless a GPU is present")
    print(f"{'trainer':<22}{'tokens/s':>12}{'peak GB':>10}{'speed vs TRL':>14}{'memory vs TRL':>15}")
    trl = results["trl"]
    for name, label in (("trl", "TRL DPOTrainer (dpo)"), ("dpo", "treg-train dpo"), ("dpo_reg", "treg-train dpo_reg")):
        r = results[name]
        print(f"{label:<22}{r['tokens_per_s']:>12,.0f}{r['peak_memory_gb']:>10.2f}"
              f"{r['tokens_per_s'] / trl['tokens_per_s']:>13.2f}x{r['peak_memory_gb'] / trl['peak_memory_gb']:>14.2f}x")
    print("TRL: reference model resident (a second copy in memory), padded batches, full logits. "
          "treg: reference log-probs read from the shards, length-grouped batches (packed with varlen attention), "
          "chunked selected-token log-probs.")


if __name__ == "__main__":
    main()
