"""Checkpoints with torch.distributed.checkpoint, written so that resume never trusts a partial
one, and the final export in Hugging Face format."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from treg_core.atomic import publish, replacing
from treg_core.errors import UserError, first_line

PREFIX = "step-"
FINISHED = "finished.json"  # in the run folder, once final/ is exported: {"step": the last step}
# Frozen weights (a LoRA run's base model) are not saved: they are the starting checkpoint's, which --resume
# loads again (it refuses another --model). A full fine-tuning run has none, so it saves everything.
TRAINABLE = StateDictOptions(ignore_frozen_params=True, strict=False)


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def latest_checkpoint(output: str | Path) -> Path | None:
    """The newest complete checkpoint: only renamed (finished) folders count."""
    done = [p for p in checkpoint_dir(output).glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp")]
    return max(done, key=lambda p: int(p.name[len(PREFIX):]), default=None)


def rerun_advice(output: str | Path) -> str:
    """The command that goes on after a run stopped: --resume only where a complete checkpoint exists."""
    newest = latest_checkpoint(output)
    if newest is None:
        return "rerun the same command (without --resume: no checkpoint was written) to start again"
    return f"rerun with --resume to continue from the newest checkpoint, {newest}"


def save_checkpoint(output: str | Path, step: int, model, optimizer, trainer_state: dict) -> Path:
    """Every rank writes its shards into step-N.tmp; rank 0 renames it to step-N once all are done."""
    rank = dist.get_rank()
    final = checkpoint_dir(output) / f"{PREFIX}{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a kill mid-save
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state(model, optimizer)
    try:
        dcp.save(state, checkpoint_id=str(tmp))
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   tmp / f"rng-{rank:05d}.pt")
        if rank == 0:  # the world size too: a resume on another number of processes re-seeds (resume_random_state)
            state_record = {**trainer_state, "world_size": dist.get_world_size()}
            (tmp / "trainer_state.json").write_text(json.dumps(state_record, indent=2))
    except (Exception, CheckpointException) as err:  # a full disk: nothing half-written is left under any name
        shutil.rmtree(tmp, ignore_errors=True)
        if _interrupted(err):  # Ctrl-C reached a rank's writer: said as Ctrl-C, not as a full disk
            raise KeyboardInterrupt from None
        raise UserError(f"cannot write the checkpoint of step {step} to {final}: {_write_error(err)}; nothing "
                        f"partial was kept: free space, then {rerun_advice(output)}") from None
    dist.barrier()
    if rank == 0:
        publish(tmp, final)
    dist.barrier()
    return final


def _interrupted(err: BaseException) -> bool:
    """torch.distributed.checkpoint wraps each rank's failure, a KeyboardInterrupt too, in a CheckpointException."""
    failures = err.failures.values() if isinstance(err, CheckpointException) else []
    return any(isinstance(failure[0], KeyboardInterrupt) for failure in failures)


def _write_error(err: BaseException) -> str:
    """Why a write failed: the OSError itself, or the one torch.distributed.checkpoint wrapped for its ranks."""
    if isinstance(err, CheckpointException):  # the first failing rank's error (a serializer's, for a failed write)
        err = next(iter(err.failures.values()))[0]
    reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
    return f"{reason} (is the disk full?)"


def _sharded_state(model, optimizer) -> dict:
    """This rank's shards of the trainable weights and of the optimizer state."""
    return {"model": get_model_state_dict(model, options=TRAINABLE),
            "optim": get_optimizer_state_dict(model, optimizer)}


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's random state; returns the trainer state saved with them. The
    weights and the optimizer state are DTensors that torch.distributed.checkpoint reshards, so the run may go on
    with another number of processes than wrote the checkpoint."""
    # strict=False only lets the frozen weights be absent; dcp.load refuses a checkpoint that lacks any other.
    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=TRAINABLE)
    set_optimizer_state_dict(model, optimizer, state["optim"])
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    resume_random_state(path, trainer_state)
    return trainer_state


def saved_world_size(path: Path, trainer_state: dict) -> int:
    """The number of processes that wrote the checkpoint: recorded, or (older checkpoints) one RNG file each."""
    return trainer_state.get("world_size") or len(list(path.glob("rng-*.pt")))


def resume_random_state(path: Path, trainer_state: dict) -> None:
    """This rank's random state as saved, where as many processes resume as wrote the checkpoint; otherwise no
    rank's saved state is its own, and each is seeded afresh from (--seed, step, rank), the same on every resume."""
    rank, world_size, written_by = dist.get_rank(), dist.get_world_size(), saved_world_size(path, trainer_state)
    if world_size == written_by:
        rng = torch.load(path / f"rng-{rank:05d}.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return
    seed, step = trainer_state.get("config", {}).get("seed", 0), trainer_state["step"]
    torch.manual_seed(reseeded(seed, step, rank))  # every device's generator, CUDA's too
    if rank == 0:
        print(f"treg-train: the run resumes on {world_size} process(es) where it was written by {written_by}: the "
              "same global batches follow, but each process's random state (dropout) is re-seeded from --seed, the "
              "step and its rank", file=sys.stderr)


def reseeded(seed: int, step: int, rank: int) -> int:
    """A seed that depends on all three, mixed by numpy's SeedSequence (no salted hash: the same in every process)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0])


def keep_finished_export(output: Path) -> None:
    """Before a continued run exports: the finished run's final/ (and final-adapter/) move aside, renamed
    final-step-N, so that a longer run never replaces a model without keeping it."""
    if not (output / FINISHED).is_file():
        return
    step = json.loads((output / FINISHED).read_text())["step"]
    for name in ("final", "final-adapter"):
        if (output / name).exists():
            os.replace(output / name, output / f"{name}-step-{step}")


def export_hf(model, lm_config, tokenizer, target: Path, dtype: torch.dtype = torch.float32,
              adapter_target: Path | None = None) -> None:
    """Gather the full weights to rank 0 and write safetensors + config + tokenizer, in `dtype`
    (the dtype of the checkpoint training started from: the fp32 master weights are cast to it).
    A LoRA model is written merged, as the plain architecture, so that every loader reads it like a fully
    fine-tuned one; with `adapter_target` the adapter alone is written there too, in peft's format."""
    from transformers import AutoModelForCausalLM

    from treg_train.lora import ADAPTER, adapted_layers, merged_state, save_adapter

    layers = adapted_layers(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    failure = [None]  # rank 0 writes; every rank learns whether it could, and stops alike
    if dist.get_rank() == 0:
        if adapter_target is not None:
            save_adapter(full, model.lm.peft_config[ADAPTER], adapter_target, dtype)
        merged = merged_state(full, layers) if layers else full
        state = {key.removeprefix("lm."): value.to(dtype) for key, value in merged.items()}
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(lm_config, dtype=dtype)
        # A tied weight (Gemma-2's output layer is its embedding) is saved once, under its first
        # name, as in the original checkpoint: loaders such as vLLM's refuse the second name.
        first_name: dict[int, str] = {}
        for name, parameter in skeleton.named_parameters(remove_duplicate=False):
            if first_name.setdefault(id(parameter), name) != name:
                state.pop(name, None)
        try:
            with replacing(target, single_writer=True) as tmp:  # on an error the temporary copy is removed
                skeleton.save_pretrained(tmp, state_dict=state)
                tokenizer.save_pretrained(tmp)
        except Exception as err:  # OSError, or a serializer's error for a failed write
            failure = [f"cannot write the final model to {target}: {_write_error(err)}; nothing partial was kept: "
                       f"free space, then {rerun_advice(target.parent)}"]
    dist.broadcast_object_list(failure, src=0)
    if failure[0]:
        raise UserError(failure[0])
