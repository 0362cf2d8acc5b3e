"""Training settings: defaults that reproduce the paper, a YAML file, and flags on top."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from treg_core.command_line import (
    REQUIRED,
    above,
    at_least,
    check_ranges,
    finite,
    load_settings,
    optional,
    require,
    setting,
    share,
    within,
)
from treg_core.contract import COLUMN_RANGES, COLUMNS, ID_KINDS, LOGPROB_RANGE
from treg_core.errors import UserError
from treg_train.losses import LossSettings
from treg_train.objectives import (
    METHODS,
    TOKEN_METHODS,
    WEIGHTINGS,
    beta_help,
    gamma_help,
    loss_help,
    method,
    reference_free,
    signal_columns,
)
from treg_train.stopping import EXIT_STOPPED, STOPPED, stop_signals_problem

RUN, OBJECTIVE, OPTIMISATION, MEMORY, LORA, BOOKKEEPING, EVALUATION = (
    "Run", "Objective", "Optimisation", "Memory and speed", "LoRA", "Bookkeeping", "Evaluation")


@dataclass(frozen=True)
class TrainConfig:
    model: str = setting(REQUIRED, RUN, "Policy to train (and the reference): Hub id or local folder.")
    data: str = setting(REQUIRED, RUN, "treg-score output folder, or a Hub dataset id of shards.")
    output: str = setting(REQUIRED, RUN, "Run folder: metrics.jsonl, checkpoints/, final/ (the Hugging Face model).")
    loss: str = setting("dpo_reg", OBJECTIVE, loss_help())
    beta: float | None = setting(None, OBJECTIVE, beta_help())
    alpha: float = setting(0.25, OBJECTIVE, "Weight of the token-level regularizer (or of the SFT term).")
    gamma: float | None = setting(None, OBJECTIVE, gamma_help())
    token_weighting: str | None = setting(
        None, OBJECTIVE, f"Token weights of the margin: {', '.join(WEIGHTINGS)} (default: the loss's own, none for "
        "the others). With dpo_reg, simpo_reg or wpo_reg it combines a method's weighting with T-REG.")
    d2po_discount: float = setting(0.98, OBJECTIVE, "D²PO's discount γ: token t of a response weighs γ^t.")
    tgdpo_alpha: float = setting(0.5, OBJECTIVE, "TGDPO's α: token weights 1 ± α·β·(log π_dpo − log π_ref), from "
                                 "the shards of treg-score --dpo-model.")
    tis_dpo_weights: str = setting(
        "prompts", OBJECTIVE, "TIS-DPO's contrastive pair: prompts (log-probs after T-REG's better and worse "
        "revision prompts, in every shard) or models (a DPO and a reverse-DPO model: treg-score --dpo-model "
        "--reverse-dpo-model).")
    sepo_ratio: float = setting(0.3, OBJECTIVE, "SePO's k: the share of each response's tokens it trains on.")
    tdpo_alpha: float = setting(0.5, OBJECTIVE, "TDPO2's α: the weight of the sequential KL in the margin.")
    otpo_epsilon: float = setting(1.0, OBJECTIVE, "OTPO's ε: the entropic regularisation of its Sinkhorn (the authors' "
                                  "1 for 8B models, 0.1 for 3B).")
    otpo_reg_m: float = setting(0.2, OBJECTIVE, "OTPO's τ: how far the transport may move from one unit of mass per "
                                "token (the KL weight of its marginals).")
    swap_pairs: bool = setting(
        False, OBJECTIVE, "Train on every pair with chosen and rejected swapped: the reverse-DPO model of TIS-DPO.")
    wpo_clamp_weight: bool = setting(
        True, OBJECTIVE, "WPO's pair weight clamped at 1, min(1, ·), as WPO's official code computes it; off: "
        "TRL's use_weighting (unclamped).")
    static_weight: bool = setting(
        False, OBJECTIVE, "Ablation: pair weight w = 1 instead of the detached DPO weight.")
    reward_column: str = setting(
        "rewards", OBJECTIVE, "Per-token column used as r̂: reads chosen_<name> and rejected_<name>.")
    ref_model: str | None = setting(
        None, OBJECTIVE, "Compute reference log-probs with this model instead of reading them from the shards.")
    learning_rate: float = setting(5e-7, OPTIMISATION, "Peak learning rate of AdamW.")
    global_batch_size: int = setting(
        128, OPTIMISATION, "Pairs per optimizer step, over all processes (gradient accumulation fills it).")
    num_train_epochs: int = setting(1, OPTIMISATION, "Passes over the data.")
    max_steps: int | None = setting(None, OPTIMISATION, "Stop after this many optimizer steps (default: the epochs).")
    lr_scheduler_type: str = setting("cosine", OPTIMISATION, "cosine, linear or constant (after the warmup).")
    warmup_ratio: float = setting(0.1, OPTIMISATION, "Share of the steps spent warming the learning rate up.")
    weight_decay: float = setting(0.0, OPTIMISATION, "AdamW weight decay.")
    max_grad_norm: float = setting(1.0, OPTIMISATION, "Clip the gradient to this norm (0: no clipping).")
    seed: int = setting(42, OPTIMISATION, "Seed of the data order and of torch.")
    max_length: int = setting(
        2048, MEMORY, "Longest prompt + response trained on; longer pairs are skipped and counted.")
    micro_batch_tokens: int = setting(
        16384, MEMORY, "Tokens per forward ([chosen; rejected] of several pairs).")
    padding_free: bool | None = setting(
        None, MEMORY, "Pack sequences back to back without padding (position ids mark them) instead of "
        "length-grouped padding. Default: pack where the attention runs variable-length (varlen, flex, flash); "
        "with sdpa or eager a pack would need a [tokens, tokens] mask.")
    gradient_checkpointing: str = setting(
        "auto", MEMORY, "Recompute activations in the backward to save memory: auto (every other layer, then every "
        "layer, only as far as the memory plan needs to fit the device), true (every layer), selective (every "
        "other layer) or false.")
    dtype: str = setting("auto", MEMORY, "auto (bf16 compute on GPU, fp32 on CPU), float32 or bfloat16.")
    attn_implementation: str | None = setting(
        None, MEMORY, "Attention kernel: varlen (over packed sequences: flash on CUDA, sdpa per sequence "
        "elsewhere), or one transformers names (sdpa, eager; on a GPU only: flash_attention_2, flash_attention_3, "
        "flex_attention). Default: "
        "varlen where the model allows it (no soft-capped logits, no sliding window), else the model's own.")
    compile: bool = setting(False, MEMORY, "torch.compile each decoder layer (regional compilation): one compiled "
                            "graph serves every layer; the first steps pay the compilation.")
    use_liger_kernel: bool = setting(
        False, MEMORY, "On CUDA, replace the decoder layers' RMSNorm, SwiGLU/GeGLU and rotary embedding with "
        "liger-kernel's fused Triton kernels (pip install liger-kernel): less activation memory, faster.")
    sharding: str = setting(
        "auto", MEMORY, "How the processes of a run share the model (FSDP2): full_shard (weights, gradients and "
        "optimizer state split over the processes; each layer gathered for its forward and again for its backward), "
        "shard_grad_op (gathered once, kept from forward to backward; gradients and optimizer state split), no_shard "
        "(every process holds the whole model, its gradients and AdamW state, as DDP; gradients all-reduced once a "
        "step) or auto: on a CPU (gloo) shard_grad_op where the memory plan fits it, else full_shard; "
        "on GPUs full_shard (the others are not measured there). One process: moot. The plan line says which.")
    plan: bool = setting(
        False, MEMORY, "Print the memory plan (per-device peak, in parts) for these settings and exit, without "
        "loading weights; needs only --model. With --data, only the pairs' token counts are read, and the activations "
        "are planned for the longest forward they make; without it, for full forwards of --micro-batch-tokens.")
    shuffle_buffer: int = setting(10_000, MEMORY, "Pairs held for shuffling while streaming the shards.")
    logprob_chunk_rows: int = setting(1024, MEMORY, "Positions per chunk of the log-prob kernel (bounds its memory).")
    # LoRA: the reference log-probs come from the shards, so no second (reference) model is held either way.
    lora_r: int = setting(0, LORA, "LoRA rank (0: full fine-tuning). The base weights stay frozen; only the "
                          "adapters, and their optimizer state, are trained and checkpointed.")
    lora_alpha: float = setting(16.0, LORA, "LoRA alpha: the adapters' update is scaled by alpha / r.")
    lora_dropout: float = setting(0.0, LORA, "Dropout on the adapters' input.")
    lora_target_modules: str = setting(
        "all-linear", LORA, "Layers to adapt: comma-separated module names (q_proj,v_proj) or all-linear (every "
        "linear layer of the decoder, not the output layer).")
    export_adapter: bool = setting(
        False, LORA, "Also write the adapter alone, in peft's format, to final-adapter/ (final/ holds the merged "
        "model).")
    logging_steps: int = setting(10, BOOKKEEPING, "Log the metrics every this many steps.")
    save_steps: int = setting(
        500, BOOKKEEPING, "Write a checkpoint every this many steps (0: none; the model is exported at the end).")
    resume: bool = setting(False, BOOKKEEPING, "Continue from the newest complete checkpoint in --output.")
    report_to: str = setting("none", BOOKKEEPING, "none, tensorboard or wandb (metrics.jsonl is always written).")
    stop_signals: str = setting(
        "SIGTERM,SIGUSR1", BOOKKEEPING, "Signals that stop the run at the next step boundary: it saves a "
        f"checkpoint, writes {STOPPED} and exits with {EXIT_STOPPED}, for --resume to continue (\"\": none).")
    collective_timeout: float = setting(
        10.0, BOOKKEEPING, "Minutes a process waits in a collective for the others: a process of the run that died "
        "or hangs ends the run with an error after at most this long.")
    # Evaluation: the training objective's quantities on held-out pairs, without a gradient.
    eval_data: str | None = setting(
        None, EVALUATION, "Held-out pairs to evaluate on: a treg-score output folder or Hub dataset id, scored "
        "like --data.")
    eval_fraction: float = setting(
        0.0, EVALUATION, "Or hold out this share of --data's pairs (picked by a hash of their place in the shards) "
        "and evaluate on them instead of training on them.")
    eval_steps: int = setting(
        0, EVALUATION, "Evaluate every this many steps (0: only at the end; a run with an evaluation set is always "
        "evaluated after its last step).")

    def loss_settings(self) -> LossSettings:
        """β and γ resolved from the loss where not given: the paper's (DPO, SimPO) or the method's authors'."""
        row = method(self.loss)
        beta = self.beta if self.beta is not None else row.beta
        gamma = self.gamma if self.gamma is not None else row.default_gamma(beta)
        return LossSettings(self.loss, beta=beta, alpha=self.alpha, gamma=gamma, static_weight=self.static_weight,
                            weighting=self.weighting, d2po_discount=self.d2po_discount, wpo_clamp=self.wpo_clamp_weight,
                            tgdpo_alpha=self.tgdpo_alpha, sepo_ratio=self.sepo_ratio, tdpo_alpha=self.tdpo_alpha,
                            otpo_epsilon=self.otpo_epsilon, otpo_reg_m=self.otpo_reg_m)

    @property
    def weighting(self) -> str:
        """The token weighting: --token-weighting, else the loss's own (a token-level method's), else none."""
        return self.token_weighting or method(self.loss).weighting

    @property
    def signal_columns(self) -> tuple[str, str] | None:
        """The two per-token shard columns whose difference s_t = first − second the weighting reads; None if it
        reads none."""
        return signal_columns(self.weighting, self.as_dict())

    def as_dict(self) -> dict:
        return asdict(self)

    def record(self) -> dict:
        """The settings as the run records them (config.yaml, checkpoints): β and γ as the loss resolved them, so
        that the record says what was trained, and the run folder alone tells treg-inspect its β."""
        return resolved(self.as_dict())


def resolved(settings: dict) -> dict:
    """`settings` (TrainConfig's, as a dict) with β and γ left out resolved from their loss's defaults."""
    if settings.get("loss") not in METHODS:
        return settings
    row = method(settings["loss"])
    beta = row.beta if settings.get("beta") is None else settings["beta"]
    return {**settings, "beta": beta, "gamma": row.default_gamma(beta) if settings.get("gamma") is None
            else settings["gamma"]}


def build_config(config_file: str | None, overrides: dict) -> TrainConfig:
    """Defaults < YAML file < flags given on the command line, validated."""
    return validate(load_settings(TrainConfig, config_file, overrides))


CHECKPOINTING = {"auto": None, "false": "none", "selective": "every other layer", "true": "every layer"}
SHARDINGS = ("auto", "full_shard", "shard_grad_op", "no_shard")  # auto: the first of plan.shardings that fits


# Every numeric setting's meaningful range, checked before any work: (check, what the value must be, and why).
RANGES = {
    "beta": (optional(above(0)), "a positive number: β scales the margin, and a negative β trains towards the "
                                  "rejected answers"),
    "alpha": (at_least(0), "a number >= 0 (0: no regularizer)"),
    "gamma": (optional(finite), "a finite number (SimPO's target margin)"),
    "d2po_discount": (share, "in (0, 1]"),
    "tgdpo_alpha": (at_least(0), "a number >= 0"),
    "sepo_ratio": (share, "in (0, 1]: the share of each response's tokens"),
    "tdpo_alpha": (at_least(0), "a number >= 0"),
    "otpo_epsilon": (above(0), "a positive number"),
    "otpo_reg_m": (above(0), "a positive number"),
    "learning_rate": (above(0), "a positive number"),
    "global_batch_size": (at_least(1), "at least 1"),
    "num_train_epochs": (at_least(1), "at least 1"),
    "max_steps": (optional(at_least(1)), "at least 1 (leave it out to train the epochs)"),
    "warmup_ratio": (within(0, 1), "in [0, 1)"),
    "weight_decay": (at_least(0), "a number >= 0"),
    "max_grad_norm": (at_least(0), "a number >= 0 (0: no clipping)"),
    "seed": (at_least(0), "an integer >= 0"),
    "max_length": (at_least(1), "at least 1"),
    "micro_batch_tokens": (at_least(1), "at least 1"),
    "shuffle_buffer": (at_least(1), "at least 1 (1: no shuffling within the stream)"),
    "logprob_chunk_rows": (at_least(1), "at least 1"),
    "lora_r": (at_least(0), "an integer >= 0 (0: full fine-tuning)"),
    "lora_alpha": (above(0), "a positive number"),
    "lora_dropout": (within(0, 1), "in [0, 1)"),
    "logging_steps": (at_least(1), "at least 1"),
    "save_steps": (at_least(0), "an integer >= 0 (0: no checkpoints)"),
    "eval_fraction": (within(0, 1), "in [0, 1)"),
    "eval_steps": (at_least(0), "an integer >= 0 (0: only at the end)"),
    "collective_timeout": (above(0), "a positive number of minutes"),
}


def lora_settings_given(config: TrainConfig) -> list[str]:
    """The LoRA settings set away from their defaults, as flags."""
    names = ("lora_alpha", "lora_dropout", "lora_target_modules")
    return [f"--{name.replace('_', '-')}" for name in names
            if getattr(config, name) != TrainConfig.__dataclass_fields__[name].default]


def validate(config: TrainConfig) -> TrainConfig:
    require(config, () if config.plan else ("model", "data", "output"))
    check_ranges(config, RANGES)
    checks = [
        (config.gradient_checkpointing in CHECKPOINTING,
         f"--gradient-checkpointing must be one of {', '.join(CHECKPOINTING)}, got {config.gradient_checkpointing!r}"),
        (config.sharding in SHARDINGS,
         f"--sharding must be one of {', '.join(SHARDINGS)}, got {config.sharding!r}"),
        (config.loss in METHODS, f"--loss must be one of {', '.join(METHODS)}, got {config.loss!r}"),
        (config.token_weighting in (None, *WEIGHTINGS),
         f"--token-weighting must be one of {', '.join(WEIGHTINGS)}, got {config.token_weighting!r}"),
        (config.loss not in TOKEN_METHODS or config.token_weighting in (None, config.loss),
         f"--loss {config.loss} weights tokens its own way; leave --token-weighting out, or use --loss dpo_reg / "
         "simpo_reg with --token-weighting to combine a weighting with T-REG"),
        (config.token_weighting not in WEIGHTINGS or WEIGHTINGS[config.token_weighting].nonnegative
         or config.loss not in METHODS or not reference_free(config.loss),
         f"--token-weighting {config.token_weighting} with --loss {config.loss}: its weights "
         f"({WEIGHTINGS.get(config.token_weighting, WEIGHTINGS['none']).summary}) can be negative, and the SimPO "
         f"family divides by their sum, which can then be 0 or negative; combine {config.token_weighting} with "
         "dpo_reg or wpo_reg"),
        (config.tis_dpo_weights in ("prompts", "models"), "--tis-dpo-weights must be prompts or models"),
        (config.loss not in METHODS or not (config.swap_pairs and config.weighting == "cdpo"),
         "--swap-pairs with cDPO's weights: they mark the rejected answer's critical tokens by the contrast of the "
         "positive model (--dpo-model) against the negative one (--reverse-dpo-model), so swapped they would weigh "
         "the new rejected answers by the contrast the wrong way round; leave --swap-pairs out, or score the swapped "
         "pairs (treg-score --chosen-column rejected --rejected-column chosen) with the two models exchanged"),
        (COLUMN_RANGES.get(config.reward_column) != LOGPROB_RANGE,
         f"--reward-column {config.reward_column} holds log-probs, not token rewards; give rewards, dpo_rewards or "
         "a per-token column of your own"),
        (config.reward_column not in COLUMNS or COLUMNS[config.reward_column].kind not in ID_KINDS,
         f"--reward-column {config.reward_column} holds token ids, not token rewards; give rewards, dpo_rewards or a "
         "per-token column of your own"),
        (config.lr_scheduler_type in ("cosine", "linear", "constant"),
         "--lr-scheduler-type must be cosine, linear or constant"),
        (config.report_to in ("none", "tensorboard", "wandb"), "--report-to must be none, tensorboard or wandb"),
        (config.dtype in ("auto", "float32", "bfloat16"), "--dtype must be auto, float32 or bfloat16"),
        (config.micro_batch_tokens >= 2 * config.max_length,
         "--micro-batch-tokens must hold one pair: at least 2 x --max-length"),
        (bool(config.lora_target_modules.replace(",", "").strip()),
         "--lora-target-modules must name at least one module, or be all-linear"),
        (config.lora_r > 0 or not config.export_adapter, "--export-adapter needs --lora-r above 0"),
        (config.lora_r > 0 or not lora_settings_given(config),
         f"LoRA settings without --lora-r: {', '.join(lora_settings_given(config))} (the run would fine-tune every "
         "weight and ignore them); give --lora-r above 0, or leave them out"),
        (not (config.eval_data and config.eval_fraction),
         "give --eval-data or --eval-fraction, not both (held-out pairs come from one of them)"),
        (not config.eval_steps or bool(config.eval_data or config.eval_fraction),
         "--eval-steps needs pairs to evaluate on: --eval-data or --eval-fraction"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    problem = stop_signals_problem(config.stop_signals)
    if problem:
        raise UserError(problem)
    return config


# What a --resume may change: bookkeeping, and --max-steps to extend a run. Everything else
# (the objective, the data order, the schedule, the model) would silently mix two runs; so would
# --eval-fraction (it decides which pairs are trained on) and --eval-data (one curve, two sets).
# Gradient checkpointing and the sharding compute the same numbers (a checkpoint's weights and optimizer state are
# resharded as it loads); --stop-signals and --collective-timeout say when a run stops.
CHANGEABLE_ON_RESUME = ("resume", "output", "logging_steps", "save_steps", "max_steps", "report_to", "eval_steps",
                        "gradient_checkpointing", "sharding", "plan", "stop_signals", "collective_timeout")


def changed_on_resume(saved: dict, current: TrainConfig) -> list[str]:
    """The settings, as flags with their old and new values, that differ from the run's own."""
    def same(name: str, old, new) -> bool:
        if (name in ("model", "data", "ref_model", "eval_data") and old and new and Path(old).exists()
                and Path(new).exists()):
            return Path(old).resolve() == Path(new).resolve()
        return old == new

    # A setting newer than the run is absent from its saved ones: the run had its default.
    now, saved = current.record(), resolved({**TrainConfig().as_dict(), **saved})
    return [f"--{name.replace('_', '-')} {saved.get(name)!r} (now {now[name]!r})" for name in now
            if name not in CHANGEABLE_ON_RESUME and not same(name, saved.get(name), now[name])]
