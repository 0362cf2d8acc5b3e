"""The credit-assignment benchmark, end to end, in one command:

    .venv/bin/python pipelines/credit/run.py [--seeds 0,1,2] [--output runs/credit]

1. builds (once, cached) the small model of `build_model.py`: the SFT starting policy, which
   also understands this world's revision prompts;
2. per seed: samples the policy's answers to training tasks and keeps the best and the worst of
   each task by a judge of the whole answer (sequence-level preference pairs);
3. scores the pairs with treg-score (real vLLM) and measures how well r̂ separates the
   ground-truth bad tokens from the good ones (AUROC);
4. trains one model per method with treg-train, and measures on held-out tasks the AUROC of
   its implicit token rewards β·log π_θ/π_ref against the ground truth, and the success rate of
   its greedy answers;
5. prints the table (mean ± standard deviation over seeds) and writes results.json.

A rerun picks up where it stopped: each finished measurement is kept in its seed's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_model  # noqa: E402
import policy  # noqa: E402
import world  # noqa: E402

# treg-train flags of each method; everything else is shared (see Settings).
METHODS = {
    "dpo": ["--loss", "dpo"],
    "dpo_reg": ["--loss", "dpo_reg"],
    "dpo_reg_static": ["--loss", "dpo_reg", "--static-weight"],
    "sft_chosen": ["--loss", "sft_chosen"],
    "simpo": ["--loss", "simpo"],
    "simpo_reg": ["--loss", "simpo_reg"],
}
LABELS = {
    "dpo": "DPO",
    "dpo_reg": "DPO + T-REG",
    "dpo_reg_static": "DPO + T-REG, static weight (w = 1)",
    "sft_chosen": "DPO + SFT on chosen",
    "simpo": "SimPO",
    "simpo_reg": "SimPO + T-REG",
}


@dataclass(frozen=True)
class Settings:
    train_tasks: int = 1500
    heldout_tasks: int = 30  # of the world's 100 prompts
    samples: int = 4  # policy samples per training task; best and worst make the pair
    heldout_samples: int = 20  # labelled policy samples per held-out task, for the AUROC
    build_steps: int = 1500
    epochs: int = 2
    learning_rate: float = 2e-4
    global_batch_size: int = 32
    dpo_beta: float = 0.1


SMOKE = Settings(train_tasks=48, heldout_tasks=10, heldout_samples=4, build_steps=20, epochs=1)


def write_json(path: Path, data) -> None:
    """Write aside, then rename: a kill never leaves a half-written result behind."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1))
    partial.replace(path)


def run(command: list[str], log: Path) -> None:
    print("$ " + " ".join(command), flush=True)
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"credit benchmark: a step failed (exit {result.returncode}); see {log}")


def split_tasks(seed: int, train_count: int, heldout_count: int) -> tuple[list[world.Task], list[world.Task]]:
    """Held-out prompts are a seeded share of the world that no preference pair is drawn from;
    training tasks are drawn, with repeats, from the rest."""
    rng, tasks = random.Random(seed), world.all_tasks()
    rng.shuffle(tasks)
    heldout, pool = tasks[:heldout_count], tasks[heldout_count:]
    return [rng.choice(pool) for _ in range(train_count)], heldout


# ---- the stages ----------------------------------------------------------------------------------


def make_pairs(model, tokenizer, tasks: list[world.Task], settings: Settings, seed: int, folder: Path) -> dict:
    """Best and worst of the policy's samples per task by the judge; ties make no pair."""
    samples = policy.answers(model, tokenizer, tasks, samples=settings.samples, seed=seed)
    rows, judged = [], {"chosen": [], "rejected": []}
    for n, (task, answers) in enumerate(zip(tasks, samples)):
        scores = [world.judge(task, a) for a in answers]
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        if scores[best] == scores[worst]:
            continue
        rows.append({"id": f"s{seed}-{n}", "prompt": task.prompt, "chosen": answers[best], "rejected": answers[worst],
                     "task": asdict(task)})
        judged["chosen"].append(scores[best])
        judged["rejected"].append(scores[worst])
    with open(folder / "pairs.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return {"pairs": len(rows), "tasks": len(tasks), "judge_chosen": float(np.mean(judged["chosen"])),
            "judge_rejected": float(np.mean(judged["rejected"]))}


def score_pairs(model_dir: Path, folder: Path, enforce_eager: bool) -> Path:
    template = folder / "revision-prompts.yaml"
    template.write_text(yaml.safe_dump(world.REVISION_PROMPTS))
    scored = folder / "scored"
    command = [str(Path(sys.executable).parent / "treg-score"), "--model", str(model_dir),
               "--dataset", str(folder / "pairs.jsonl"),
               "--output", str(scored), "--revision-prompts", str(template), "--dtype", "float32", "--max-length", "64",
               "--max-prompt-length", "48", "--batch-size", "128", "--overwrite"]
    run(command + (["--enforce-eager"] if enforce_eager else []), folder / "score.log")
    return scored


def rhat_auroc(tokenizer, folder: Path, scored: Path) -> dict:
    """AUROC of the stored r̂ against the ground truth, over every token of every scored response;
    the reference log-prob (the policy's own confidence) as the baseline to beat."""
    import pyarrow.parquet as pq

    tasks = {row["id"]: world.Task(**row["task"]) for row in map(json.loads, open(folder / "pairs.jsonl"))}
    labels, rewards, ref_logps = [], [], []
    for file in sorted((scored / "data").glob("*.parquet")):
        for row in pq.read_table(file).to_pylist():
            for side in ("chosen", "rejected"):
                labels.append(policy.labels_of(tokenizer, tasks[row["id"]], row[side][0]["content"],
                                               row[f"{side}_ids"]))
                rewards.append(row[f"{side}_rewards"])
                ref_logps.append(row[f"{side}_ref_logps"])
    labels = np.concatenate(labels)
    return {"rhat_auroc": world.auroc(np.concatenate(rewards), labels),
            "ref_logp_auroc": world.auroc(np.concatenate(ref_logps), labels),
            "tokens_good": int((labels == world.GOOD).sum()), "tokens_bad": int((labels == world.BAD).sum())}


@dataclass
class HeldOut:
    tasks: list[world.Task]
    requests: list[tuple[list[int], list[int]]]  # labelled policy samples: (prompt ids, response ids)
    labels: np.ndarray  # every response token's label, concatenated
    ref_logps: np.ndarray  # the starting policy's log-probs of the same tokens


def held_out(model, tokenizer, model_dir: Path, tasks: list[world.Task], settings: Settings, seed: int) -> HeldOut:
    samples = policy.answers(model, tokenizer, tasks, samples=settings.heldout_samples, seed=seed + 1)
    requests, labels = [], []
    for task, answers in zip(tasks, samples):
        for answer in answers:
            prompt_ids, ids = policy.response_ids(tokenizer, task, answer)
            requests.append((prompt_ids, ids))
            labels.append(policy.labels_of(tokenizer, task, answer, ids))
    ref = np.concatenate(policy.token_logps(model_dir, requests))
    return HeldOut(tasks, requests, np.concatenate(labels), ref)


def success_rate(model, tokenizer, tasks: list[world.Task]) -> float:
    greedy = policy.answers(model, tokenizer, tasks, samples=0)
    return float(np.mean([world.is_solved(t, a[0]) for t, a in zip(tasks, greedy)]))


def train_and_measure(method: str, model_dir: Path, scored: Path, heldout: HeldOut, settings: Settings, seed: int,
                      folder: Path) -> dict:
    out = folder / f"train-{method}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "treg_train", "--model", str(model_dir), "--data", str(scored),
               "--output", str(out), *METHODS[method], "--learning-rate", str(settings.learning_rate),
               "--global-batch-size", str(settings.global_batch_size), "--num-train-epochs", str(settings.epochs),
               "--max-length", "64", "--micro-batch-tokens", "4096", "--logging-steps", "5", "--save-steps", "0",
               "--seed", str(seed)]
    if not method.startswith("simpo"):
        command += ["--beta", str(settings.dpo_beta)]
    started = time.perf_counter()
    run(command, folder / f"train-{method}.log")
    trained, tokenizer = policy.load(out / "final")
    logps = np.concatenate(policy.token_logps(out / "final", heldout.requests))
    return {"implicit_auroc": world.auroc(logps - heldout.ref_logps, heldout.labels),
            "success": success_rate(trained, tokenizer, heldout.tasks),
            "train_seconds": time.perf_counter() - started}


def run_seed(seed: int, model_dir: Path, settings: Settings, methods: list[str], output: Path,
             enforce_eager: bool) -> dict:
    folder = output / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "results.json"
    results = json.loads(done.read_text()) if done.exists() else {}
    model, tokenizer = policy.load(model_dir)
    train_tasks, heldout_tasks = split_tasks(seed, settings.train_tasks, settings.heldout_tasks)
    if "stage_one" not in results:
        print(f"\n=== seed {seed}: pairs from the policy's samples, then treg-score ===", flush=True)
        pairs = make_pairs(model, tokenizer, train_tasks, settings, seed, folder)
        scored = score_pairs(model_dir, folder, enforce_eager)
        results["stage_one"] = {**pairs, **rhat_auroc(tokenizer, folder, scored)}
        results["reference"] = {"success": success_rate(model, tokenizer, heldout_tasks)}
        write_json(done, results)
    print(f"seed {seed}: {json.dumps(results['stage_one'])}", flush=True)
    heldout = None
    for method in methods:
        if method in results:
            continue
        heldout = heldout or held_out(model, tokenizer, model_dir, heldout_tasks, settings, seed)
        results[method] = train_and_measure(method, model_dir, folder / "scored", heldout, settings, seed, folder)
        print(f"seed {seed} {method}: {json.dumps(results[method])}", flush=True)
        write_json(done, results)
    return results


# ---- the table -----------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def table(per_seed: dict[int, dict], methods: list[str]) -> str:
    seeds = sorted(per_seed)
    stage_one = [per_seed[s]["stage_one"] for s in seeds]
    lines = [
        f"seeds {', '.join(map(str, seeds))}; mean ± standard deviation over seeds",
        "",
        "stage one: how well a per-token score separates bad tokens from good ones (AUROC, 0.5 = chance)",
        "",
        "| token score | AUROC |",
        "|---|---|",
        f"| r̂ (treg-score, contrastive revision prompts) | {mean_std([s['rhat_auroc'] for s in stage_one])} |",
        f"| log π_ref (the policy's own confidence) | {mean_std([s['ref_logp_auroc'] for s in stage_one])} |",
        "",
        f"pairs per seed: {np.mean([s['pairs'] for s in stage_one]):.0f} from {stage_one[0]['tasks']} sampled tasks; "
        f"judge score chosen {np.mean([s['judge_chosen'] for s in stage_one]):.2f}, "
        f"rejected {np.mean([s['judge_rejected'] for s in stage_one]):.2f}",
        "",
        "after training, on held-out tasks",
        "",
        "| method | implicit token reward AUROC | greedy success rate |",
        "|---|---|---|",
        f"| starting policy (SFT) | — | {mean_std([per_seed[s]['reference']['success'] for s in seeds])} |",
    ]
    for method in methods:
        auc = mean_std([per_seed[s][method]["implicit_auroc"] for s in seeds])
        lines.append(f"| {LABELS[method]} | {auc} | {mean_std([per_seed[s][method]['success'] for s in seeds])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output", type=Path, default=Path("runs/credit"))
    parser.add_argument("--model-dir", type=Path, default=build_model.DEFAULT_FOLDER,
                        help="where the built model is cached")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--smoke", action="store_true", help="a minute-scale run on a barely trained model (for tests)")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM: skip graph compilation")
    args = parser.parse_args()
    settings = SMOKE if args.smoke else Settings()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    started = time.perf_counter()
    args.output.mkdir(parents=True, exist_ok=True)
    print("=== the model (built once, then cached) ===", flush=True)
    model_dir = build_model.build(args.model_dir, steps=settings.build_steps)
    per_seed = {int(s): run_seed(int(s), model_dir, settings, methods, args.output, args.enforce_eager)
                for s in args.seeds.split(",")}
    report = table(per_seed, methods)
    write_json(args.output / "results.json", {"settings": asdict(settings), "model": str(model_dir), "seeds": per_seed})
    print(f"\n=== credit assignment benchmark, {time.perf_counter() - started:.0f}s ===\n{report}\n\n"
          f"results in {args.output / 'results.json'}")


if __name__ == "__main__":
    main()
