"""How every treg command is built and run.

- A command's settings are one frozen dataclass whose fields carry their default, `--help` group and help
  (`setting`). `settings_command` turns it into a click command: one flag per field, grouped in `--help`,
  plus `--config FILE`, a YAML mapping of the same names that flags override.
- Help is plain click text (never a table): a table squeezes columns to fit the terminal and cuts long
  flag names such as --gpu-memory-utilization, which is exactly what help is there to show.
- `run_cli` reports a user's mistake as one line instead of a traceback.
"""

from __future__ import annotations

import math
import sys
import typing
from dataclasses import Field, field, fields
from pathlib import Path

import click
import yaml

from treg_core.errors import Interrupted, UserError, watch_ctrl_c

CONTEXT = {"help_option_names": ["-h", "--help"]}
REQUIRED = ""  # the default of a setting that must be given, by flag or in --config


def setting(default, group: str, help: str, **extra):
    """A settings field: its default, the --help group it is listed under, and its help."""
    return field(default=default, metadata={"group": group, "help": help, **extra})


# ---- --help ---------------------------------------------------------------------------------------


class GroupedCommand(click.Command):
    """A click command whose parameters carry a `group` attribute: one --help section per group, in the
    order the groups first appear; arguments first, ungrouped options last."""

    def format_arguments(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Nothing: the arguments are the first section of format_options (click 8.5 would list them again)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {"Arguments": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                group = "Arguments" if param.param_type_name == "argument" else getattr(param, "group", None)
                groups.setdefault(group or "Other options", []).append(record)
        groups["Other options"] = groups.pop("Other options", [])
        for title, rows in groups.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def grouped(param: click.Parameter, group: str) -> click.Parameter:
    param.group = group  # read by GroupedCommand's --help
    return param


class HelpedArgument(click.Argument):
    """A positional argument listed with its help under Arguments (click's own arguments have no help)."""

    def __init__(self, *args, help: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.help = help

    def get_help_record(self, ctx: click.Context) -> tuple[str, str]:
        return self.make_metavar(ctx), self.help


# ---- settings dataclass -> command ----------------------------------------------------------------


def _base_type(settings_class: type, name: str) -> type:
    hint = typing.get_type_hints(settings_class)[name]
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def _option(settings_class: type, spec: Field) -> click.Option:
    kind, flag, meta = _base_type(settings_class, spec.name), "--" + spec.name.replace("_", "-"), spec.metadata
    if kind is bool:  # default None: a flag not given leaves --config's value alone
        return grouped(click.Option([f"{flag}/--no-{flag[2:]}"], default=None, help=meta["help"]), meta["group"])
    shown = "  [required]" if spec.default == REQUIRED else (
        f"  [default: {spec.default}]" if spec.default is not None else "")
    return grouped(click.Option([flag], type=kind, default=None, help=meta["help"] + shown), meta["group"])


def settings_command(settings_class: type, callback, name: str) -> click.Command:
    """A click command with a flag per field of `settings_class` and --config; `callback(settings)` runs it,
    with settings = defaults < the --config file < the flags given."""
    config = grouped(click.Option(["--config"], help="YAML file of settings; flags override it."),
                     fields(settings_class)[0].metadata["group"])

    def invoke(config: str | None, **flags) -> None:
        callback(load_settings(settings_class, config, flags))

    return GroupedCommand(name, callback=invoke, help=callback.__doc__, context_settings=CONTEXT,
                          params=[config] + [_option(settings_class, f) for f in fields(settings_class)])


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, first: int, second: int):
        super().__init__(f"{key} is given twice (lines {first} and {second}); keep one")


class UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping, where PyYAML would keep the last silently."""

    def construct_mapping(self, node, deep=False):
        lines: dict = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, line = self.construct_scalar(key_node), key_node.start_mark.line + 1
                if key in lines:
                    raise DuplicateKey(key, lines[key], line)
                lines[key] = line
        return super().construct_mapping(node, deep)


def settings_file(config_file: str) -> dict:
    """A --config file's settings by field name; a setting given twice, also as flag and field name
    (max-length and max_length), is refused rather than one of them silently winning."""
    try:
        loaded = yaml.load(Path(config_file).read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read --config {config_file}: {yaml_problem(err)}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--config {config_file} must be a mapping of setting: value")
    values, spelled = {}, {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name in spelled:
            raise UserError(f"--config {config_file} gives {name} twice, as {spelled[name]} and {key}; keep one")
        values[name], spelled[name] = value, key
    return values


def yaml_problem(err: Exception) -> str:
    """PyYAML's syntax errors span lines (the source line, a caret): their problem and place in one line."""
    mark = getattr(err, "problem_mark", None)
    if isinstance(err, yaml.MarkedYAMLError) and mark is not None:
        return f"{err.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


def load_settings(settings_class: type, config_file: str | None, flags: dict):
    """Defaults < YAML file (keys as flags or as field names) < flags given on the command line."""
    values: dict = settings_file(config_file) if config_file else {}
    values.update({key: value for key, value in flags.items() if value is not None})
    known = [f.name for f in fields(settings_class)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown setting(s) {unknown} in --config; known: {sorted(known)}")
    return settings_class(**{name: typed(settings_class, name, value) for name, value in values.items()})


def require(settings, names: tuple[str, ...]) -> None:
    """Each named setting must have been given (by flag or in --config)."""
    for name in names:
        if getattr(settings, name) in (REQUIRED, None):  # never given, or `model: null` in --config
            raise UserError(f"--{name.replace('_', '-')} is required")


def typed(settings_class: type, name: str, value):
    """A value as the field's type, or one clear line: YAML reads 5e-7 as a string (it wants 5.0e-7), so numbers
    are converted; a list of names becomes the comma-separated string the flag takes."""
    kind = _base_type(settings_class, name)
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            raise UserError(f"--config: {name} must be a number, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, list):  # lora_target_modules: [q_proj, v_proj], as peft's configs write it
        value = ",".join(map(str, value))
    if kind is str and isinstance(value, bool):  # gradient_checkpointing: true, as YAML reads it
        value = str(value).lower()
    if (value is not None and not isinstance(value, kind)) or (kind is not bool and isinstance(value, bool)):
        raise UserError(f"--config: {name} must be {kind.__name__}, got {value!r}")
    return value


# ---- running --------------------------------------------------------------------------------------


def run_cli(command: click.Command, name: str, interrupted: str = "interrupted") -> None:
    """Run a command: a UserError becomes one line on stderr and exit code 2; Ctrl-C says what is kept."""
    watch_ctrl_c()
    try:
        code = command.main(prog_name=name, standalone_mode=False)
    except UserError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort) as err:
        code, cause = 130, err.__cause__ if isinstance(err, click.exceptions.Abort) else err  # click wraps Ctrl-C
        interrupted = str(cause) if isinstance(cause, Interrupted) else interrupted
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    if code == 130:
        print(f"{name}: {interrupted}", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


# ---- numeric ranges: checks for `check_ranges` tables ----------------------------------------------


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low):
    return lambda v: finite(v) and v >= low


def above(low):
    return lambda v: finite(v) and v > low


def within(low, high):
    """In [low, high)."""
    return lambda v: finite(v) and low <= v < high


def share(value) -> bool:
    """In (0, 1]."""
    return finite(value) and 0 < value <= 1


def optional(check):
    return lambda v: v is None or check(v)


def check_ranges(config, ranges: dict) -> None:
    """Each numeric setting in its range (NaN and infinities never are), or one line naming the flag and the fix."""
    for name, (ok, what) in ranges.items():
        value = getattr(config, name)
        if not ok(value):
            raise UserError(f"--{name.replace('_', '-')} {value!r}: it must be {what}")
