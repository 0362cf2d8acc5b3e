"""`treg-inspect`: an HTML report of the token rewards in scored shards."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
import yaml

from treg_core.atomic import write_text
from treg_core.command_line import CONTEXT, GroupedCommand, HelpedArgument, grouped, run_cli
from treg_core.contract import (
    MANIFEST,
    Provenance,
    output_root,
    read_manifest,
    read_shard_metadata,
    shard_files,
    tokenizer_fingerprint,
)
from treg_core.errors import UserError
from treg_core.folders import owned_by
from treg_core.html import page_path
from treg_core.sources import check_same_vocabulary, load_tokenizer

PAIRS, REWARDS, OUTPUT = "Pairs to show", "Rewards", "Output"


def _option(flag: str, group: str, help: str, **kwargs) -> click.Option:
    return grouped(click.Option([flag], help=help, **kwargs), group)


@click.command(cls=GroupedCommand, context_settings=CONTEXT, params=[
    HelpedArgument(["data"], help="A treg-score output folder (or its data/ folder)."),
    _option("--id", PAIRS, "Show this pair (repeatable).", multiple=True),
    _option("--random", PAIRS, "Show this many pairs drawn at random (default 5).", type=click.IntRange(min=1)),
    _option("--extreme", PAIRS, "Show this many pairs with the largest |Σ r̂|.", type=click.IntRange(min=1)),
    _option("--seed", PAIRS, "Seed of --random.", type=int, default=0, show_default=True),
    _option("--checkpoint", REWARDS, "A trained model: show its implicit token rewards β·log π_θ/π_ref too."),
    _option("--beta", REWARDS, "β for the implicit rewards: the one the checkpoint was trained with (default: its "
            "treg-train run's, from the config.yaml beside it; else 0.01).", type=float),
    _option("--tokenizer", REWARDS, "Tokenizer to decode tokens (default: the scoring model's)."),
    _option("--output", OUTPUT, "HTML file to write (default: report.html beside the folder's manifest.json)."),
])
def command(data: str, id: tuple[str, ...], random: int | None, extreme: int | None, seed: int,
            checkpoint: str | None, beta: float | None, tokenizer: str | None, output: str | None) -> None:
    """Colour every response token by its reward, chosen and rejected side by side."""
    from treg_data import report
    from treg_data.reward_stats import reward_distribution

    if sum(x not in (None, ()) for x in (id, random, extreme)) > 1:
        raise UserError("choose pairs with one of --id, --random or --extreme")
    if beta is not None and not 0 < beta < math.inf:  # NaN too
        raise UserError(f"--beta {beta}: it must be a positive number, the β the checkpoint was trained with")
    target = page_path(output) if output else output_root(data) / "report.html"  # beside the manifest, not the shards
    provenance = _provenance(data)
    if checkpoint:
        check_not_a_run_folder(checkpoint)
        beta, trained_as = checkpoint_beta(checkpoint, beta)
    tok = load_tokenizer(tokenizer or checkpoint or provenance.model)
    if checkpoint:
        check_checkpoint(checkpoint, provenance)
    rows = report.select_rows(data, ids=list(id) or None, sample=random, extreme=extreme, seed=seed)
    implicit = report.implicit_rewards(checkpoint, rows, beta) if checkpoint else None
    views = report.build_views(rows, tok, implicit)
    meta = {"data": str(Path(data).resolve()), "scoring model": provenance.scorer_model,
            "reward": provenance.reward_transform, "pairs shown": str(len(views))}
    if checkpoint:
        meta["checkpoint"] = f"{checkpoint} ({trained_as}β = {beta:g})"
    distribution = reward_distribution(shard_files(data))
    write_text(target, report.render_html(views, "treg token rewards", meta, distribution))
    print(f"treg-inspect: {len(views)} pair(s) written to {target}")


def check_not_a_run_folder(checkpoint: str) -> None:
    """A treg-train run folder holds its model in final/, not at its top."""
    if (Path(checkpoint) / "final" / "config.json").is_file() and not (Path(checkpoint) / "config.json").exists():
        raise UserError(f"--checkpoint {checkpoint} is a treg-train run folder; give its model, "
                        f"{Path(checkpoint) / 'final'}")


def checkpoint_beta(checkpoint: str, given: float | None) -> tuple[float, str]:
    """β for the implicit rewards: `given`, else the one in the config.yaml of the treg-train run whose model
    `checkpoint` is (its final/ or final-step-N/), else DPO's 0.01 for a model of no run (a run's model whose record
    gives no β is refused); with the run's loss, as the page names it."""
    record = Path(checkpoint) / ".." / "config.yaml"
    try:
        settings = yaml.safe_load(record.read_text(encoding="utf-8")) if record.is_file() else None
    except (OSError, yaml.YAMLError):
        settings = None
    settings = settings if isinstance(settings, dict) else {}
    trained_as = f"{settings['loss']}, " if isinstance(settings.get("loss"), str) else ""
    run_beta = settings.get("beta")
    if given is not None:
        return given, trained_as
    if isinstance(run_beta, (int, float)) and not isinstance(run_beta, bool) and 0 < run_beta < math.inf:
        print(f"treg-inspect: β = {run_beta:g}, from {record.resolve()}", file=sys.stderr)
        return float(run_beta), trained_as
    if owned_by(record.parent, "treg-train"):  # a run's model whose record gives no β: DPO's would be a guess
        found = ("is missing" if not record.is_file() else "cannot be read as the run's settings" if not settings else
                 "records no β (an older treg wrote null for the loss's default)" if run_beta is None else
                 f"records beta: {run_beta!r}, not a positive number")
        raise UserError(f"--checkpoint {checkpoint} is the model of a treg-train run, but its {record.resolve()} "
                        f"{found}; give --beta, the β it was trained with")
    print(f"treg-inspect: β = 0.01 (DPO's): {checkpoint} is not the model of a treg-train run that records its β; "
          "give --beta, the β it was trained with", file=sys.stderr)
    return 0.01, trained_as


def check_checkpoint(checkpoint: str, provenance: Provenance) -> None:
    """The checkpoint's implicit rewards are log-probs of the shards' token ids: its vocabulary must be theirs."""
    ours = load_tokenizer(checkpoint, what="--checkpoint")
    if tokenizer_fingerprint(ours) == provenance.tokenizer_hash:
        return
    try:
        scored = load_tokenizer(provenance.model)
    except UserError:
        raise UserError(f"--checkpoint {checkpoint} has another tokenizer than the one the shards were scored with "
                        f"({provenance.model}, which cannot be loaded here to compare vocabularies); give a "
                        "checkpoint of that model") from None
    check_same_vocabulary(scored, ours, checkpoint, flag="--checkpoint")


def _provenance(data: str) -> Provenance:
    """The finished folder's, or (while workers are still scoring) its first shard's."""
    if (output_root(data) / MANIFEST).exists():
        return read_manifest(data).provenance
    files = shard_files(data)
    print(f"treg-inspect: {output_root(data)} is not finished (no manifest.json): showing the {len(files)} shard(s) "
          "written so far", file=sys.stderr)
    return read_shard_metadata(files[0]).provenance


def main() -> None:
    run_cli(command, "treg-inspect")


if __name__ == "__main__":
    main()
