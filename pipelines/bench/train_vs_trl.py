"""Training throughput and peak memory: treg-train against TRL's DPOTrainer on the same model, data, global
batch, sequence length and precision, each run in its own process(es), every row paired with the TRL row
at the same activation-checkpointing setting.

    python pipelines/bench/train_vs_trl.py --size medium --pairs 48 --steps 6 --batch 8 --processes 1,2

Several processes: treg's sharding against TRL's DDP (the `dpo_reg_*shard*` and `dpo_reg_gradop` sides):

    python pipelines/bench/train_vs_trl.py --size medium --pairs 40 --steps 5 --batch 8 --processes 2 \
        --sides trl_gc,trl,dpo_reg_fullshard,dpo_reg_gradop,dpo_reg_noshard,dpo_reg_gc_noshard

What each side runs (TRL 1.16, read from its source):
- TRL always with `precompute_ref_log_probs` (the reference log-probs are computed in one pass before
  training, not timed, as treg reads them from its shards). Its `gradient_checkpointing` defaults to True;
  the rows name the setting. It computes per-token log-probs in chunks through a fused LM head (no full
  [batch, seq, vocab] logits), over padded batches of `--batch` pairs per process. `use_liger_kernel` (CUDA
  only) swaps in Liger's RMSNorm, SwiGLU and RoPE kernels.
- treg-train reads the reference log-probs from the shards, computes the response tokens' log-probs only,
  in chunks, and cuts each batch into forwards of --micro-batch-tokens (its default unless a row says
  otherwise). Its attention defaults to `varlen` over packed sequences (no padding). With several processes
  it runs FSDP2 under torchrun: --sharding auto (shard_grad_op on a CPU where it fits) unless a row names one.

Needs `pip install trl` (not a treg dependency). CPU by default; on a GPU both sides use it, in bf16.
tokens/s counts real (unpadded) tokens of [prompt+chosen; prompt+rejected] over all processes, median over
the steps after the first two (compilation, when a row compiles, is reported apart); peak memory is the
largest process's peak RSS (CPU) or peak allocated GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from common import SIZES, local_model, pairs_file, peak_rss_gb  # noqa: E402

NO, ALL = "none", "every layer"
# name: (label, DPOConfig options, checkpointing, CUDA only)
TRL_CONFIGS = {
    "trl_gc": ("TRL precompute_ref_log_probs, gradient_checkpointing (its default)",
               {"precompute_ref_log_probs": True}, ALL, False),
    "trl": ("TRL precompute_ref_log_probs, gradient_checkpointing=False",
            {"precompute_ref_log_probs": True, "gradient_checkpointing": False}, NO, False),
    "trl_liger_gc": ("TRL precompute + use_liger_kernel, gradient_checkpointing",
                     {"precompute_ref_log_probs": True, "use_liger_kernel": True}, ALL, True),
    "trl_liger": ("TRL precompute + use_liger_kernel, gradient_checkpointing=False",
                  {"precompute_ref_log_probs": True, "use_liger_kernel": True, "gradient_checkpointing": False},
                  NO, True),
}
# name: (label, treg-train settings, CUDA only); checkpointing is read from the run's own memory plan
TREG_SIDES = {
    "defaults": ("treg-train dpo_reg, defaults (checkpointing auto)", {}, False),
    "dpo": ("treg-train dpo, --gradient-checkpointing false", {"loss": "dpo", "gradient_checkpointing": "false"},
            False),
    "dpo_gc": ("treg-train dpo, --gradient-checkpointing true", {"loss": "dpo", "gradient_checkpointing": "true"},
               False),
    "dpo_reg": ("treg-train dpo_reg, --gradient-checkpointing false", {"gradient_checkpointing": "false"}, False),
    "dpo_reg_gc": ("treg-train dpo_reg, --gradient-checkpointing true", {"gradient_checkpointing": "true"}, False),
    "dpo_reg_fullshard": ("treg-train dpo_reg, --gradient-checkpointing false --sharding full_shard",
                          {"gradient_checkpointing": "false", "sharding": "full_shard"}, False),
    "dpo_reg_gradop": ("treg-train dpo_reg, --gradient-checkpointing false --sharding shard_grad_op",
                       {"gradient_checkpointing": "false", "sharding": "shard_grad_op"}, False),
    "dpo_reg_noshard": ("treg-train dpo_reg, --gradient-checkpointing false --sharding no_shard",
                        {"gradient_checkpointing": "false", "sharding": "no_shard"}, False),
    "dpo_reg_gc_noshard": ("treg-train dpo_reg, --gradient-checkpointing true --sharding no_shard",
                           {"gradient_checkpointing": "true", "sharding": "no_shard"}, False),
    "selective": ("treg-train dpo_reg, --gradient-checkpointing selective",
                  {"gradient_checkpointing": "selective"}, False),
    "sdpa": ("treg-train dpo_reg, --attn-implementation sdpa (padded), --gradient-checkpointing false",
             {"attn_implementation": "sdpa", "gradient_checkpointing": "false"}, False),
    "compile": ("treg-train dpo_reg, defaults + --compile", {"compile": True}, False),
    "compile_liger": ("treg-train dpo_reg, defaults + --compile --use-liger-kernel",
                      {"compile": True, "use_liger_kernel": True}, True),
    "liger": ("treg-train dpo_reg, defaults + --use-liger-kernel", {"use_liger_kernel": True}, True),
    "liger_gc": ("treg-train dpo_reg, --use-liger-kernel, --gradient-checkpointing true",
                 {"use_liger_kernel": True, "gradient_checkpointing": "true"}, True),
    "flex": ("treg-train dpo_reg, --attn-implementation flex_attention (packs of 4 lengths)",
             {"attn_implementation": "flex_attention"}, True),
}
DEFAULT_SIDES = "trl_gc,trl,trl_liger_gc,trl_liger,defaults,dpo,dpo_gc,dpo_reg,dpo_reg_gc"


def peak_memory_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else peak_rss_gb()


def run_treg(args, side: str) -> dict:
    from treg_train.config import build_config
    from treg_train.train import train

    output = Path(args.work) / f"treg-{side}-{args.processes}"
    config = build_config(None, dict(
        model=args.model, data=args.data, output=str(output), beta=0.1, learning_rate=1e-5,
        global_batch_size=args.batch, max_steps=args.steps, max_length=args.max_length, logging_steps=1,
        save_steps=0, warmup_ratio=0.0, **TREG_SIDES[side][1],
    ))
    train(config)
    logged = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in logged if "tokens_per_second_per_device" in line]
    return {"tokens_per_s": statistics.median(line["tokens_per_second_per_device"] for line in steps[2:] or steps),
            "peak_memory_gb": peak_memory_gb(), "compile_seconds": steps[-1].get("compile_seconds", 0.0)}


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
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()
            step_tokens.append(0)

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
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
    return {"tokens_per_s": statistics.median(rates[2:] or rates), "peak_memory_gb": peak_memory_gb(),
            "compile_seconds": 0.0}


def child(args) -> None:
    if args.side in TRL_CONFIGS:
        result = run_trl(args, TRL_CONFIGS[args.side][1])
    else:
        result = run_treg(args, args.side)
        result["tokens_per_s"] *= args.processes  # treg logs the mean per process
    line = "RESULT " + json.dumps({**result, "rank": int(os.environ.get("RANK", 0))}) + "\n"
    os.write(1, line.encode())  # one write: the ranks share stdout, and a short write is not interleaved


def launch(args, side: str, processes: int, timeout: float | None = None) -> dict:
    """One side in fresh processes; tokens/s summed over them (treg: rank 0's total), memory of the largest;
    for treg, the checkpointing and the peak its memory plan chose. An error or a timeout is a row too."""
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
        command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                    *command] if side in TREG_SIDES else
                   # accelerate's --cpu starts one process (its multi-CPU mode expects MPI); --multi_gpu starts
                   # them with torch.distributed, and Accelerate picks gloo where there is no GPU.
                   [str(bin_dir / "accelerate"), "launch", "--multi_gpu", f"--num_processes={processes}",
                    "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", *command])
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    results = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if len(results) != processes:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {"error": (lines[-1] if lines else f"exit code {done.returncode}")[-300:]}
    rates = [r["tokens_per_s"] for r in results]
    out = {"tokens_per_s": rates[0] if side in TREG_SIDES else sum(rates),
           "peak_memory_gb": max(r["peak_memory_gb"] for r in results),
           "compile_seconds": max(r["compile_seconds"] for r in results)}
    if side in TREG_SIDES:
        plan = re.search(r"memory plan: ([\d.]+) GB.*checkpointing: ([a-z ]+);", done.stderr)
        out["planned_gb"], out["checkpointing"] = float(plan.group(1)), plan.group(2)
    else:
        out["checkpointing"] = TRL_CONFIGS[side][2]
    return out


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
                dtype="float32", max_length=args.max_length, max_prompt_length=args.max_length // 2, overwrite=True,
                reward_check=False))


def sides_to_run(names: str) -> list[str]:
    import torch

    known = {**{k: v[3] for k, v in TRL_CONFIGS.items()}, **{k: v[2] for k, v in TREG_SIDES.items()}}
    return [name for name in names.split(",") if name and (torch.cuda.is_available() or not known[name])]


def table(results: dict[str, dict], processes: int, flops_per_token: float | None = None,
          peak_flops: float | None = None) -> list[str]:
    """One line per side: its figures, against TRL's fastest row at the same checkpointing and TRL's fastest."""
    trl = {side: r for side, r in results.items() if side in TRL_CONFIGS and "error" not in r}
    best = max(trl, key=lambda side: trl[side]["tokens_per_s"]) if trl else None
    lines = [f"{'proc':<5}{'trainer':<80}{'checkpointing':<19}{'tokens/s':>9}{'peak GB':>9}"
             + (f"{'MFU':>6}" if peak_flops else "") + f"{'compile s':>10}{'plan GB':>9}"
             + f"{'vs TRL same ckpt':>19}{'vs TRL best':>15}"]
    for side, r in results.items():
        label = TRL_CONFIGS[side][0] if side in TRL_CONFIGS else TREG_SIDES[side][0]
        if "error" in r:
            lines.append(f"{processes:<5}{label:<80}failed: {r['error']}")
            continue
        same = [s for s in trl if trl[s]["checkpointing"] == r["checkpointing"]]
        match = max(same, key=lambda s: trl[s]["tokens_per_s"]) if same else None
        mfu = (f"{r['tokens_per_s'] * flops_per_token / peak_flops:>6.0%}" if peak_flops else "")
        lines.append(f"{processes:<5}{label + (' (TRL best)' if side == best else ''):<80}{r['checkpointing']:<19}"
                     f"{r['tokens_per_s']:>9,.0f}{r['peak_memory_gb']:>9.2f}{mfu}{r['compile_seconds']:>10.0f}"
                     f"{format(r['planned_gb'], '.2f') if 'planned_gb' in r else '-':>9}{ratio(r, trl.get(match)):>19}"
                     f"{ratio(r, trl.get(best)):>15}")
    return lines


def ratio(row: dict, other: dict | None) -> str:
    """Speed and memory of `row` against `other`'s."""
    if other is None:
        return "-"
    return f"{row['tokens_per_s'] / other['tokens_per_s']:.2f}x {row['peak_memory_gb'] / other['peak_memory_gb']:.2f}x"


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
    parser.add_argument("--sides", default=DEFAULT_SIDES, help=f"rows among {[*TRL_CONFIGS, *TREG_SIDES]}")
    parser.add_argument("--side", choices=[*TRL_CONFIGS, *TREG_SIDES], help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.side:
        args.processes = int(args.processes)
        return child(args)
    prepare(args)
    print(f"\nmodel {args.model} | data {args.data} | global batch {args.batch} pairs | max length {args.max_length} | "
          f"{args.steps} steps | fp32 on CPU unless a GPU is present | {os.cpu_count()} CPU cores")
    for processes in [int(p) for p in args.processes.split(",")]:
        results = {}
        for side in sides_to_run(args.sides):
            results[side] = launch(args, side, processes)
            print(table({side: results[side]}, processes)[-1], file=sys.stderr, flush=True)  # progress
        print("\n".join(table(results, processes)), flush=True)


if __name__ == "__main__":
    main()
