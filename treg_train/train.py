"""The training run, top to bottom as it happens: the checks (preflight.py), set-up (FSDP2 policy,
optimizer, resume), the steps (step.py: one global batch at a time; logging, evaluation, checkpoints),
then the export. The run folder's metric sinks are closed however the run ends."""

from __future__ import annotations

import math
import re
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from treg_core.atomic import write_json
from treg_core.attention import default_attention
from treg_core.errors import UserError, check_interrupted, first_line
from treg_core.folders import claim_folder
from treg_core.precision import DTYPES, checkpoint_dtype, dtype_name
from treg_train.checkpoint import (
    FINISHED,
    export_hf,
    keep_finished_export,
    latest_checkpoint,
    load_checkpoint,
    rerun_advice,
    save_checkpoint,
)
from treg_train.config import TrainConfig
from treg_train.lora import LoraSettings
from treg_train.metrics import MetricSink, peak_memory_gb
from treg_train.model import PolicyOptions, load_sharded, use_padding_free
from treg_train.objectives import method
from treg_train.preflight import Preflight, leftover_note, lock_output, preflight
from treg_train.readers import EvalReader, TrainingStream
from treg_train.state import LogWindow, Run, Runtime, setup_distributed
from treg_train.step import (
    Batching,
    Objective,
    Start,
    compile_seconds,
    evaluate,
    pack_lengths,
    rank_micro_batches,
    train_step,
    weights_problem,
    weights_rms,
)
from treg_train.stopping import STOPPED, Stopped, StopSignals


def train(config: TrainConfig) -> dict:
    ours = not dist.is_initialized()  # a group a launcher started (Ray Train's) is the launcher's to end
    rt = setup_distributed(config.collective_timeout)
    try:
        return _train(config, rt)
    finally:
        if ours:
            dist.destroy_process_group()


def _train(config: TrainConfig, rt: Runtime) -> dict:
    checked = preflight(config, rt.world_size, rt.device, rt.is_main)
    run = _setup(config, rt, checked)
    try:
        if checked.checkpoint is not None:
            _resume(run, checked.checkpoint)
        last = _train_steps(run)
        check_interrupted()  # a Ctrl-C lost during the last step: no export
        _check_weights(run, "final model")
        _export_final_model(run, checked.tokenizer)
        if rt.is_main:  # written last: a run with it finished, and --resume says so
            write_json(run.output / FINISHED, {"step": run.step})
    except (dist.DistError, RuntimeError) as err:
        if not lost_process(err):
            raise
        when = f"during step {run.step + 1}" if run.step < run.total_steps else "while the final model was exported"
        raise UserError(f"another process of the run stopped or stopped answering {when} "
                        f"({collective_error(err)}); {rerun_advice(run.output)}") from None
    finally:
        run.sink.close(failed=sys.exc_info()[0] is not None)
    return {"steps": run.step, "final": str(run.output / "final"), "metrics": last} if rt.is_main else {}


# ---- set-up ---------------------------------------------------------------------------------


def _setup(config: TrainConfig, rt: Runtime, checked: Preflight) -> Run:
    """Models, optimizer and scheduler; the output folder is claimed only once all of them loaded."""
    torch.manual_seed(config.seed)
    if rt.is_main:
        print(f"treg-train: {checked.memory.line()}", file=sys.stderr)
        if checked.memory_note:
            print(f"treg-train: {checked.memory_note}", file=sys.stderr)
    lock_output(config, rt.is_main)  # before any model loads: a busy folder costs seconds, not a load
    attention = _attention(config, rt, checked.compute_dtype)
    options = PolicyOptions(attention, config.logprob_chunk_rows, checked.memory.checkpointing, config.compile,
                            config.use_liger_kernel, checked.memory.sharding)
    objective = Objective(*_build_models(config, rt, checked.compute_dtype, options), settings=config.loss_settings())
    fused = rt.device.type == "cuda"
    optimizer, scheduler = build_optimizer(config, objective.policy, checked.total_steps, fused=fused)
    if rt.is_main:
        print(f"treg-train: {rt.world_size} process(es) on {rt.device.type}, computing in "
              f"{dtype_name(checked.compute_dtype)}; {checked.index.num_pairs} pairs, {checked.total_steps} steps of "
              f"{config.global_batch_size}" + (f"; {checked.eval_index.num_pairs} held-out pairs to evaluate on"
                                               if checked.eval_index else ""), file=sys.stderr)
        for note in (leftover_note(config, checked.index), checked.extension):
            if note:
                print(f"treg-train: {note}", file=sys.stderr)
        claim_folder(config.output, "treg-train")  # only now that every check passed, on every rank
        if checked.checkpoint is None:  # lines of a start that failed before its first checkpoint are not this run's
            (Path(config.output) / "metrics.jsonl").unlink(missing_ok=True)
        (Path(config.output) / STOPPED).unlink(missing_ok=True)  # this run goes on from where that one stopped
    padding_free = use_padding_free(objective.policy.lm, config.padding_free)
    batching = Batching(config.max_length, config.micro_batch_tokens, padding_free, rt.device,
                        pack_lengths(config.micro_batch_tokens) if attention == "flex_attention" else ())
    run = Run(config, rt, objective, batching, optimizer, scheduler,
              stream=TrainingStream(checked.index, config.seed, config.shuffle_buffer),
              evaluator=EvalReader(checked.eval_index) if checked.eval_index else None,
              total_steps=checked.total_steps,
              sink=MetricSink(Path(config.output), config.report_to, config.record(), enabled=rt.is_main))
    return run


def _attention(config: TrainConfig, rt: Runtime, compute_dtype: torch.dtype) -> str | None:
    """--attn-implementation, or where none is given the fastest that computes what the model would."""
    if config.attn_implementation:
        return config.attn_implementation
    from transformers import AutoConfig

    attention, why = default_attention(AutoConfig.from_pretrained(config.model), rt.device, compute_dtype)
    if rt.is_main:
        print(f"treg-train: attention: {why}", file=sys.stderr)
    return attention


def _build_models(config: TrainConfig, rt: Runtime, compute_dtype: torch.dtype,
                  options: PolicyOptions) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The FSDP2 policy and, with --ref-model, the frozen online reference. With --lora-r the policy is the
    frozen checkpoint plus adapters: no second copy of the model either way."""
    mixed = compute_dtype if compute_dtype != torch.float32 else None
    lora = LoraSettings.of(config)
    mesh = rt.mesh_for(options.sharding)
    policy = load_sharded(config.model, mesh, mixed, options, lora=lora)
    if rt.is_main and lora is not None:
        trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        print(f"treg-train: LoRA r={lora.r}, alpha {lora.alpha:g} on {lora.target_modules}: {trained / 1e6:.2f} M "
              f"trainable parameters of {sum(p.numel() for p in policy.parameters()) / 1e6:.1f} M", file=sys.stderr)
    reference = load_sharded(config.ref_model, mesh, mixed, options, trainable=False,
                             whole_output_layer=method(config.loss).needs_reference_distribution) \
        if config.ref_model else None
    return policy, reference


def build_optimizer(config: TrainConfig, policy: torch.nn.Module, total_steps: int,
                    fused: bool = False) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable weights (all of them, or LoRA's adapters); `fused`: one kernel per step for all
    of them (CUDA), instead of a few per weight."""
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  fused=fused or None)
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


def _resume(run: Run, checkpoint) -> None:
    """Weights, optimizer and schedule from the checkpoint; the metrics a killed run logged past it are dropped."""
    state = load_checkpoint(checkpoint, run.objective.policy, run.optimizer)
    run.scheduler.load_state_dict(state["scheduler"])
    # The learning rate of the next step from this run's schedule (the same as saved, unless --max-steps changed).
    scheduler = run.scheduler
    for group, base, factor in zip(run.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]
    run.step = state["step"]
    run.sink.truncate_after(run.step)
    if run.rt.is_main:
        print(f"resumed from {checkpoint} at step {run.step}", file=sys.stderr)
        planned = state.get("total_steps", run.total_steps)
        if planned != run.total_steps:  # --max-steps changed: the schedule spans the new total, as in transformers
            config = run.config
            old = config.learning_rate * lr_lambda(config.lr_scheduler_type, planned,
                                                   int(config.warmup_ratio * planned))(run.step)
            print(f"treg-train: the learning-rate schedule now spans {run.total_steps} steps instead of {planned}: "
                  f"at step {run.step} it is {run.scheduler.get_last_lr()[0]:.3g} where the run's own schedule had "
                  f"{old:.3g}", file=sys.stderr)


# ---- the steps ------------------------------------------------------------------------------


def _train_steps(run: Run) -> dict:
    """Global batches until the last step, from where the run stands. Returns the last metrics logged."""
    config = run.config
    batches = run.stream.global_batches(config.global_batch_size, start_batch=run.step, rank=run.rt.rank,
                                        world_size=run.rt.world_size)
    window = LogWindow()
    bar = tqdm(total=run.total_steps, initial=run.step, desc="training", unit="step", disable=not run.rt.is_main,
               file=sys.stderr)
    last = {}
    with StopSignals(config.stop_signals) as stop:
        while run.step < run.total_steps:
            check_interrupted()
            epoch, _, mine = next(batches)
            grad_norm = _update(run, mine, window)
            bar.update(1)
            if run.step % config.logging_steps == 0 or run.step == run.total_steps:
                last = _log_window(run, window, bar, grad_norm, epoch)
            due = run.step == run.total_steps or config.eval_steps and run.step % config.eval_steps == 0
            if run.evaluator is not None and due:
                began = time.perf_counter()
                _evaluate(run, bar)  # after the last step too: on the weights the export writes
                window.start += time.perf_counter() - began  # the throughput logged is training's alone
            saved = bool(config.save_steps) and run.step % config.save_steps == 0 and run.step < run.total_steps
            if saved:
                _save_checkpoint(run)  # not at the last step: the export follows
            # On every rank alike, at every step boundary but the last (the export follows it): one all-reduce.
            received = stop.agreed(run.rt.device) if run.step < run.total_steps else None
            if received:
                _stop(run, received, saved, bar)
    bar.close()
    return last


def _stop(run: Run, received: signal.Signals, saved: bool, bar: tqdm) -> None:
    """A stop signal came to a process: every process saves this step's checkpoint (unless it just did), rank 0
    marks the run folder as stopped (for a requeue to look for), and all exit."""
    if not saved:
        _save_checkpoint(run)
    bar.close()
    checkpoint = latest_checkpoint(run.output)
    if run.rt.is_main:
        write_json(run.output / STOPPED, {"signal": received.name, "step": run.step, "checkpoint": str(checkpoint)})
    raise Stopped(f"stopped by {received.name} at step {run.step} with a checkpoint in {checkpoint}; rerun with "
                  "--resume to continue", run.rt.is_main)


# What gloo says when the other end of a collective is gone: its connection closed, or the timeout passed.
LOST_PROCESS = re.compile(r"gloo/transport|Connection (closed|reset) by peer|Timed out waiting", re.I)


def lost_process(err: BaseException) -> bool:
    """Whether a collective failed because another process of the run died or hangs (NCCL's errors are
    DistBackendError; gloo's, plain RuntimeError)."""
    return isinstance(err, dist.DistError) or bool(LOST_PROCESS.search(str(err)))


def collective_error(err: BaseException) -> str:
    """The gist of a backend's error: its first sentence, without the source location gloo puts first."""
    text = re.sub(r"^\[[^\]]*:\d+\]\s*", "", first_line(err))
    return text.split(". ")[0].rstrip(".")


def _update(run: Run, mine: list, window: LogWindow) -> torch.Tensor:
    """One update from one global batch, of which this rank trains its share `mine`. Returns the gradient norm."""
    micro = rank_micro_batches(mine, mine[0], run.batching, window.metrics)
    if not micro:  # on every rank alike: the count is the largest over the ranks
        raise UserError(f"every pair of global batch {run.step + 1} is longer than --max-length "
                        f"{run.config.max_length} (prompt + response); raise it (the data was scored with "
                        f"max_length {run.stream.index.provenance.max_length})")
    rms = weights_rms(run.objective.policy, run.rt.device) if run.start is None else None
    before = compile_seconds()
    result = train_step(run.objective, micro, run.batching, run.config.global_batch_size, run.config.max_grad_norm,
                        window.metrics)
    window.compiling += compile_seconds() - before
    if result.transport_failed:  # the count is over every rank: all stop together
        raise UserError(f"OTPO's token weights are not finite for {result.transport_failed} pair(s) of global batch "
                        f"{run.step + 1}: POT's Sinkhorn overflowed at --otpo-epsilon {run.config.otpo_epsilon:g}; "
                        "the run stopped before that update and nothing was exported; "
                        f"{change_and_rerun(run.output, 'raise --otpo-epsilon (its authors use 0.1 to 1)')}")
    if not result.finite:  # every rank stops together, before the update that would spoil the weights
        raise UserError(f"the loss or the gradient is not finite at step {run.step + 1} "
                        f"(gradient norm {float(result.grad_norm):.3g}); the run stopped before that update and "
                        f"nothing was exported; check the data, or {change_and_rerun(run.output)}")
    if result.learning == 0:  # the count is over every rank: all stop together
        raise UserError(f"no pair of global batch {run.step + 1} gives the loss anything to learn: "
                        f"{nothing_learned(run.config)}; the run stopped and nothing was exported")
    run.optimizer.step()
    if run.start is None:
        run.start = Start(rms, micro[0][0], result.first_loss)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    window.tokens += result.tokens
    return result.grad_norm


def _log_window(run: Run, window: LogWindow, bar: tqdm, grad_norm: torch.Tensor, epoch: int) -> dict:
    """Means over the window and every rank, to the sink and the progress bar; then a new window. Returns them."""
    elapsed = time.perf_counter() - window.start - window.compiling
    window.compiled += window.compiling
    window.metrics.add("grad_norm", float(grad_norm), 1)
    window.metrics.add("tokens_per_second_per_device", window.tokens / max(elapsed, 1e-9), 1)
    if run.config.compile or run.batching.pack_lengths:  # on every rank alike: each must reduce the same names
        window.metrics.add("compile_seconds", window.compiled, 1)
    window.metrics.add("peak_memory_gb", peak_memory_gb(run.rt.device), 1)
    last = {**window.metrics.reduce(run.rt.device), "learning_rate": run.scheduler.get_last_lr()[0], "epoch": epoch}
    run.sink.log(run.step, last)
    run.postfix.update(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracies']:.2f}",
                       tok_s=f"{last['tokens_per_second_per_device']:,.0f}")
    bar.set_postfix(run.postfix)  # the latest evaluation's values stay beside them
    window.tokens, window.start, window.compiling = 0, time.perf_counter(), 0.0
    return last


def _evaluate(run: Run, bar: tqdm) -> None:
    """The objective's metrics over every held-out pair, as `eval/...` lines of metrics.jsonl and in the
    progress bar."""
    values = {f"eval/{name}": value for name, value in
              evaluate(run.objective, run.evaluator, run.batching, run.config.global_batch_size).items()}
    run.sink.log(run.step, values)
    if "eval/loss" in values:
        run.postfix.update(eval_loss=f"{values['eval/loss']:.4f}", eval_acc=f"{values['eval/rewards/accuracies']:.2f}")
        bar.set_postfix(run.postfix)


def nothing_learned(config) -> str:
    """Why a token weighting left every pair of a batch without a gradient, and the setting that changes it."""
    if config.weighting == "sepo":
        shortest = 1 + math.ceil(1 / config.sepo_ratio)  # ⌊ratio·(L − 1)⌋ ≥ 1
        return (f"SePO selects ⌊{config.sepo_ratio:g}·(L − 1)⌋ of a response's L tokens, none below {shortest} "
                f"tokens, and a pair needs a token on both sides; raise --sepo-ratio, or train on longer answers")
    return (f"the {config.weighting} token weighting gives every token of these pairs the weight 0 (their "
            "answers are a token or two long); train on longer answers, or leave --token-weighting out")


def _check_weights(run: Run, what: str) -> None:
    """Before anything is written that a rerun would trust: the weights after the latest update are usable."""
    problem = weights_problem(run.objective, run.batching, run.start) if run.start else None
    if problem:
        raise UserError(f"the weights after the update at step {run.step} {problem}; the run stopped before writing "
                        f"its {what} and nothing was exported; {change_and_rerun(run.output)}")


def change_and_rerun(output: Path, change: str = "lower --learning-rate") -> str:
    """The command after a diverged run: --resume keeps the settings (the learning rate, or what `change` changes),
    so other ones are a new run."""
    newest = latest_checkpoint(output)
    if newest is None:
        return f"{change} and run the command again"
    return (f"{change} and start a new --output (this one keeps the run's good checkpoints, the newest "
            f"{newest})")


def _save_checkpoint(run: Run) -> None:
    """The trainer state records the settings too, so that --resume can refuse other ones."""
    _check_weights(run, "checkpoint")
    save_checkpoint(run.output, run.step, run.objective.policy, run.optimizer,
                    {"step": run.step, "total_steps": run.total_steps, "scheduler": run.scheduler.state_dict(),
                     "config": run.config.record()})


# ---- the end --------------------------------------------------------------------------------


def _export_final_model(run: Run, tokenizer) -> None:
    """A Hugging Face model in output/final, in the dtype of the checkpoint the run started from (LoRA merged into
    it); with --export-adapter the adapter alone in output/final-adapter too."""
    from transformers import AutoConfig

    lm_config = AutoConfig.from_pretrained(run.config.model)
    if run.rt.is_main:
        keep_finished_export(run.output)
    adapter = run.output / "final-adapter" if run.config.export_adapter else None
    export_hf(run.objective.policy, lm_config, tokenizer, run.output / "final",
              dtype=DTYPES[checkpoint_dtype(lm_config)], adapter_target=adapter)
