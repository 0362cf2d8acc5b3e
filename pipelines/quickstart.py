"""The whole T-REG job on a laptop: no GPU, no downloads, a few minutes on 2 CPU cores.

    .venv/bin/python pipelines/quickstart.py [--output runs/quickstart]

1. builds (once, cached) a small local model and tokenizer that understands T-REG's revision prompts
   (pipelines/quickstart_model.py: about 100 s the first time);
2. scores the shipped preference pairs (pipelines/data/quickstart-pairs.jsonl) with the real
   vLLM engine: treg-score;
3. trains it with dpo_reg under torchrun, 2 processes on the CPU: treg-train;
4. writes the token-reward report of the most extreme pairs, with the trained model's implicit
   token rewards beside the self-generated ones (treg-inspect), and the training curves
   (treg-curves).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import quickstart_model

from treg_data.probe import check_line

HERE = Path(__file__).resolve().parent
PAIRS = HERE / "data" / "quickstart-pairs.jsonl"
BETA = 0.1


def stage(number: int, title: str) -> float:
    print(f"\n=== [{number}/4] {title} ===", flush=True)
    return time.perf_counter()


def run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command)
    if result.returncode:
        sys.exit(f"quickstart: this step failed (exit {result.returncode}); its output is above")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/quickstart", help="where everything goes")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/treg"), help="where the built model is kept")
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes for training")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--build-steps", type=int, default=quickstart_model.STEPS,
                        help="training steps of the model, when built (another count caches another model)")
    args = parser.parse_args()
    if args.build_steps < 1:
        parser.error(f"--build-steps {args.build_steps}: the model needs at least 1 training step")
    output, started = Path(args.output).resolve(), time.perf_counter()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    bin_dir = Path(sys.executable).parent
    timings = {}

    t = stage(1, "a small local model that understands the revision prompts")
    model = Path(args.cache) / quickstart_model.folder_name(args.build_steps)
    if (model / "config.json").exists():
        print(f"using the cached model in {model}")
    else:
        quickstart_model.build(model, steps=args.build_steps)
        print(f"built {model}")
    timings["model"] = time.perf_counter() - t

    t = stage(2, f"scoring {PAIRS.name} with vLLM (treg-score)")
    scored = output / "scored"
    run([str(bin_dir / "treg-score"), "--model", str(model), "--dataset", str(PAIRS), "--output", str(scored),
         "--dtype", "float32", "--max-length", "512", "--max-prompt-length", "256", "--batch-size", "64",
         "--shard-size", "100", "--enforce-eager"])
    timings["scoring"] = time.perf_counter() - t

    t = stage(3, f"training dpo_reg with torchrun, {args.processes} processes (treg-train)")
    train = output / "train"
    shutil.rmtree(train, ignore_errors=True)  # a rerun trains again from the start
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.processes),
         "-m", "treg_train", "--model", str(model), "--data", str(scored), "--output", str(train), "--loss", "dpo_reg",
         "--beta", str(BETA), "--alpha", "0.25", "--learning-rate", "2e-4", "--global-batch-size", "16",
         "--num-train-epochs", str(args.epochs), "--max-length", "512", "--micro-batch-tokens", "4096",
         "--logging-steps", "2", "--save-steps", "20"])
    timings["training"] = time.perf_counter() - t

    t = stage(4, "the token-reward report (treg-inspect) and the training curves (treg-curves)")
    report, curves = output / "report.html", output / "curves.html"
    run([str(bin_dir / "treg-inspect"), str(scored), "--extreme", "8", "--checkpoint", str(train / "final"),
         "--beta", str(BETA), "--output", str(report)])
    run([str(bin_dir / "treg-curves"), str(train), "--output", str(curves)])
    timings["report"] = time.perf_counter() - t

    metrics = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((scored / "manifest.json").read_text())
    check, manifest = manifest["reward_check"], manifest["counts"]
    stages = (f"model {timings['model']:.0f}s, scoring {timings['scoring']:.0f}s, "
              f"training {timings['training']:.0f}s, report {timings['report']:.0f}s")
    first, last = metrics[0], metrics[-1]
    training = (f"{last['epoch']:g} epochs, loss {first['loss']:.3f} -> {last['loss']:.3f}, "
                f"reward accuracy {first['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}")
    print(f"""
=== quickstart finished in {time.perf_counter() - started:.0f}s ===
  stages           {stages}
  pairs            {manifest['pairs_scored']} scored, {manifest['pairs_skipped']} skipped
  token rewards    {credit_line(scored)}
  reward check     {check_line(f"set {check['used']}", check['sets'][check['used']])} (treg's probe pairs)
  training         {training}
  scored shards    {scored}/data  (manifest.json beside them)
  trained model    {train / 'final'}
  metrics          {train / 'metrics.jsonl'}
  report           {report}  (open it in a browser)
  curves           {curves}
""")


def credit_line(scored: Path) -> str:
    """How well r̂ finds where a rejected answer goes wrong: of the pairs whose rejected answer departs from the
    chosen one after a common start, how often its lowest r̂ is on the first token that differs."""
    import numpy as np
    import pyarrow.parquet as pq

    rows = pq.read_table(scored / "data", columns=["chosen_ids", "rejected_ids", "chosen_rewards",
                                                   "rejected_rewards"]).to_pylist()
    found = chance = judged = 0
    for row in rows:
        chosen, rejected = row["chosen_ids"], row["rejected_ids"]
        first = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), None)
        if first:  # a common start, then a departure
            judged += 1
            found += int(np.argmin(row["rejected_rewards"]) == first)
            chance += 1 / len(rejected)
    sums = {side: np.mean([sum(row[f"{side}_rewards"]) for row in rows]) for side in ("chosen", "rejected")}
    return (f"mean Σ r̂ {sums['chosen']:+.3f} chosen, {sums['rejected']:+.3f} rejected; the lowest r̂ of a rejected "
            f"answer is on its first wrong token in {found / max(judged, 1):.0%} of {judged} pairs (chance "
            f"{chance / max(judged, 1):.0%})")


if __name__ == "__main__":
    main()
