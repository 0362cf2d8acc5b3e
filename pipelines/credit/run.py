"""The credit-assignment benchmark, end to end, in one command:

    .venv/bin/python pipelines/credit/run.py [--seeds 0,1,2,3,4] [--output runs/credit]
    .venv/bin/python pipelines/credit/run.py --alpha-grid        # then: α swept where T-REG moves most
    .venv/bin/python pipelines/credit/run.py --alpha-regime noisy-400   # or in a regime you name
    .venv/bin/python pipelines/credit/run.py --study token-zero,token-mixed   # round two: the token-level methods

1. builds (once, cached) the small model of `build_model.py`: the SFT starting policy, which
   also understands this world's revision prompts;
2. per seed and pool (short answers, the same pairs with a share swapped by a noisy judge, long
   answers): samples the policy's answers to training tasks and keeps the best and the worst of
   each task by a judge of the whole answer (sequence-level preference pairs);
3. scores each pool with treg-score (real vLLM) and measures how well r̂ separates the
   ground-truth bad tokens from the good ones (AUROC), on all tokens and on the hard ones;
4. per regime (a pool and a number of pairs, one epoch) trains one model per method with
   treg-train, and measures on held-out prompts the AUROC of its implicit token rewards
   β·log π_θ/π_ref against the ground truth, and the success rate of its greedy and sampled
   answers; the methods that read a DPO model's token log-probs (DPO-reward regularization, TGDPO,
   SePO, TIS-DPO with models) read the pool scored again with the regime's own DPO model and a
   reverse-DPO model trained on the same pairs with chosen and rejected swapped;
5. prints the tables (means and paired differences with 95% intervals over seeds), writes
   results.json, table.md and a plot: the learning curves (curves.png), or for the token-level
   studies every method's difference from DPO (token_methods.png).

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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_model  # noqa: E402
import policy  # noqa: E402
import report  # noqa: E402
import world  # noqa: E402

from treg_core.atomic import write_json  # noqa: E402

# treg-train flags of each method; everything else is shared (see Settings).
METHODS = {
    "dpo": ["--loss", "dpo"],
    "dpo_reg": ["--loss", "dpo_reg"],
    "simpo": ["--loss", "simpo"],
    "simpo_reg": ["--loss", "simpo_reg"],
    "wpo": ["--loss", "wpo"],
    "wpo_reg": ["--loss", "wpo_reg"],
    "dporeward_reg": ["--loss", "dpo_reg", "--reward-column", "dpo_rewards"],
    "dpo_reg_static": ["--loss", "dpo_reg", "--static-weight"],
    "sft_chosen": ["--loss", "sft_chosen"],
    "d2po": ["--loss", "d2po"],
    "confpo": ["--loss", "confpo"],
    "tgdpo": ["--loss", "tgdpo"],
    "tis_dpo": ["--loss", "tis_dpo"],
    "tis_dpo_models": ["--loss", "tis_dpo", "--tis-dpo-weights", "models"],
    "sepo": ["--loss", "sepo"],
    "tdpo2": ["--loss", "tdpo2"],  # with the starting policy as --ref-model: the exact KL
    "otpo": ["--loss", "otpo", "--otpo-epsilon", "0.1"],  # the authors' ε with β 0.1 (their 3B settings)
    "cdpo": ["--loss", "cdpo"],
}
WITH_REFERENCE = ("tdpo2",)  # the starting policy held in memory as --ref-model
REVERSE_DPO = ["--loss", "dpo", "--swap-pairs"]  # TIS-DPO's reverse-DPO model, trained for the models, not measured
DEFAULT_METHODS = ("dpo", "dpo_reg", "simpo", "simpo_reg", "wpo", "wpo_reg", "dporeward_reg")
TOKEN_METHODS = ("dpo", "dpo_reg", "simpo", "d2po", "confpo", "tgdpo", "tis_dpo", "tis_dpo_models", "sepo", "tdpo2",
                 "otpo", "cdpo")
OWN_BETA = ("simpo", "simpo_reg", "confpo", "sepo")  # trained at their own β (and γ), not Settings.dpo_beta
# Read the pool scored with the DPO models (cDPO: as its positive and negative models, --ce-scores).
ON_DPO_MODELS = ("dporeward_reg", "tgdpo", "sepo", "tis_dpo_models", "cdpo")
# The α grid: with 0 (plain DPO) and 0.25 (the default, dpo_reg) these make the paper's grid.
ALPHAS = (0.1, 0.5, 1.0)


@dataclass(frozen=True)
class Pool:
    """The scored pairs of one seed that regimes train on."""

    lengths: tuple[int, ...]  # the world's answer lengths (world.SHORT or world.LONG)
    pairs: int
    noise: float = 0.0  # share of pairs whose chosen and rejected are swapped (a noisy judge)
    max_length: int = 64  # treg-score / treg-train --max-length
    max_prompt_length: int = 48  # room for a revision prompt quoting the draft


@dataclass(frozen=True)
class Regime:
    """Training on the first `pairs` pairs of the seed's shuffled pool, each seen once."""

    pool: str
    pairs: int


@dataclass(frozen=True)
class Settings:
    pools: dict
    regimes: dict
    heldout_tasks: int = 30  # of the world's 100 prompts of each length set
    samples: int = 4  # policy samples per training task; best and worst make the pair
    heldout_samples: int = 20  # labelled policy samples per held-out prompt, for the AUROC
    success_samples: int = 8  # sampled answers per held-out prompt, for the sampled success rate
    build_steps: int = 2400
    learning_rate: float = 2e-4
    global_batch_size: int = 8
    dpo_beta: float = 0.1
    world: str = "zero"  # a key of world.MISCONCEPTIONS
    backend: str = "vllm"  # treg-score --backend
    against_dpo: bool = False  # compare every method with DPO (else each regularized method with its base)


CURVE = (50, 100, 200, 400)
SETTINGS = Settings(
    pools={"short": Pool(world.SHORT, max(CURVE)), "noisy": Pool(world.SHORT, max(CURVE), noise=0.25),
           "long": Pool(world.LONG, 200, max_length=128, max_prompt_length=96)},
    regimes={**{f"pairs-{n}": Regime("short", n) for n in CURVE},
             "noisy-400": Regime("noisy", 400), "long-200": Regime("long", 200)},
)
TOKEN_ZERO = replace(SETTINGS, pools={"short": Pool(world.SHORT, 200)}, regimes={"pairs-100": Regime("short", 100)},
                     backend="hf", against_dpo=True)
TOKEN_MIXED = replace(TOKEN_ZERO, world="mixed", pools={"short": Pool(world.SHORT, 200),
                                                        "noisy": Pool(world.SHORT, 200, noise=0.25)},
                      regimes={"pairs-100": Regime("short", 100), "noisy-200": Regime("noisy", 200)})
# The studies (docs/CREDIT_ASSIGNMENT.md): settings and the methods they train by default.
STUDIES = {"paper": (SETTINGS, DEFAULT_METHODS), "token-zero": (TOKEN_ZERO, TOKEN_METHODS),
           "token-mixed": (TOKEN_MIXED, TOKEN_METHODS)}
SMOKE = replace(
    SETTINGS, heldout_tasks=10, heldout_samples=4, success_samples=2, build_steps=20,
    pools={"short": Pool(world.SHORT, 16), "long": Pool(world.LONG, 8, max_length=128, max_prompt_length=96)},
    regimes={"pairs-16": Regime("short", 16), "long-8": Regime("long", 8)},
)


def run(command: list[str], log: Path, env: dict | None = None) -> None:
    print("$ " + " ".join(command), flush=True)
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if result.returncode:
        raise RuntimeError(f"credit benchmark: a step failed (exit {result.returncode}); see {log}")


def split_tasks(seed: int, lengths: tuple[int, ...], heldout_count: int,
                world_name: str = "zero") -> tuple[list[world.Task], list[world.Task]]:
    """Held-out prompts are a seeded share of the world that no preference pair is drawn from;
    training prompts are the rest."""
    tasks = world.all_tasks(lengths, world_name)
    random.Random(seed).shuffle(tasks)
    return tasks[heldout_count:], tasks[:heldout_count]


# ---- stage one: pairs and their token rewards ----------------------------------------------------


def make_pairs(model, tokenizer, prompts: list[world.Task], pool: Pool, settings: Settings, seed: int) -> list[dict]:
    """Best and worst of the policy's samples per task by the judge, until the pool is full;
    tasks whose samples tie make no pair."""
    rng, rows, round_ = random.Random(seed), [], 0
    while len(rows) < pool.pairs:
        tasks = [rng.choice(prompts) for _ in range(pool.pairs)]
        samples = policy.answers(model, tokenizer, tasks, samples=settings.samples, seed=seed * 1000 + round_)
        for task, answers in zip(tasks, samples):
            scores = [world.judge(task, a) for a in answers]
            best, worst = int(np.argmax(scores)), int(np.argmin(scores))
            if scores[best] > scores[worst] and len(rows) < pool.pairs:
                rows.append({"id": f"s{seed}-{len(rows)}", "prompt": task.prompt, "chosen": answers[best],
                             "rejected": answers[worst], "task": asdict(task),
                             "judge": [scores[best], scores[worst]]})
        round_ += 1
    return rows


def noisy_copy(rows: list[dict], share: float, seed: int) -> list[dict]:
    """The same pairs, in the same order, with a seeded share of them swapped."""
    rng, out = random.Random(seed + 7919), []
    for row in rows:
        if rng.random() < share:
            row = {**row, "chosen": row["rejected"], "rejected": row["chosen"], "swapped": True}
        out.append(row)
    return out


def score(model_dir: Path, pairs: Path, scored: Path, pool: Pool, settings: Settings, enforce_eager: bool,
          dpo_models: tuple[Path, Path] | None = None) -> Path:
    """treg-score on the pairs; with `dpo_models`, also the token log-probs of the DPO and reverse-DPO models, and
    their contrastive estimate as cDPO's positive and negative models."""
    template = pairs.parent / "revision-prompts.yaml"
    template.write_text(yaml.safe_dump(world.REVISION_PROMPTS))
    command = [str(Path(sys.executable).parent / "treg-score"), "--model", str(model_dir), "--dataset", str(pairs),
               "--output", str(scored), "--revision-prompts", str(template), "--dtype", "float32",
               "--max-length", str(pool.max_length), "--max-prompt-length", str(pool.max_prompt_length),
               "--batch-size", "256", "--overwrite", "--backend", settings.backend, "--no-reward-check"]
    command += ["--enforce-eager"] if enforce_eager else []
    command += ["--dpo-model", str(dpo_models[0]), "--reverse-dpo-model", str(dpo_models[1]),
                "--ce-scores"] if dpo_models else []
    run(command, scored.with_suffix(".log"))
    return scored


def token_truth(tokenizer, task: world.Task, response: str, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth label and hard-step flag of each response token."""
    from treg_data.report import token_texts

    texts = token_texts(tokenizer, [], ids)
    return policy.labels_of(tokenizer, task, response, ids), world.token_flags(texts, world.hard_chars(task, response))


def aurocs(scores: np.ndarray, labels: np.ndarray, hard: np.ndarray, prefix: str) -> dict:
    return {f"{prefix}_auroc": world.auroc(scores, labels),
            f"{prefix}_hard_auroc": world.auroc(scores[hard], labels[hard])}


def stage_one(tokenizer, rows: list[dict], scored: Path) -> dict:
    """AUROC of the stored r̂ against the ground truth, over every token of every scored response and
    over the hard ones; the reference log-prob (the policy's own confidence) as the baseline."""
    import pyarrow.parquet as pq

    tasks = {row["id"]: world.Task(**row["task"]) for row in rows}
    labels, hard, rewards, ref_logps = [], [], [], []
    for file in sorted((scored / "data").glob("*.parquet")):
        for row in pq.read_table(file).to_pylist():
            for side in ("chosen", "rejected"):
                truth = token_truth(tokenizer, tasks[row["id"]], row[side][0]["content"], row[f"{side}_ids"])
                labels.append(truth[0])
                hard.append(truth[1])
                rewards.append(row[f"{side}_rewards"])
                ref_logps.append(row[f"{side}_ref_logps"])
    labels, hard = np.concatenate(labels), np.concatenate(hard)
    return {**aurocs(np.concatenate(rewards), labels, hard, "rhat"),
            **aurocs(np.concatenate(ref_logps), labels, hard, "ref_logp"),
            "pairs": len(rows), "swapped": sum(bool(r.get("swapped")) for r in rows),
            "judge_chosen": float(np.mean([r["judge"][0] for r in rows])),
            "judge_rejected": float(np.mean([r["judge"][1] for r in rows])),
            "tokens_good": int((labels == world.GOOD).sum()), "tokens_bad": int((labels == world.BAD).sum()),
            "tokens_hard": int((hard & (labels != world.NEUTRAL)).sum())}


# ---- stage two: training and held-out measurements -----------------------------------------------


@dataclass
class HeldOut:
    tasks: list[world.Task]
    requests: list[tuple[list[int], list[int]]]  # labelled policy samples: (prompt ids, response ids)
    labels: np.ndarray  # every response token's label, concatenated
    hard: np.ndarray  # whether the token is a hard step
    ref_logps: np.ndarray  # the starting policy's log-probs of the same tokens


def held_out(model, tokenizer, model_dir: Path, tasks: list[world.Task], settings: Settings, seed: int) -> HeldOut:
    samples = policy.answers(model, tokenizer, tasks, samples=settings.heldout_samples, seed=seed + 1)
    requests, labels, hard = [], [], []
    for task, answers in zip(tasks, samples):
        for answer in answers:
            prompt_ids, ids = policy.response_ids(tokenizer, task, answer)
            requests.append((prompt_ids, ids))
            truth = token_truth(tokenizer, task, answer, ids)
            labels.append(truth[0])
            hard.append(truth[1])
    ref = np.concatenate(policy.token_logps(model_dir, requests))
    return HeldOut(tasks, requests, np.concatenate(labels), np.concatenate(hard), ref)


def success(model, tokenizer, heldout: HeldOut, settings: Settings, seed: int) -> dict:
    """Exact right answers on the held-out prompts: greedy, and among sampled answers."""
    greedy = policy.answers(model, tokenizer, heldout.tasks, samples=0)
    sampled = policy.answers(model, tokenizer, heldout.tasks, samples=settings.success_samples, seed=seed + 2)
    return {"greedy_success": float(np.mean([world.is_solved(t, a[0]) for t, a in zip(heldout.tasks, greedy)])),
            "sampled_success": float(np.mean([world.is_solved(t, a) for t, s in zip(heldout.tasks, sampled)
                                              for a in s]))}


def train(method: str, model_dir: Path, scored: Path, pool: Pool, regime: Regime, settings: Settings, seed: int,
          out: Path, alpha: float | None = None) -> Path:
    """treg-train on the regime's pairs, on one thread; returns the final model's folder."""
    shutil.rmtree(out, ignore_errors=True)
    flags = REVERSE_DPO if method == "dpo_reverse" else METHODS[method]
    command = [sys.executable, "-m", "treg_train", "--model", str(model_dir), "--data", str(scored),
               "--output", str(out), *flags, "--learning-rate", str(settings.learning_rate),
               "--global-batch-size", str(settings.global_batch_size), "--num-train-epochs", "1",
               "--max-steps", str(regime.pairs // settings.global_batch_size), "--max-length", str(pool.max_length),
               "--micro-batch-tokens", "4096", "--logging-steps", "5", "--save-steps", "0", "--seed", str(seed)]
    command += [] if method in OWN_BETA else ["--beta", str(settings.dpo_beta)]
    command += [] if alpha is None else ["--alpha", str(alpha)]
    command += ["--ref-model", str(model_dir)] if method in WITH_REFERENCE else []
    run(command, out.with_suffix(".log"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out / "final"


def measure(final: Path, heldout: HeldOut, settings: Settings, seed: int) -> dict:
    trained, tokenizer = policy.load(final)
    logps = np.concatenate(policy.token_logps(final, heldout.requests))
    return {**aurocs(logps - heldout.ref_logps, heldout.labels, heldout.hard, "implicit"),
            **success(trained, tokenizer, heldout, settings, seed)}


class Seed:
    """One seed's pools, held-out sets and results (results.json in its folder, kept as it grows)."""

    def __init__(self, seed: int, model_dir: Path, settings: Settings, output: Path, enforce_eager: bool):
        self.seed, self.model_dir, self.settings, self.enforce_eager = seed, model_dir, settings, enforce_eager
        self.folder = output / f"seed-{seed}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.results_file = self.folder / "results.json"
        self.results = json.loads(self.results_file.read_text()) if self.results_file.exists() else {}
        self.model, self.tokenizer = policy.load(model_dir)
        self.heldouts: dict[tuple, HeldOut] = {}
        self.lock, self.scoring, self.measuring = threading.Lock(), threading.Lock(), threading.Lock()

    def record(self, key: str, value: dict) -> None:
        with self.lock:
            self.results[key] = value
            write_json(self.results_file, self.results)
        print(f"seed {self.seed} {key}: {json.dumps(value)}", flush=True)

    def prepare_pools(self) -> None:
        """Pairs, scoring and stage-one measurements of every pool (the noisy pool is the short one's
        pairs with a share swapped, so the two differ only in the swaps)."""
        drawn: dict[tuple, list[dict]] = {}
        for name, pool in self.settings.pools.items():
            folder, key = self.folder / f"pool-{name}", f"stage_one/{name}"
            if key in self.results and (folder / "scored").exists():
                continue
            folder.mkdir(exist_ok=True)
            prompts, _ = split_tasks(self.seed, pool.lengths, self.settings.heldout_tasks, self.settings.world)
            if (pool.lengths, pool.pairs) not in drawn:
                drawn[pool.lengths, pool.pairs] = make_pairs(self.model, self.tokenizer, prompts, pool, self.settings,
                                                             self.seed)
            rows = noisy_copy(drawn[pool.lengths, pool.pairs], pool.noise, self.seed)
            (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            scored = score(self.model_dir, folder / "pairs.jsonl", folder / "scored", pool, self.settings,
                           self.enforce_eager)
            self.record(key, stage_one(self.tokenizer, rows, scored))

    def heldout(self, lengths: tuple[int, ...]) -> HeldOut:
        if lengths not in self.heldouts:
            _, tasks = split_tasks(self.seed, lengths, self.settings.heldout_tasks, self.settings.world)
            self.heldouts[lengths] = held_out(self.model, self.tokenizer, self.model_dir, tasks, self.settings,
                                              self.seed)
            key = report.reference_key(lengths)
            if key not in self.results:
                self.record(key, success(self.model, self.tokenizer, self.heldouts[lengths], self.settings, self.seed))
        return self.heldouts[lengths]

    def train(self, regime_name: str, method: str, alpha: float | None = None) -> None:
        """Train one method in one regime and measure it (the DPO model is kept: the methods in
        ON_DPO_MODELS read the pool scored with it)."""
        key = f"{regime_name}/{method}" + ("" if alpha is None else f"@{alpha}")
        if key in self.results:
            return
        regime = self.settings.regimes[regime_name]
        pool = self.settings.pools[regime.pool]
        scored = self.folder / f"pool-{regime.pool}" / "scored"
        if method in ON_DPO_MODELS:
            scored = self.scored_with_dpo_models(regime_name, scored)
        started = time.perf_counter()
        out = self.folder / f"train-{key.replace('/', '-').replace('@', '-alpha-')}"
        final = train(method, self.model_dir, scored, pool, regime, self.settings, self.seed, out, alpha)
        with self.measuring:  # in turn: sampling seeds torch's one generator
            result = {**measure(final, self.heldout(pool.lengths), self.settings, self.seed),
                      "seconds": time.perf_counter() - started}
        self._keep(final, self.folder / f"{regime_name}-dpo-model") if (method, alpha) == ("dpo", None) \
            else shutil.rmtree(final)
        self.record(key, result)

    def scored_with_dpo_models(self, regime_name: str, scored: Path) -> Path:
        """The regime's pool scored again with its DPO model (the `dpo` run's) and a reverse-DPO model (trained here
        on the same pairs, swapped), each trained first where missing; once per regime."""
        regime = self.settings.regimes[regime_name]
        pool, out = self.settings.pools[regime.pool], self.folder / f"{regime_name}-contrastive"
        models = (self.folder / f"{regime_name}-dpo-model", self.folder / f"{regime_name}-reverse-dpo-model")
        with self.scoring:  # one scoring at a time, and once
            trained = False
            for method, kept in zip(("dpo", "dpo_reverse"), models):
                if not (kept / "config.json").exists():
                    self._keep(train(method, self.model_dir, scored, pool, regime, self.settings, self.seed,
                                     self.folder / f"train-{regime_name}-{method}-model"), kept)
                    trained = True
            if trained or not (out / "manifest.json").exists():
                score(self.model_dir, scored.parent / "pairs.jsonl", out, pool, self.settings, self.enforce_eager,
                      dpo_models=models)
        return out

    @staticmethod
    def _keep(final: Path, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        final.rename(folder)


def run_jobs(state: Seed, jobs: list[tuple], workers: int) -> None:
    with ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(state.train, *job) for job in jobs]:
            done.result()


def run_seed(seed: int, model_dir: Path, settings: Settings, methods: list[str], output: Path, enforce_eager: bool,
             workers: int, alpha_regime: str | None = None) -> dict:
    """Every training of a seed; `workers` at a time, each on one thread (the models are small)."""
    state = Seed(seed, model_dir, settings, output, enforce_eager)
    print(f"\n=== seed {seed}: pairs from the policy's samples, then treg-score ===", flush=True)
    state.prepare_pools()
    if alpha_regime:
        run_jobs(state, [(alpha_regime, "dpo_reg", alpha) for alpha in ALPHAS], workers)
        return state.results
    run_jobs(state, [(regime, method) for method in methods if method not in ON_DPO_MODELS
                     for regime in settings.regimes], workers)
    run_jobs(state, [(regime, method) for method in methods if method in ON_DPO_MODELS  # after the DPO models
                     for regime in settings.regimes], workers)
    return state.results


# ---- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="paper", help=f"one or more of {', '.join(STUDIES)}, comma-separated")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--output", type=Path, default=Path("runs/credit"))
    parser.add_argument("--model-dir", type=Path, help="where the built model is cached (default: its world's)")
    parser.add_argument("--methods", help=f"any of {', '.join(METHODS)} (default: the study's)")
    parser.add_argument("--alpha-grid", action="store_true",
                        help=f"train DPO + T-REG with α in {ALPHAS} in the regime where DPO + T-REG − DPO is largest")
    parser.add_argument("--alpha-regime", help="the α grid in this regime instead")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="trainings at a time")
    parser.add_argument("--smoke", action="store_true", help="a minute-scale run on a barely trained model (for tests)")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM: skip graph compilation")
    parser.add_argument("--backend", choices=("vllm", "hf"), help="treg-score --backend (default: the study's)")
    args = parser.parse_args()
    names = args.study.split(",")
    if unknown := sorted(set(names) - set(STUDIES)):
        sys.exit(f"unknown study {unknown}; choose from {', '.join(STUDIES)}")
    studies = {name: STUDIES[name] for name in names}
    if args.smoke:  # the smoke sizes, in each study's world, scorer and comparisons
        studies = {name: (replace(SMOKE, world=settings.world, backend=settings.backend,
                                  against_dpo=settings.against_dpo), methods)
                   for name, (settings, methods) in studies.items()}
    if args.backend:
        studies = {name: (replace(settings, backend=args.backend), methods)
                   for name, (settings, methods) in studies.items()}
    if args.methods and (unknown := sorted(set(args.methods.split(",")) - set(METHODS))):
        sys.exit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    started, token_studies = time.perf_counter(), {}
    for name, (settings, methods) in studies.items():
        methods = args.methods.split(",") if args.methods else list(methods)
        output = args.output if len(studies) == 1 else args.output / name
        per_seed = run_study(settings, methods, output, args)
        if settings.against_dpo:
            token_studies[name] = (per_seed, settings, methods)
    if token_studies:
        report.forest(token_studies, args.output / "token_methods.png")
    print(f"\n=== credit assignment benchmark, {time.perf_counter() - started:.0f}s ===")


def run_study(settings: Settings, methods: list[str], output: Path, args) -> dict:
    """One study, every seed: its results, tables and learning curves written into `output`."""
    if args.alpha_regime and args.alpha_regime not in settings.regimes:
        sys.exit(f"--alpha-regime {args.alpha_regime} is not a regime of this run; "
                 f"choose from {', '.join(settings.regimes)}")
    output.mkdir(parents=True, exist_ok=True)
    print(f"=== the model of the world '{settings.world}' (built once, then cached) ===", flush=True)
    model_dir = build_model.build(args.model_dir or build_model.FOLDERS[settings.world], steps=settings.build_steps,
                                  world_name=settings.world)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {s: run_seed(s, model_dir, settings, methods, output, args.enforce_eager, args.workers)
                for s in seeds}
    if args.alpha_grid or args.alpha_regime:
        alpha_regime = args.alpha_regime or report.largest_difference_regime(per_seed, settings.regimes)
        per_seed = {s: run_seed(s, model_dir, settings, methods, output, args.enforce_eager, args.workers,
                                alpha_regime) for s in seeds}
    tables = report.tables(per_seed, settings, methods)
    write_json(output / "results.json", {"settings": repr(settings), "model": str(model_dir), "seeds": per_seed})
    (output / "table.md").write_text(tables + "\n")
    if not settings.against_dpo:
        report.plot(per_seed, settings, methods, output / "curves.png")
    print(f"\n{tables}\n\nresults in {output / 'results.json'}", flush=True)
    return per_seed


if __name__ == "__main__":
    main()
