"""`treg-curves RUN`: a treg-train run folder's curves as one HTML page that opens offline."""

from __future__ import annotations

import click

from treg_core.command_line import CONTEXT, GroupedCommand, HelpedArgument, grouped, run_cli


@click.command(cls=GroupedCommand, context_settings=CONTEXT, params=[
    HelpedArgument(["run"], help="A treg-train output folder (it holds metrics.jsonl)."),
    grouped(click.Option(["--output"], help="HTML file to write (default: RUN/curves.html)."), "Options"),
])
def command(run: str, output: str | None) -> None:
    """Draw loss, rewards, token-reward agreement, grad norm, learning rate, speed and memory per step."""
    from treg_train.curves import write_curves

    print(f"treg-curves: written to {write_curves(run, output)}")


def main() -> None:
    run_cli(command, "treg-curves")


if __name__ == "__main__":
    main()
