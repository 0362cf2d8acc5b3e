"""Training settings: defaults that reproduce the paper, a YAML file, and flags on top."""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from treg_data.errors import UserError
from treg_train.losses import LOSS_TYPES, LossSettings


@dataclass(frozen=True)
class TrainConfig:
    model: str = ""
    data: str = ""
    output: str = ""
    # the objective
    loss: str = "dpo_reg"
    beta: float | None = None  # default: 0.01 for DPO losses, 10 for SimPO losses
    alpha: float = 0.25
    gamma: float | None = None  # SimPO margin; default 0.3 * beta
    static_weight: bool = False
    reward_column: str = "rewards"
    ref_model: str | None = None  # compute reference log-probs online instead of reading them
    # optimisation
    learning_rate: float = 5e-7
    global_batch_size: int = 128
    num_train_epochs: int = 1
    max_steps: int | None = None
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    # memory and speed
    max_length: int = 2048
    micro_batch_tokens: int = 16384
    padding_free: bool | None = None  # default: pack where attention runs varlen (flash / flex attention)
    gradient_checkpointing: bool = False
    dtype: str = "auto"  # auto: bf16 compute on GPU, fp32 on CPU
    attn_implementation: str | None = None
    shuffle_buffer: int = 10_000
    logprob_chunk_rows: int = 1024
    # bookkeeping
    logging_steps: int = 10
    save_steps: int = 500
    resume: bool = False
    report_to: str = "none"  # none, tensorboard, wandb

    def loss_settings(self) -> LossSettings:
        simpo = self.loss.startswith("simpo")
        beta = self.beta if self.beta is not None else (10.0 if simpo else 0.01)
        gamma = self.gamma if self.gamma is not None else (0.3 * beta if simpo else 0.0)
        return LossSettings(self.loss, beta=beta, alpha=self.alpha, gamma=gamma, static_weight=self.static_weight)

    def as_dict(self) -> dict:
        return asdict(self)


def build_config(config_file: str | None, overrides: dict) -> TrainConfig:
    """Defaults < YAML file < flags given on the command line."""
    values: dict = {}
    if config_file:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise UserError(f"cannot read --config {config_file}: {err}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"--config {config_file} must be a mapping of setting: value")
        values.update({key.replace("-", "_"): value for key, value in loaded.items()})
    values.update({key: value for key, value in overrides.items() if value is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown setting(s) {unknown} in --config; known: {sorted(known)}")
    return validate(replace(TrainConfig(), **{name: _typed(name, value) for name, value in values.items()}))


def _typed(name: str, value):
    """YAML reads 5e-7 as a string (it wants 5.0e-7): numbers are converted by the field's type."""
    hint = typing.get_type_hints(TrainConfig)[name]
    kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            raise UserError(f"--config: {name} must be a number, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def validate(config: TrainConfig) -> TrainConfig:
    for name in ("model", "data", "output"):
        if not getattr(config, name):
            raise UserError(f"--{name} is required")
    checks = [
        (config.loss in LOSS_TYPES, f"--loss must be one of {', '.join(LOSS_TYPES)}, got {config.loss!r}"),
        (config.lr_scheduler_type in ("cosine", "linear", "constant"), "--lr-scheduler-type must be cosine, linear or constant"),
        (config.report_to in ("none", "tensorboard", "wandb"), "--report-to must be none, tensorboard or wandb"),
        (config.dtype in ("auto", "float32", "bfloat16"), "--dtype must be auto, float32 or bfloat16"),
        (config.global_batch_size >= 1, "--global-batch-size must be at least 1"),
        (config.learning_rate > 0, "--learning-rate must be positive"),
        (0 <= config.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
        (config.alpha >= 0, "--alpha must be non-negative"),
        (config.micro_batch_tokens >= 2 * config.max_length, "--micro-batch-tokens must hold one pair: at least 2 x --max-length"),
        (config.logging_steps >= 1 and config.save_steps >= 0, "--logging-steps must be >= 1 and --save-steps >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return config


# What a --resume may change: bookkeeping, and --max-steps to extend a run. Everything else
# (the objective, the data order, the schedule, the model) would silently mix two runs.
CHANGEABLE_ON_RESUME = ("resume", "output", "logging_steps", "save_steps", "max_steps", "report_to")


def changed_on_resume(saved: dict, current: TrainConfig) -> list[str]:
    """The settings, as flags with their old and new values, that differ from the run's own."""
    def same(name: str, old, new) -> bool:
        if name in ("model", "data", "ref_model") and old and new and Path(old).exists() and Path(new).exists():
            return Path(old).resolve() == Path(new).resolve()
        return old == new

    now = current.as_dict()
    return [f"--{name.replace('_', '-')} {saved.get(name)!r} (now {now[name]!r})" for name in now
            if name not in CHANGEABLE_ON_RESUME and not same(name, saved.get(name), now[name])]
