"""`treg-curves RUN`: a treg-train run folder's curves as one HTML page that opens offline."""

from __future__ import annotations

from typing import Optional

import typer

from treg_data.command_line import CONTEXT, GroupedTyperCommand, option, run_cli, typer_app

app = typer_app()


@app.command(cls=GroupedTyperCommand, context_settings=CONTEXT)
def curves(
    run: str = typer.Argument(..., help="A treg-train output folder (it holds metrics.jsonl)."),
    output: Optional[str] = option(None, "Options", "HTML file to write (default: RUN/curves.html)."),
) -> None:
    """Draw loss, rewards, token-reward agreement, grad norm, learning rate, speed and memory per step."""
    from treg_train.curves import write_curves

    print(f"treg-curves: written to {write_curves(run, output)}")


def main() -> None:
    run_cli(app, "treg-curves")


if __name__ == "__main__":
    main()
