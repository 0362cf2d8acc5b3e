"""`treg-score`: score a preference dataset into Parquet shards of token-level rewards. Every ScoreConfig
field is a flag; `--config recipe.yaml` supplies values that flags override."""

from __future__ import annotations

import sys
from pathlib import Path

from treg_core.command_line import run_cli, settings_command
from treg_core.contract import SKIPPED, read_manifest
from treg_core.errors import UserError
from treg_data.config import ScoreConfig, validate
from treg_data.signals import warn_on_settings, warn_on_shards
from treg_data.status import folder_status


def score(config: ScoreConfig) -> None:
    """Score every response token of a preference dataset with the contrastive reward of T-REG."""
    if config.status:  # a report on a folder: nothing else is needed, and nothing is scored or written
        report = folder_status(config.status)
        print(report.text())
        sys.exit(report.exit_code)
    validate(config)
    zero_by_settings = warn_on_settings(config)
    if config.executor == "ray":
        from treg_data.ray_executor import run_on_ray

        summary = run_on_ray(config)
    elif config.data_parallel_size > 1:
        from treg_data.data_parallel import run_data_parallel

        summary = run_data_parallel(config, config.data_parallel_size)
    else:
        from treg_data import pipeline

        summary = pipeline.run(config)
    if summary.manifest is not None and summary.pairs_scored:  # finished: what its shards record is all of it
        warn_on_shards(config.output, zero_by_settings)
    print(summary.text())
    if summary.manifest is not None and not read_manifest(config.output).shards:
        raise UserError(f"every pair was skipped, so {config.output} holds nothing to train on; the reasons are "
                        f"above and in {Path(config.output) / SKIPPED}: fix the input, then score it again with "
                        "--overwrite")
    if config.push_to_hub:
        if summary.manifest is None:
            print(f"not pushing yet: the last worker to finish pushes {config.output} to {config.push_to_hub}")
            return
        from treg_data.hub import push_to_hub

        print(f"uploaded to {push_to_hub(config.output, config.push_to_hub, private=config.hub_private)}")


command = settings_command(ScoreConfig, score, "treg-score")


def main() -> None:
    run_cli(command, "treg-score", "interrupted; complete shards are kept and a rerun continues after them")


if __name__ == "__main__":
    main()
