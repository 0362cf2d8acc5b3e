"""`treg-probe`: how well does each token-reward source locate the errors of labelled minimal-edit pairs, on this
model? (treg_data.probe; docs/METHOD.md, "The reward check".) It prints a table, then one JSON object as its
last line."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from treg_core.atomic import write_text
from treg_core.command_line import (
    REQUIRED,
    at_least,
    check_ranges,
    require,
    run_cli,
    setting,
    settings_command,
    share,
)
from treg_core.contract import model_identity
from treg_core.errors import UserError
from treg_core.precision import DTYPE_CHOICES, resolve_dtype
from treg_core.sources import check_same_vocabulary, load_tokenizer
from treg_data.config import ScoreConfig
from treg_data.encoding import PairEncoder, revision_overhead
from treg_data.lengths import LengthLimits, resolve_max_model_len
from treg_data.models import load_model_config, model_context
from treg_data.probe import BOOTSTRAP, NoProbePair, load_probe_pairs, probe, table
from treg_data.revision_prompts import AUTO, SHIPPED, load_revision_prompts
from treg_data.scorers import BACKENDS, build_scorer

PROBE, MODEL, SCORING = "Probe", "Model", "Scoring"
MIN_BOOTSTRAP = 50  # fewer resamples give percentiles too coarse for a 95% interval


@dataclass(frozen=True)
class ProbeConfig:
    model: str = setting(REQUIRED, MODEL, "The model whose token rewards are measured: Hub id or local folder.")
    pairs: str | None = setting(
        None, PROBE, "A JSONL/JSON/Parquet file of near-edit pairs in treg-score's input format (prompt, chosen, "
        "rejected, optional id and kind); default: treg's shipped set of 160 pairs in 4 kinds.")
    revision_prompts: str | None = setting(
        None, PROBE, "A YAML/JSON prompt-set file to compare beside every shipped set (as treg-score takes it).")
    dpo_model: str | None = setting(
        None, MODEL, "A DPO-trained model with the same vocabulary: also measure its reward sigmoid(log pi_dpo - "
        "log pi_ref) - 0.5.")
    chat_template: str | None = setting(None, MODEL, "Jinja chat template file, for tokenizers without one.")
    dtype: str = setting("auto", MODEL, "auto (the checkpoint's own), bfloat16, float16 or float32.")
    backend: str = setting("vllm", SCORING, "'vllm' (default) or 'hf' (plain transformers).")
    max_length: int = setting(2048, SCORING, "Max tokens of prompt + response; longer pairs are left out.")
    bootstrap: int = setting(BOOTSTRAP, PROBE, f"Bootstrap resamples of the pairs for the 95% intervals (at least "
                                               f"{MIN_BOOTSTRAP}).")
    seed: int = setting(0, PROBE, "Seed of the bootstrap (and of the engine).")
    gpu_memory_utilization: float = setting(0.9, SCORING, "vLLM GPU memory fraction (shared with --dpo-model).")
    enforce_eager: bool = setting(False, SCORING, "vLLM: skip graph compilation (faster start, slower steps).")
    output: str | None = setting(None, PROBE, "Also write the JSON object to this file.")


def run(config: ProbeConfig) -> dict:
    require(config, ("model",))
    if config.dtype not in DTYPE_CHOICES or config.backend not in BACKENDS:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)} and --backend one of "
                        f"{', '.join(BACKENDS)}; got {config.dtype!r} and {config.backend!r}")
    check_ranges(config, {"max_length": (at_least(1), "at least 1"),
                          "bootstrap": (at_least(MIN_BOOTSTRAP), f"at least {MIN_BOOTSTRAP} for a 95% interval"),
                          "seed": (at_least(0), "an integer >= 0"),
                          "gpu_memory_utilization": (share, "in (0, 1]: the share of the GPU's memory vLLM may take")})
    if config.revision_prompts == AUTO:
        raise UserError("--revision-prompts auto is treg-score's choice of the best shipped set; treg-probe measures "
                        "every shipped set already: leave it out, or give a file of your own")
    if config.dpo_model and model_identity(config.dpo_model) == model_identity(config.model):
        raise UserError(f"--dpo-model {config.dpo_model} is --model itself, so its reward is 0 on every token; give a "
                        "DPO-trained model")
    if config.output:
        _check_output(config)
    started = time.perf_counter()
    items, unreadable = load_probe_pairs(config.pairs)
    sets = dict(SHIPPED)
    if config.revision_prompts:
        extra = load_revision_prompts(config.revision_prompts)
        if sets.get(extra.name, extra) != extra:  # a file named like a shipped set must not replace its row
            extra = replace(extra, name=str(config.revision_prompts))
        sets[extra.name] = extra
    tokenizer = load_tokenizer(config.model, chat_template=config.chat_template, needs_chat_template=True)
    if config.dpo_model:
        check_same_vocabulary(tokenizer, load_tokenizer(config.dpo_model, chat_template=config.chat_template,
                                                        needs_chat_template=True), config.dpo_model, flag="--dpo-model")
    model_config = load_model_config(config.model, None)
    overhead = max(revision_overhead(tokenizer, s) for s in sets.values())
    max_model_len = resolve_max_model_len(None, model_context(model_config), config.max_length, overhead)
    limits = LengthLimits(config.max_length, config.max_length, max_model_len)
    # The engine is treg-score's, with the same settings: what is measured here is what scoring would give.
    score_config = ScoreConfig(dataset="-", output="-", model=config.model, dpo_model=config.dpo_model,
                               backend=config.backend, seed=config.seed,
                               gpu_memory_utilization=config.gpu_memory_utilization,
                               enforce_eager=config.enforce_eager)
    options = score_config.engine_options(resolve_dtype(config.dtype, model_config), max_model_len)
    scorers = [build_scorer(config.backend, options)]
    try:
        if config.dpo_model:
            scorers.append(build_scorer(config.backend, replace(options, model=config.dpo_model)))
        encoders = {name: PairEncoder(tokenizer, prompts, limits) for name, prompts in sets.items()}
        result = probe(items, encoders, scorers[0], scorers[1] if config.dpo_model else None, config.seed,
                       config.bootstrap)
    except NoProbePair as none:
        raise NoProbePair(_total(none.skipped, unreadable), "give --pairs that fit it, or raise --max-length") from None
    finally:
        for scorer in scorers:
            scorer.close()
    result["skipped"] = _total(result["skipped"], unreadable)
    print(table(result))
    skipped = sum(result["skipped"].values())
    print(f"\n{result['pairs']} pairs ({skipped} left out: {result['skipped'] or 'none'}), "
          f"{time.perf_counter() - started:.0f}s; best set: {result['best']}. AUROC: of -r as a detector of the "
          "edited tokens among the rejected answers' tokens (0.5 is chance); see docs/REWARDS.md.", file=sys.stderr)
    if config.output:
        write_text(config.output, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


def _total(*counts: dict[str, int]) -> dict[str, int]:
    total = {}
    for count in counts:
        for reason, n in count.items():
            total[reason] = total.get(reason, 0) + n
    return total


def _check_output(config: ProbeConfig) -> None:
    """Before any work: --output may replace only an earlier result of treg-probe (never the pairs, a prompt set or
    a model's file), and its folder must take a file, so a long measurement is not lost at its end."""
    target = Path(config.output)
    if target.is_dir():
        raise UserError(f"--output {config.output} is a folder; give the path of a .json file")
    if target.exists() and not _is_probe_result(target):
        raise UserError(f"--output {config.output} exists and is not a treg-probe result; give a new file "
                        "(treg-probe replaces only its own results)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as err:
        raise UserError(f"--output {config.output}: cannot write there ({err.strerror or err}); give a writable "
                        "path") from None


def _is_probe_result(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"sets", "best", "pairs"} <= set(data)


def measure(config: ProbeConfig) -> None:
    """Measure how well each token-reward source (every shipped prompt set, the reference log-prob alone, a DPO
    model's reward) locates the edited tokens of labelled minimal-edit pairs, on one model."""
    run(config)


command = settings_command(ProbeConfig, measure, "treg-probe")


def main() -> None:
    run_cli(command, "treg-probe")


if __name__ == "__main__":
    main()
