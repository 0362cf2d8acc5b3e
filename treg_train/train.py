"""The training run, top to bottom as it happens: set-up (distributed, data, FSDP2 policy, optimizer,
resume), the steps (micro-batches, the update, logging, checkpoints), then the export."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from treg_data.contract import tokenizer_fingerprint
from treg_data.errors import UserError, first_line
from treg_data.folders import check_folder, claim_folder
from treg_data.precision import DTYPES, checkpoint_dtype, dtype_name
from treg_train.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from treg_train.collate import ModelInputs, collate, scatter_tokens
from treg_train.config import TrainConfig, changed_on_resume
from treg_train.data import ShardDataset, TrainingPair, global_batches, micro_batches, rank_slice
from treg_train.lora import LoraSettings
from treg_train.losses import WEIGHTED, LossSettings, SideTokens, preference_loss, token_reward_agreement
from treg_train.metrics import MetricSink, MetricWindow, peak_memory_gb
from treg_train.model import load_sharded, use_padding_free


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    mesh: object

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Run:
    """What the phases of one run share; `step` counts the updates done (restored ones included)."""

    config: TrainConfig
    rt: Runtime
    output: Path
    tokenizer: object
    dataset: ShardDataset
    settings: LossSettings
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # None: the shards' reference log-probs stand in
    padding_free: bool  # sequences packed back to back, no padding
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    sink: MetricSink
    step: int = 0
    eval_dataset: ShardDataset | None = None  # the held-out pairs; None: no evaluation
    postfix: dict = field(default_factory=dict)  # the progress bar's latest values, training's and evaluation's


@dataclass
class LogWindow:
    """Sums since the last log line; the throughput also needs the tokens and the time since then."""

    metrics: MetricWindow = field(default_factory=MetricWindow)
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)


def train(config: TrainConfig) -> dict:
    runtime = setup_distributed()
    try:
        return _train(config, runtime)
    finally:
        dist.destroy_process_group()


def _train(config: TrainConfig, rt: Runtime) -> dict:
    run = _setup(config, rt)
    last = _train_steps(run)
    _export_final_model(run)
    run.sink.close()
    return {"steps": run.step, "final": str(run.output / "final"), "metrics": last} if rt.is_main else {}


# ---- set-up ---------------------------------------------------------------------------------


def setup_distributed() -> Runtime:
    """torchrun sets RANK/WORLD_SIZE; a plain `treg-train` is a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from torch.distributed.device_mesh import init_device_mesh

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return Runtime(dist.get_rank(), dist.get_world_size(), device, mesh)


def _setup(config: TrainConfig, rt: Runtime) -> Run:
    """Checks, data, models, optimizer and scheduler; the output folder is claimed only once all of them passed,
    then a --resume run restores its checkpoint."""
    output = Path(config.output)
    torch.manual_seed(config.seed)
    if config.global_batch_size % rt.world_size:
        raise UserError(f"--global-batch-size {config.global_batch_size} must be a multiple of the "
                        f"{rt.world_size} processes")
    checkpoint = check_output(output, config)
    tokenizer, dataset = _load_tokenizer_and_data(config)
    eval_dataset = _load_eval_data(config, tokenizer)
    compute_dtype = _compute_dtype(config, rt.device)
    policy, reference = _build_models(config, rt, dataset, compute_dtype)
    total_steps = _count_steps(config, dataset)
    optimizer, scheduler = _build_optimizer(config, policy, total_steps)
    if rt.is_main:
        print(f"treg-train: {rt.world_size} process(es) on {rt.device.type}, computing in {dtype_name(compute_dtype)}; "
              f"{dataset.num_pairs} pairs, {total_steps} steps of {config.global_batch_size}"
              + (f"; {eval_dataset.num_pairs} held-out pairs to evaluate on" if eval_dataset else ""), file=sys.stderr)
        # marked only now that every check passed (and every rank checked it, before loading)
        claim_folder(output, "treg-train")
    sink = MetricSink(output, config.report_to, config.as_dict(), enabled=rt.is_main)
    run = Run(config, rt, output, tokenizer, dataset, settings=config.loss_settings(), policy=policy,
              reference=reference, padding_free=use_padding_free(policy.lm, config.padding_free), optimizer=optimizer,
              scheduler=scheduler, total_steps=total_steps, sink=sink, eval_dataset=eval_dataset)
    if checkpoint is not None:
        _resume(run, checkpoint)
    return run


def check_output(output: Path, config: TrainConfig) -> Path | None:
    """The run folder must be new, empty, or this run's own with --resume and the same settings.
    Returns the checkpoint to resume from. Read-only, so every rank can run it."""
    ours = check_folder(output, "treg-train")
    if not config.resume:
        if ours:
            raise UserError(f"{output} already holds a run; add --resume to continue it, or give a new --output")
        return None
    checkpoint = latest_checkpoint(output) if ours else None
    if checkpoint is None:
        raise UserError(f"--resume: no complete checkpoint in {output / 'checkpoints'}")
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    if "config" not in saved:
        raise UserError(f"--resume: {checkpoint} does not record the run's settings, "
                        "so continuing it cannot be checked")
    changed = changed_on_resume(saved["config"], config)
    if changed:
        raise UserError(f"--resume: this run was started with other settings: {', '.join(changed)}; a resumed run "
                        "may change only --max-steps, --logging-steps, --save-steps, --report-to and --eval-steps; "
                        "start a new --output")
    return checkpoint


def _load_tokenizer_and_data(config: TrainConfig) -> tuple[object, ShardDataset]:
    """The model's tokenizer and the shards, which must have been scored with that very tokenizer and template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    except Exception as err:  # OSError, ValueError, HTTP errors...: one line for the user
        raise UserError(f"cannot load the tokenizer of --model {config.model!r}: {first_line(err)}") from None
    dataset = ShardDataset(config.data, config.reward_column, with_ref_logps=config.ref_model is None,
                           holdout=config.eval_fraction)
    _check_scored_for_the_model(config, tokenizer, dataset, config.data)
    return tokenizer, dataset


def _check_scored_for_the_model(config: TrainConfig, tokenizer, dataset: ShardDataset, data: str) -> None:
    """Token ids mean something only under the tokenizer that made them; without --ref-model, the shards'
    reference log-probs must be the policy's own."""
    if dataset.tokenizer_hash != tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"the shards in {data} were scored with another tokenizer or chat template than {config.model}'s; "
            "score the data with this model (treg-score --model ...) or train the model the data was scored for"
        )
    scorer, scored_for = dataset.provenance.get("scorer_model"), dataset.provenance.get("model")
    if config.ref_model is None and scorer and scored_for and scorer != scored_for:
        raise UserError(f"the reference log-probs in {data} come from the --scorer-model {scorer}, not from "
                        f"{scored_for}; train with --ref-model {scored_for} to compute them online")


def _load_eval_data(config: TrainConfig, tokenizer) -> ShardDataset | None:
    """The held-out pairs: --eval-data's shards, checked as the training data is, or the pairs --eval-fraction
    holds out of --data; None without either. They are read in storage order, one row group at a time."""
    if config.eval_data:
        dataset = ShardDataset(config.eval_data, config.reward_column, with_ref_logps=config.ref_model is None)
        _check_scored_for_the_model(config, tokenizer, dataset, config.eval_data)
    elif config.eval_fraction:
        dataset = ShardDataset(config.data, config.reward_column, with_ref_logps=config.ref_model is None,
                               holdout=config.eval_fraction, held_out=True)
        if dataset.num_pairs == 0:
            raise UserError(f"--eval-fraction {config.eval_fraction} holds out none of the "
                            f"{sum(rows for *_, rows in dataset.groups)} pairs in {config.data}; raise it")
    else:
        return None
    return dataset


def _compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """--dtype auto: bf16 on a GPU, fp32 on the CPU."""
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _build_models(config: TrainConfig, rt: Runtime, dataset: ShardDataset,
                  compute_dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The FSDP2 policy and, with --ref-model, the frozen online reference; without one the shards' reference
    log-probs stand in, so they should come from the precision this run computes in. With --lora-r the policy
    is the frozen checkpoint plus adapters: no second copy of the model either way."""
    if rt.is_main and config.ref_model is None:
        warn_on_precision_mismatch(dataset.provenance.get("dtype"), dtype_name(compute_dtype), config.data)
    mixed = compute_dtype if compute_dtype != torch.float32 else None
    load = dict(attn_implementation=config.attn_implementation, chunk_rows=config.logprob_chunk_rows)
    lora = LoraSettings.of(config)
    policy = load_sharded(config.model, rt.mesh, mixed, gradient_checkpointing=config.gradient_checkpointing,
                          lora=lora, **load)
    if rt.is_main and lora is not None:
        trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        print(f"treg-train: LoRA r={lora.r}, alpha {lora.alpha:g} on {lora.target_modules}: {trained / 1e6:.2f} M "
              f"trainable parameters of {sum(p.numel() for p in policy.parameters()) / 1e6:.1f} M", file=sys.stderr)
    reference = load_sharded(config.ref_model, rt.mesh, mixed, trainable=False, **load) if config.ref_model else None
    return policy, reference


def warn_on_precision_mismatch(scored: str | None, computed: str, data: str) -> None:
    """Reference log-probs from the shards and the policy's own should come from the same precision."""
    if scored == computed:
        return
    if scored in DTYPES:
        what, advice = f"in {scored}", f"treg-score --dtype {computed}, or train with --dtype {scored}"
    else:  # shards from before the dtype was resolved: vLLM's 'auto' ran fp32 checkpoints in bf16
        what, advice = "in an unrecorded precision ('auto')", f"treg-score --dtype {computed}"
    print(f"treg-train: warning: the reference log-probs in {data} were scored {what} but this run computes "
          f"in {computed}; rescore with {advice}", file=sys.stderr)


def _count_steps(config: TrainConfig, dataset: ShardDataset) -> int:
    steps_per_epoch = dataset.num_pairs // config.global_batch_size
    total_steps = config.max_steps or steps_per_epoch * config.num_train_epochs
    if total_steps < 1:
        raise UserError(f"{dataset.num_pairs} pairs give no step of --global-batch-size {config.global_batch_size}")
    return total_steps


def _build_optimizer(config: TrainConfig, policy: torch.nn.Module,
                     total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    trainable = [p for p in policy.parameters() if p.requires_grad]  # all of them, or LoRA's adapters
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.lr_scheduler_type, total_steps, int(config.warmup_ratio * total_steps)))
    return optimizer, scheduler


def lr_lambda(kind: str, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress if kind == "linear" else 1.0

    return factor


def _resume(run: Run, checkpoint: Path) -> None:
    """Weights, optimizer and schedule from the checkpoint; the metrics a killed run logged past it are dropped."""
    state = load_checkpoint(checkpoint, run.policy, run.optimizer)
    run.scheduler.load_state_dict(state["scheduler"])
    run.step = state["step"]
    run.sink.truncate_after(run.step)
    if run.rt.is_main:
        print(f"resumed from {checkpoint} at step {run.step}", file=sys.stderr)


# ---- the steps ------------------------------------------------------------------------------


def _train_steps(run: Run) -> dict:
    """Global batches until the last step, from where the run stands. Returns the last metrics logged."""
    config = run.config
    batches = global_batches(run.dataset, config.seed, config.global_batch_size, config.shuffle_buffer,
                             start_batch=run.step, rank=run.rt.rank, world_size=run.rt.world_size)
    window = LogWindow()
    bar = tqdm(total=run.total_steps, initial=run.step, desc="training", unit="step", disable=not run.rt.is_main,
               file=sys.stderr)
    last = {}
    while run.step < run.total_steps:
        epoch, _, mine = next(batches)
        grad_norm = _train_global_batch(run, mine, window)
        bar.update(1)
        if run.step % config.logging_steps == 0 or run.step == run.total_steps:
            last = _log_window(run, window, bar, grad_norm, epoch)
        due = run.step == run.total_steps or config.eval_steps and run.step % config.eval_steps == 0
        if run.eval_dataset is not None and due:
            began = time.perf_counter()
            _evaluate(run, bar)  # after the last step too: on the weights the export writes
            window.start += time.perf_counter() - began  # the throughput logged is training's alone
        if config.save_steps and run.step % config.save_steps == 0 and run.step < run.total_steps:
            _save_checkpoint(run)  # not at the last step: the export follows
    bar.close()
    return last


def _train_global_batch(run: Run, mine: list[TrainingPair], window: LogWindow) -> torch.Tensor:
    """One update from one global batch, of which this rank trains its share `mine`. Returns the gradient norm."""
    micro = _micro_batches_of_this_rank(run, mine, window.metrics)
    not_finite = _accumulate_gradients(run, micro, window)
    trainable = [p for p in run.policy.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, run.config.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    _stop_if_not_finite(run, not_finite, grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return grad_norm


def _micro_batches_of_this_rank(run: Run, mine: list[TrainingPair], window: MetricWindow) -> list[tuple[list, bool]]:
    """This rank's pairs within --max-length (the others are counted as skipped), in micro-batches of at most
    --micro-batch-tokens, as many as on every other rank; each with whether it is real."""
    config = run.config
    batches = _micro_batches_within_max_length(run, mine, window)
    micro = _pad_to_same_number_of_micro_batches(batches, mine[0], run.rt.device)
    if not micro:
        raise UserError(f"every pair of global batch {run.step + 1} is longer than --max-length {config.max_length} "
                        f"(prompt + response); raise it (the data was scored with max_length "
                        f"{run.dataset.provenance.get('max_length')})")
    return micro


def _micro_batches_within_max_length(run: Run, mine: list[TrainingPair], window: MetricWindow) -> list[list]:
    """Those of this rank's pairs within --max-length in micro-batches of at most --micro-batch-tokens; the others
    are counted as skipped."""
    config = run.config
    pairs = [p for p in mine if len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= config.max_length]
    window.add("skipped_too_long", len(mine) - len(pairs), 1)
    return micro_batches(pairs, config.micro_batch_tokens, run.padding_free)


def _pad_to_same_number_of_micro_batches(micro: list[list], filler: TrainingPair,
                                         device: torch.device) -> list[tuple[list, bool]]:
    """Each micro-batch as (pairs, real), padded up to the most any rank has with dummies weighted zero in the
    loss: `filler` cut to one token."""
    # Every rank must run as many forwards and backwards, or FSDP's collectives would not line up.
    count = torch.tensor([len(micro)], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    dummy = [filler.cut_to_one_token()]  # the cheapest forward, and never beyond --max-length
    return [(pairs, True) for pairs in micro] + [(dummy, False)] * (int(count) - len(micro))


def _accumulate_gradients(run: Run, micro: list[tuple[list, bool]], window: LogWindow) -> torch.Tensor:
    """Forward and backward of each micro-batch; gradients sync over ranks only on the last. Returns the number
    of this rank's losses that are not finite."""
    not_finite = torch.zeros((), device=run.rt.device)
    for index, (pairs, real) in enumerate(micro):
        inputs = collate(pairs, run.padding_free).to(run.rt.device)
        run.policy.set_requires_gradient_sync(index == len(micro) - 1)
        losses, metrics = _forward(run.policy, run.reference, inputs, run.settings)
        # Sum over the global batch / its size; FSDP averages gradients over ranks, so scale by world size.
        scale = run.rt.world_size / run.config.global_batch_size if real else 0.0
        (losses.sum() * scale).backward()
        if real:
            not_finite += (~torch.isfinite(losses.detach())).sum()
            window.tokens += inputs.num_tokens
        _add_pair_metrics(window.metrics, losses.detach(), metrics, inputs.num_pairs, real)
    return not_finite


def _add_pair_metrics(window: MetricWindow, losses: torch.Tensor, metrics: dict, num_pairs: int, real: bool) -> None:
    """The loss and the objective's metrics summed over the pairs; a dummy micro-batch adds only their names, with
    nothing to count, because every rank must reduce the same names even where all its forwards were dummies."""
    window.add("loss", losses.sum() if real else 0.0, num_pairs if real else 0)
    for name, values in metrics.items():
        window.add(name, values.sum() if real else 0.0, num_pairs if real else 0)


def _forward(policy, reference, inputs: ModelInputs, settings):
    args = (inputs.input_ids, inputs.position_ids, inputs.attention_mask, inputs.predict_index, inputs.targets)
    log_sum_sq = None
    if settings.loss_type in WEIGHTED:
        flat_logps, flat_log_sum_sq = policy(*args, with_log_sum_sq=True)
        logps, log_sum_sq = (scatter_tokens(t, inputs.token_mask) for t in (flat_logps, flat_log_sum_sq))
    else:
        logps = scatter_tokens(policy(*args), inputs.token_mask)
    if reference is not None:
        with torch.no_grad():
            ref_logps = scatter_tokens(reference(*args), inputs.token_mask)
    else:
        ref_logps = inputs.ref_logps
    n = inputs.num_pairs
    sides = [SideTokens(logps[rows], ref_logps[rows], inputs.rewards[rows], inputs.token_mask[rows],
                        None if log_sum_sq is None else log_sum_sq[rows])
             for rows in (slice(0, n), slice(n, 2 * n))]
    losses, metrics = preference_loss(*sides, settings)
    metrics["token_reward_agreement"] = token_reward_agreement(*sides, settings.beta) * n
    return losses, metrics


def _stop_if_not_finite(run: Run, not_finite: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Every rank stops together, before the update that would spoil the weights."""
    dist.all_reduce(not_finite)
    if not_finite > 0 or not torch.isfinite(grad_norm):
        raise UserError(f"the loss or the gradient is not finite at step {run.step + 1} "
                        f"(gradient norm {float(grad_norm):.3g}); "
                        f"the run stopped before that update and nothing was exported; last good checkpoint: "
                        f"{latest_checkpoint(run.output) or 'none'}; lower --learning-rate, or check the data")


def _log_window(run: Run, window: LogWindow, bar: tqdm, grad_norm: torch.Tensor, epoch: int) -> dict:
    """Means over the window and every rank, to the sink and the progress bar; then a new window. Returns them."""
    elapsed = time.perf_counter() - window.start
    window.metrics.add("grad_norm", float(grad_norm), 1)
    window.metrics.add("tokens_per_second_per_device", window.tokens / elapsed, 1)
    window.metrics.add("peak_memory_gb", peak_memory_gb(run.rt.device), 1)
    last = {**window.metrics.reduce(run.rt.device), "learning_rate": run.scheduler.get_last_lr()[0], "epoch": epoch}
    run.sink.log(run.step, last)
    run.postfix.update(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracies']:.2f}",
                       tok_s=f"{last['tokens_per_second_per_device']:,.0f}")
    bar.set_postfix(run.postfix)  # the latest evaluation's values stay beside them
    window.tokens, window.start = 0, time.perf_counter()
    return last


def _save_checkpoint(run: Run) -> None:
    """The trainer state records the settings too, so that --resume can refuse other ones."""
    save_checkpoint(run.output, run.step, run.policy, run.optimizer,
                    {"step": run.step, "scheduler": run.scheduler.state_dict(), "config": run.config.as_dict()})


# ---- evaluation -----------------------------------------------------------------------------


def _evaluate(run: Run, bar: tqdm) -> dict:
    """The objective's metrics over every held-out pair, as `eval/...` lines of metrics.jsonl and in the progress
    bar. The pairs go by chunks of a global batch, each rank forwarding its share as in training; the sums are
    reduced over ranks, so the means are over all pairs. The training goes on as if nothing happened: no
    gradient, no random number drawn (dropout off), the data stream untouched, the modules' modes restored."""
    window = MetricWindow()
    modes = {module: module.training for module in run.policy.modules()}
    run.policy.eval()
    try:
        with torch.no_grad():
            coordinates = run.eval_dataset.coordinates()
            while chunk := list(itertools.islice(coordinates, run.config.global_batch_size)):
                for pairs, real in _eval_micro_batches(run, chunk, window):
                    inputs = collate(pairs, run.padding_free).to(run.rt.device)
                    losses, metrics = _forward(run.policy, run.reference, inputs, run.settings)
                    _add_pair_metrics(window, losses, metrics, inputs.num_pairs, real)
    finally:
        for module, training in modes.items():
            module.training = training
    run.policy.reshard()  # the root keeps its gathered weights after a forward without backward: free them
    values = {f"eval/{name}": value for name, value in window.reduce(run.rt.device).items()}
    run.sink.log(run.step, values)
    if "eval/loss" in values:
        run.postfix.update(eval_loss=f"{values['eval/loss']:.4f}", eval_acc=f"{values['eval/rewards/accuracies']:.2f}")
        bar.set_postfix(run.postfix)
    return values


def _eval_micro_batches(run: Run, chunk: list, window: MetricWindow) -> list[tuple[list, bool]]:
    """This rank's share of a chunk of held-out pairs within --max-length (the others are counted as skipped), in
    micro-batches as many as on every other rank; a rank with no pair left repeats the chunk's first as a dummy."""
    mine = [run.eval_dataset.read(*c) for c in rank_slice(chunk, run.rt.rank, run.rt.world_size)]
    batches = _micro_batches_within_max_length(run, mine, window)
    filler = mine[0] if mine else run.eval_dataset.read(*chunk[0])
    return _pad_to_same_number_of_micro_batches(batches, filler, run.rt.device)


# ---- the end --------------------------------------------------------------------------------


def _export_final_model(run: Run) -> None:
    """A Hugging Face model in output/final, in the dtype of the checkpoint the run started from (LoRA merged into
    it); with --export-adapter the adapter alone in output/final-adapter too."""
    from transformers import AutoConfig

    lm_config = AutoConfig.from_pretrained(run.config.model)
    adapter = run.output / "final-adapter" if run.config.export_adapter else None
    export_hf(run.policy, lm_config, run.tokenizer, run.output / "final", dtype=DTYPES[checkpoint_dtype(lm_config)],
              adapter_target=adapter)
