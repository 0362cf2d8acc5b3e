"""How every treg command runs: options listed under named groups with their names whole,
and a user's mistake reported as one line instead of a traceback.

Help is plain click text (never a table): a table squeezes columns to fit the terminal and cuts
long flag names such as --gpu-memory-utilization, which is exactly what help is there to show.
"""

from __future__ import annotations

import sys

import click
import typer.core

from treg_data.errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"]}


def format_grouped_options(command: click.Command, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """One section per group, in the order the groups first appear; arguments first, ungrouped options last."""
    groups: dict[str, list[tuple[str, str]]] = {"Arguments": []}
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record:
            group = getattr(param, "group", None) or getattr(param, "rich_help_panel", None)
            if param.param_type_name == "argument":
                group = "Arguments"
            groups.setdefault(group or "Other options", []).append(record)
    groups["Other options"] = groups.pop("Other options", [])
    for title, rows in groups.items():
        if rows:
            with formatter.section(title):
                formatter.write_dl(rows)


class GroupedTyperCommand(typer.core.TyperCommand):
    """A typer command whose options are grouped by their `rich_help_panel`."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        format_grouped_options(self, ctx, formatter)


class GroupedCommand(click.Command):
    """A click command whose options carry a `group` attribute."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        format_grouped_options(self, ctx, formatter)


def option(default, group: str, help: str):
    """A typer option shown under `group` in --help."""
    return typer.Option(default, help=help, rich_help_panel=group, show_default=not isinstance(default, bool))


def typer_app() -> typer.Typer:
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def run_cli(command: typer.Typer | click.Command, name: str, interrupted: str = "interrupted") -> None:
    """Run a command: a UserError becomes one line on stderr and exit code 2; Ctrl-C says what is kept."""
    if isinstance(command, typer.Typer):
        command = typer.main.get_command(command)
    try:
        code = command.main(prog_name=name, standalone_mode=False)
    except UserError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort, typer.Abort):
        code = 130
    except Exception as err:
        if not hasattr(err, "show"):  # click's own errors (typer carries its own copy of click)
            raise
        err.show()
        sys.exit(err.exit_code)
    if code == 130:  # typer turns Ctrl-C into exit code 130
        print(f"{name}: {interrupted}", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
