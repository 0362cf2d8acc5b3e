"""The training loop, top to bottom: distributed set-up, data, FSDP2 policy, the step, logging,
checkpoints, export."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from treg_data.encoding import tokenizer_fingerprint
from treg_data.errors import UserError, first_line
from treg_data.folders import check_folder, claim_folder
from treg_data.precision import DTYPES, checkpoint_dtype, dtype_name
from treg_train.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from treg_train.collate import ModelInputs, collate, scatter_tokens
from treg_train.config import TrainConfig, changed_on_resume
from treg_train.data import ShardDataset, global_batches, micro_batches, rank_slice
from treg_train.losses import SideTokens, preference_loss, token_reward_agreement
from treg_train.metrics import MetricSink, MetricWindow, peak_memory_gb
from treg_train.model import load_sharded, packs_without_padding


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    mesh: object

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def lr_lambda(kind: str, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress if kind == "linear" else 1.0

    return factor


def train(config: TrainConfig) -> dict:
    runtime = setup_distributed()
    try:
        return _train(config, runtime)
    finally:
        dist.destroy_process_group()


def _train(config: TrainConfig, rt: Runtime) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    output = Path(config.output)
    torch.manual_seed(config.seed)
    if config.global_batch_size % rt.world_size:
        raise UserError(f"--global-batch-size {config.global_batch_size} must be a multiple of the {rt.world_size} processes")
    checkpoint = check_output(output, config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    except Exception as err:  # OSError, ValueError, HTTP errors...: one line for the user
        raise UserError(f"cannot load the tokenizer of --model {config.model!r}: {first_line(err)}") from None
    dataset = ShardDataset(config.data, config.reward_column, with_ref_logps=config.ref_model is None,
                           buffer_size=config.shuffle_buffer)
    if dataset.tokenizer_hash != tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"the shards in {config.data} were scored with another tokenizer or chat template than {config.model}'s; "
            "score the data with this model (treg-score --model ...) or train the model the data was scored for"
        )
    settings = config.loss_settings()
    compute_dtype = DTYPES[config.dtype] if config.dtype != "auto" else (torch.bfloat16 if rt.device.type == "cuda" else torch.float32)
    if rt.is_main and config.ref_model is None:
        warn_on_precision_mismatch(dataset.provenance.get("dtype"), dtype_name(compute_dtype), config.data)
    mixed = compute_dtype if compute_dtype != torch.float32 else None

    load = dict(attn_implementation=config.attn_implementation, chunk_rows=config.logprob_chunk_rows)
    policy = load_sharded(config.model, rt.mesh, mixed, gradient_checkpointing=config.gradient_checkpointing, **load)
    packed = packs_without_padding(policy.lm, config.padding_free)
    reference = load_sharded(config.ref_model, rt.mesh, mixed, trainable=False, **load) if config.ref_model else None

    steps_per_epoch = dataset.num_pairs // config.global_batch_size
    total_steps = config.max_steps or steps_per_epoch * config.num_train_epochs
    if total_steps < 1:
        raise UserError(f"{dataset.num_pairs} pairs give no step of --global-batch-size {config.global_batch_size}")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.lr_scheduler_type, total_steps, int(config.warmup_ratio * total_steps)))

    if rt.is_main:
        print(f"treg-train: {rt.world_size} process(es) on {rt.device.type}, computing in {dtype_name(compute_dtype)}; "
              f"{dataset.num_pairs} pairs, {total_steps} steps of {config.global_batch_size}", file=sys.stderr)
    if rt.is_main:  # marked only now that every check passed (and every rank checked it, before loading)
        claim_folder(output, "treg-train")
    sink = MetricSink(output, config.report_to, config.as_dict(), enabled=rt.is_main)
    step = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, policy, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        sink.truncate_after(step)
        if rt.is_main:
            print(f"resumed from {checkpoint} at step {step}", file=sys.stderr)

    batches = global_batches(dataset, config.seed, config.global_batch_size, config.shuffle_buffer, start_batch=step)
    window, tokens, window_start = MetricWindow(), 0, time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=not rt.is_main, file=sys.stderr)
    last = {}
    while step < total_steps:
        epoch, _, coordinates = next(batches)
        mine = [dataset.read(*c) for c in rank_slice(coordinates, rt.rank, rt.world_size)]
        pairs = [p for p in mine if len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= config.max_length]
        window.add("skipped_too_long", len(mine) - len(pairs), 1)
        micro = micro_batches(pairs, config.micro_batch_tokens, packed)
        count = torch.tensor([len(micro)], device=rt.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)  # every rank runs as many forwards (FSDP collectives)
        if int(count) == 0:
            raise UserError(f"every pair of global batch {step + 1} is longer than --max-length {config.max_length} "
                            f"(prompt + response); raise it (the data was scored with max_length "
                            f"{dataset.provenance.get('max_length')})")
        not_finite = torch.zeros((), device=rt.device)
        for index in range(int(count)):
            real = index < len(micro)
            # A rank with fewer micro-batches runs a zero-weighted one so the collectives line up.
            inputs = collate(micro[index] if real else (micro or [mine[:1]])[0], packed).to(rt.device)
            policy.set_requires_gradient_sync(index == int(count) - 1)
            losses, metrics = _forward(policy, reference, inputs, settings)
            # Sum over the global batch / its size; FSDP averages gradients over ranks, so scale by world size.
            scale = rt.world_size / config.global_batch_size if real else 0.0
            (losses.sum() * scale).backward()
            not_finite += (~torch.isfinite(losses.detach())).sum() if real else 0
            if real:
                tokens += inputs.num_tokens
                window.add("loss", losses.detach().sum(), inputs.num_pairs)
                for name, values in metrics.items():
                    window.add(name, values.sum(), inputs.num_pairs)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        dist.all_reduce(not_finite)
        if not_finite > 0 or not torch.isfinite(grad_norm):
            raise UserError(f"the loss or the gradient is not finite at step {step + 1} (gradient norm {float(grad_norm):.3g}); "
                            f"the run stopped before that update and nothing was exported; last good checkpoint: "
                            f"{latest_checkpoint(output) or 'none'}; lower --learning-rate, or check the data")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % config.logging_steps == 0 or step == total_steps:
            elapsed = time.perf_counter() - window_start
            window.add("grad_norm", float(grad_norm), 1)
            window.add("tokens_per_second_per_device", tokens / elapsed, 1)
            window.add("peak_memory_gb", peak_memory_gb(rt.device), 1)
            last = {**window.reduce(rt.device), "learning_rate": scheduler.get_last_lr()[0], "epoch": epoch}
            sink.log(step, last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracies']:.2f}",
                            tok_s=f"{last['tokens_per_second_per_device']:,.0f}")
            tokens, window_start = 0, time.perf_counter()
        if config.save_steps and step % config.save_steps == 0 and step < total_steps:
            save_checkpoint(output, step, policy, optimizer,
                            {"step": step, "scheduler": scheduler.state_dict(), "config": config.as_dict()})
    bar.close()

    lm_config = AutoConfig.from_pretrained(config.model)
    export_hf(policy, lm_config, tokenizer, output / "final", dtype=DTYPES[checkpoint_dtype(lm_config)])
    sink.close()
    return {"steps": step, "final": str(output / "final"), "metrics": last} if rt.is_main else {}


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
        raise UserError(f"--resume: {checkpoint} does not record the run's settings, so continuing it cannot be checked")
    changed = changed_on_resume(saved["config"], config)
    if changed:
        raise UserError(f"--resume: this run was started with other settings: {', '.join(changed)}; a resumed run "
                        f"may change only --max-steps, --logging-steps, --save-steps and --report-to; start a new --output")
    return checkpoint


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


def _forward(policy, reference, inputs: ModelInputs, settings):
    args = (inputs.input_ids, inputs.position_ids, inputs.attention_mask, inputs.predict_index, inputs.targets)
    logps = scatter_tokens(policy(*args), inputs.token_mask)
    if reference is not None:
        with torch.no_grad():
            ref_logps = scatter_tokens(reference(*args), inputs.token_mask)
    else:
        ref_logps = inputs.ref_logps
    n = inputs.num_pairs
    sides = [SideTokens(logps[rows], ref_logps[rows], inputs.rewards[rows], inputs.token_mask[rows])
             for rows in (slice(0, n), slice(n, 2 * n))]
    losses, metrics = preference_loss(*sides, settings)
    metrics["token_reward_agreement"] = token_reward_agreement(*sides, settings.beta) * n
    return losses, metrics
