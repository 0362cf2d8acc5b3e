"""`treg-inspect`: an HTML report of the token rewards in scored shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from treg_data import report
from treg_data.command_line import CONTEXT, GroupedTyperCommand, option, run_cli, typer_app
from treg_data.contract import MANIFEST, output_root, read_shard_metadata, shard_files
from treg_data.errors import UserError
from treg_data.reward_stats import reward_distribution

app = typer_app()
PAIRS, REWARDS, OUTPUT = "Pairs to show", "Rewards", "Output"


@app.command(cls=GroupedTyperCommand, context_settings=CONTEXT)
def inspect(
    data: str = typer.Argument(..., help="A treg-score output folder (or its data/ folder)."),
    ids: Optional[list[str]] = typer.Option(None, "--id", help="Show this pair (repeatable).", rich_help_panel=PAIRS),
    random: Optional[int] = option(None, PAIRS, "Show this many pairs drawn at random (default 5)."),
    extreme: Optional[int] = option(None, PAIRS, "Show the pairs with the largest |Σ r̂|."),
    seed: int = option(0, PAIRS, "Seed of --random."),
    checkpoint: Optional[str] = option(
        None, REWARDS, "A trained model: show its implicit token rewards β·log π_θ/π_ref too."),
    beta: float = option(0.01, REWARDS, "β for the implicit rewards (the one the checkpoint was trained with)."),
    tokenizer: Optional[str] = option(None, REWARDS, "Tokenizer to decode tokens (default: the scoring model's)."),
    output: Optional[str] = option(None, OUTPUT, "HTML file to write (default: DATA/report.html)."),
) -> None:
    """Colour every response token by its reward, chosen and rejected side by side."""
    from transformers import AutoTokenizer

    if sum(x is not None and x != [] for x in (ids, random, extreme)) > 1:
        raise UserError("choose pairs with one of --id, --random or --extreme")
    manifest = _manifest(data)
    provenance = manifest.get("provenance", {})
    name = tokenizer or checkpoint or provenance.get("model")
    if not name:
        raise UserError("cannot tell which tokenizer decodes these shards; pass --tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as err:
        raise UserError(f"cannot load the tokenizer {name!r}: "
                        f"{str(err).splitlines()[0] if str(err) else err}") from None
    rows = report.select_rows(data, ids=ids or None, sample=random, extreme=extreme, seed=seed)
    implicit = report.implicit_rewards(checkpoint, rows, beta) if checkpoint else None
    views = report.build_views(rows, tok, implicit)
    meta = {"data": str(Path(data).resolve()), "scoring model": provenance.get("scorer_model", "?"),
            "reward": provenance.get("reward_transform", "?"), "pairs shown": str(len(views))}
    if checkpoint:
        meta["checkpoint"] = f"{checkpoint} (β = {beta})"
    target = Path(output) if output else Path(data) / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    distribution = reward_distribution(shard_files(data))
    target.write_text(report.render_html(views, "treg token rewards", meta, distribution), encoding="utf-8")
    print(f"treg-inspect: {len(views)} pair(s) written to {target}")


def _manifest(data: str) -> dict:
    manifest = output_root(data) / MANIFEST
    if manifest.exists():
        return json.loads(manifest.read_text())
    return {"provenance": read_shard_metadata(shard_files(data)[0])["provenance"]}


def main() -> None:
    run_cli(app, "treg-inspect")


if __name__ == "__main__":
    main()
