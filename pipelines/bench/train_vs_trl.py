"""Training throughput and peak memory: treg-train (dpo, dpo_reg) vs TRL's DPOTrainer on the same
model, data, batch, sequence length and precision, each run in its own process(es). TRL runs with
its defaults and with the options it offers to save memory and time on this platform; treg also
with its own memory option, --gradient-checkpointing.

    python pipelines/bench/train_vs_trl.py --size medium --pairs 128 --steps 8 --batch 8 --processes 1,2

Needs `pip install trl` (not a treg dependency). CPU by default; on a GPU both sides use it.
tokens/s counts real (unpadded) tokens of [prompt+chosen; prompt+rejected] over all processes,
median over steps after the first; peak memory is the largest process's peak RSS (CPU) or peak
allocated GPU memory. With 2 processes, treg runs FSDP2 under torchrun and TRL runs DDP under
`accelerate launch`, each process on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from common import SIZES, local_model, pairs_file, peak_rss_gb  # noqa: E402

# TRL's own options, applied on top of its defaults. padding_free is not among them: TRL 1.x
# warns that it is unavailable and falls back to padding; use_liger_kernel needs Triton (GPU).
TRL_CONFIGS = {
    "trl": ("TRL DPOTrainer, defaults", {}),
    "trl_precompute": ("TRL, precompute_ref_log_probs", {"precompute_ref_log_probs": True}),
    "trl_precompute_gc": ("TRL, precompute + gradient_checkpointing",
                          {"precompute_ref_log_probs": True, "gradient_checkpointing": True}),
}
TREG_SIDES = {"dpo": "treg-train dpo", "dpo_reg": "treg-train dpo_reg",
              "dpo_reg_gc": "treg-train dpo_reg, --gradient-checkpointing"}


def peak_memory_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else peak_rss_gb()


def run_treg(args, loss: str) -> dict:
    from treg_train.config import build_config
    from treg_train.train import train

    output = Path(args.work) / f"treg-{loss}-{args.processes}"
    config = build_config(None, dict(
        model=args.model, data=args.data, output=str(output), loss=loss.removesuffix("_gc"), beta=0.1,
        gradient_checkpointing=loss.endswith("_gc"), learning_rate=1e-5,
        global_batch_size=args.batch, max_steps=args.steps, max_length=args.max_length,
        micro_batch_tokens=args.batch * 2 * args.max_length, logging_steps=1, save_steps=0, warmup_ratio=0.0,
    ))
    train(config)
    logged = (output / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(line)["tokens_per_second_per_device"] for line in logged if "tokens_per_second" in line]
    return {"tokens_per_s": statistics.median(rates[1:]), "peak_memory_gb": peak_memory_gb()}


def run_trl(args, options: dict) -> dict:
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
        output_dir=str(Path(args.work) / "trl"), per_device_train_batch_size=args.batch // args.processes,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=1e-5, beta=0.1, max_length=args.max_length,
        logging_steps=1, save_strategy="no", report_to="none", bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(), warmup_steps=0, dataloader_num_workers=0, seed=42, **options,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    trainer = CountingDPOTrainer(model=model, args=config, train_dataset=rows,
                                 processing_class=AutoTokenizer.from_pretrained(args.model), callbacks=[Timer()])
    trainer.train()
    rates = [n / t for n, t in zip(step_tokens, step_times)]
    return {"tokens_per_s": statistics.median(rates[1:]), "peak_memory_gb": peak_memory_gb()}


def child(args) -> None:
    if args.side in TRL_CONFIGS:
        result = run_trl(args, TRL_CONFIGS[args.side][1])
    else:
        result = run_treg(args, args.side)
        result["tokens_per_s"] *= args.processes  # treg logs the mean per process
    line = "RESULT " + json.dumps({**result, "rank": int(os.environ.get("RANK", 0))}) + "\n"
    os.write(1, line.encode())  # one write: the ranks share stdout, and a short write is not interleaved


def launch(args, side: str, processes: int) -> dict:
    """One side in fresh processes; tokens/s summed over them (treg: rank 0's total), memory of the largest."""
    command = [str(HERE), "--side", side, "--model", args.model, "--data", args.data, "--work", args.work,
               "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length),
               "--processes", str(processes)]
    shutil.rmtree(Path(args.work) / f"treg-{side}-{processes}", ignore_errors=True)  # a run needs a new folder
    env = dict(os.environ)
    if processes == 1:
        command = [sys.executable, *command]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
        bin_dir = Path(sys.executable).parent
        command = ([str(bin_dir / "torchrun"), "--standalone", f"--nproc-per-node={processes}", *command]
                   if side in TREG_SIDES else
                   # accelerate's --cpu starts one process (its multi-CPU mode expects MPI); --multi_gpu starts
                   # them with torch.distributed, and Accelerate picks gloo where there is no GPU.
                   [str(bin_dir / "accelerate"), "launch", "--multi_gpu", f"--num_processes={processes}",
                    "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", *command])
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    results = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if len(results) != processes:
        sys.exit(f"{side} on {processes} process(es) failed:\n{done.stderr[-3000:]}")
    rates = [r["tokens_per_s"] for r in results]
    return {"tokens_per_s": rates[0] if side in TREG_SIDES else sum(rates),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in results)}


def prepare(args) -> None:
    """A local model and scored pairs, built when not given."""
    work = Path(args.work)
    if not args.model:
        args.model = local_model(work, args.size)
    if not args.data:
        from treg_data import pipeline

        args.data = str(work / f"scored-{args.size}-{args.pairs}")
        if not (Path(args.data) / "manifest.json").exists():
            pipeline.run(pipeline.ScoreConfig(
                model=args.model, dataset=str(pairs_file(work, args.pairs)), output=args.data, backend="hf",
                dtype="float32", max_length=args.max_length, max_prompt_length=args.max_length // 2, overwrite=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or Hub id (default: build a local Llama of --size)")
    parser.add_argument("--data", help="treg-score output folder (default: score generated pairs)")
    parser.add_argument("--size", choices=list(SIZES), default="tiny", help="the generated model's size")
    parser.add_argument("--work", default="/tmp/treg-bench-train")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8, help="global batch in pairs")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--processes", default="1", help="process counts to run, e.g. 1,2")
    parser.add_argument("--trl", default=",".join(TRL_CONFIGS), help=f"TRL configurations among {list(TRL_CONFIGS)}")
    parser.add_argument("--side", choices=[*TRL_CONFIGS, *TREG_SIDES], help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.side:
        args.processes = int(args.processes)
        return child(args)
    prepare(args)
    trl_sides = [name for name in args.trl.split(",") if name]
    print(f"\nmodel {args.model} | data {args.data} | global batch {args.batch} pairs | max length {args.max_length} | "
          f"{args.steps} steps | fp32 on CPU unless a GPU is present | {os.cpu_count()} CPU cores")
    print(f"{'processes':<10}{'trainer':<50}{'tokens/s':>10}{'peak GB':>9}{'speed vs TRL best':>19}"
          f"{'memory vs TRL best':>20}")
    for processes in [int(p) for p in args.processes.split(",")]:
        results = {side: launch(args, side, processes) for side in [*trl_sides, *TREG_SIDES]}
        best = max(trl_sides, key=lambda side: results[side]["tokens_per_s"])
        for side, r in results.items():
            label = TRL_CONFIGS[side][0] if side in TRL_CONFIGS else TREG_SIDES[side]
            print(f"{processes:<10}{label + (' (best)' if side == best else ''):<50}{r['tokens_per_s']:>10,.0f}"
                  f"{r['peak_memory_gb']:>9.2f}{r['tokens_per_s'] / results[best]['tokens_per_s']:>18.2f}x"
                  f"{r['peak_memory_gb'] / results[best]['peak_memory_gb']:>19.2f}x", flush=True)
    print("TRL best = its fastest configuration here. TRL: padded batches and full [batch, seq, vocab] logits; the "
          "reference model resident and run every step unless precomputed (then one pass over the data first, not "
          "timed). treg: reference log-probs read from the shards, chunked selected-token log-probs, length-grouped "
          "micro-batches.")


if __name__ == "__main__":
    main()
