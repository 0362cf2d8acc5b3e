"""Every check a run makes before it loads a model: the run folder, the tokenizer, the shards (training and
held-out) and what they were scored for, the precision, the number of steps. Read-only, so every rank
runs it, and a mistake costs seconds rather than a model load."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from treg_core.attention import VARLEN
from treg_core.contract import model_identity, tokenizer_fingerprint
from treg_core.errors import UserError
from treg_core.folders import check_folder, lock_folder
from treg_core.precision import DTYPES, dtype_name
from treg_core.sources import check_same_vocabulary, load_model_config, load_tokenizer
from treg_train.checkpoint import FINISHED, latest_checkpoint
from treg_train.config import TrainConfig, changed_on_resume
from treg_train.index import Reading, ShardIndex
from treg_train.objectives import method
from treg_train.plan import MemoryPlan, plan_run


@dataclass
class Preflight:
    """What the checks found, for the run to use."""

    checkpoint: Path | None  # the one --resume continues from
    tokenizer: object
    index: ShardIndex  # the training pairs
    eval_index: ShardIndex | None  # the held-out pairs; None: no evaluation
    compute_dtype: torch.dtype
    total_steps: int
    memory: MemoryPlan  # with the activation checkpointing the run uses
    memory_note: str | None  # why checkpointing was turned on, when --gradient-checkpointing auto did
    extension: str | None = None  # what --resume with a larger --max-steps does to a finished run


def preflight(config: TrainConfig, world_size: int, device: torch.device, is_main: bool) -> Preflight:
    if config.global_batch_size % world_size:
        raise UserError(f"--global-batch-size {config.global_batch_size} must be a multiple of the "
                        f"{world_size} processes")
    check_packages(config)
    checkpoint = check_output(Path(config.output), config)
    tokenizer = load_tokenizer(config.model, what="--model")
    if config.ref_model:
        check_same_vocabulary(tokenizer, load_tokenizer(config.ref_model, what="--ref-model"), config.ref_model,
                              flag="--ref-model")
        check_same_output_layer(config)
    index = ShardIndex(config.data, reading(config), holdout=config.eval_fraction)
    check_scored_for_the_model(config, tokenizer, index, config.data)
    if is_main and config.ref_model and method(config.loss).needs_reference_distribution and \
            index.provenance.ref_topk:
        print(f"treg-train: --ref-model {config.ref_model} gives TDPO's KL exactly, over its whole distribution; the "
              f"top-{index.provenance.ref_topk} tokens the shards in {config.data} store (treg-score --ref-topk) are "
              "not read", file=sys.stderr)
    dtype = compute_dtype(config.dtype, device)
    if is_main and config.ref_model is None:
        warn_on_precision_mismatch(index.provenance.dtype, dtype_name(dtype), config.data)
    held_out, total_steps = eval_index(config, tokenizer, index), count_steps(config, index)
    memory, note = plan_run(config, world_size, device, dtype, lengths=index.pair_lengths())
    return Preflight(checkpoint, tokenizer, index, held_out, dtype, total_steps, memory, note,
                     extension_note(Path(config.output), checkpoint, total_steps))


def check_same_output_layer(config: TrainConfig) -> None:
    """TDPO's exact KL compares the policy's and --ref-model's distributions token by token: the two output layers
    must have as many rows (one tokenizer may sit on output layers padded to different widths)."""
    if not method(config.loss).needs_reference_distribution:
        return
    widths = [load_model_config(path, flag).get_text_config().vocab_size
              for path, flag in ((config.model, "--model"), (config.ref_model, "--ref-model"))]
    if widths[0] != widths[1]:
        raise UserError(f"--model and --ref-model have output layers of {widths[0]} and {widths[1]} tokens, but "
                        f"--loss {config.loss} compares their distributions token by token (TDPO's KL); give a "
                        "--ref-model with --model's output layer, or leave --ref-model out and train on shards "
                        "scored with treg-score --ref-topk K")


def reading(config: TrainConfig) -> Reading:
    """The columns this run reads of each pair."""
    return Reading(config.reward_column, ref_logps=config.ref_model is None, signal=config.signal_columns,
                   swap=config.swap_pairs,
                   ref_topk=method(config.loss).needs_reference_distribution and config.ref_model is None)


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """--dtype auto: bf16 on a GPU, fp32 on the CPU."""
    if setting != "auto":
        return DTYPES[setting]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# --attn-implementation: the kernels a run can ask for, and the package each needs beyond torch and transformers.
ATTENTION_PACKAGES = {VARLEN: None, "sdpa": None, "eager": None, "flex_attention": None,
                      "flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def check_packages(config: TrainConfig) -> None:
    """What the settings need installed, found before the folder is claimed or a model loaded."""
    if config.report_to != "none" and importlib.util.find_spec(config.report_to) is None:
        raise UserError(f"--report-to {config.report_to} needs the {config.report_to} package: pip install "
                        f"{config.report_to}, or leave --report-to out (metrics.jsonl is always written)")
    attention = config.attn_implementation
    if attention and attention not in ATTENTION_PACKAGES:
        raise UserError(f"--attn-implementation {attention} is not one treg can run; give one of "
                        f"{', '.join(ATTENTION_PACKAGES)}, or leave it out for the default")
    check_device(config, "cuda" if torch.cuda.is_available() else "cpu")  # the device setup_distributed picks
    package = ATTENTION_PACKAGES.get(attention)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"--attn-implementation {attention} needs the {package} package, which is not installed; "
                        f"install it, or use {VARLEN} (flash attention over packed sequences through torch)")
    if config.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("--use-liger-kernel needs the liger-kernel package, which is not installed: pip install "
                        "liger-kernel, or leave --use-liger-kernel off")


# Kernels that run on CUDA only: flash attention has no CPU kernel, flex attention no backward on a CPU.
GPU_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def check_device(config: TrainConfig, device_type: str) -> None:
    """What the settings need of the device, checked before what they need installed: no package makes a CPU
    run a CUDA kernel."""
    if device_type == "cuda":
        return
    if config.attn_implementation in GPU_ATTENTION:
        raise UserError(f"--attn-implementation {config.attn_implementation} needs a GPU, and this run has none; on "
                        f"a CPU use {VARLEN} (packed sequences, sdpa on each), sdpa or eager, or leave it out for the "
                        "default")
    if config.use_liger_kernel:
        raise UserError("--use-liger-kernel needs a GPU (liger-kernel's kernels are CUDA Triton kernels), and this "
                        "run has none; leave it off on a CPU")


def lock_output(config: TrainConfig, is_main: bool) -> None:
    """Before the first write: the main process takes the run folder's lock for the whole run
    (treg_core.folders.lock_folder) and checks the folder again under it, for another run may have written there
    since the preflight; every process learns whether it could, and all stop alike if not."""
    refusal = [None]
    if is_main:
        try:
            lock_folder(config.output, "treg-train")
            check_output(Path(config.output), config)
        except UserError as err:
            refusal = [str(err)]
    if dist.is_initialized():
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise UserError(refusal[0])


def check_output(output: Path, config: TrainConfig) -> Path | None:
    """The run folder must be new, empty, the folder of a start that failed before its first checkpoint (started
    again), or this run's own with --resume and the same settings. Returns the checkpoint to resume from. The
    number of processes may differ from the checkpoint's (any that divides --global-batch-size, checked first):
    the weights and optimizer state are resharded, the global batches are the same (checkpoint.load_checkpoint)."""
    ours = check_folder(output, "treg-train")
    checkpoint = latest_checkpoint(output) if ours else None
    if not config.resume:
        if checkpoint is not None:
            raise UserError(f"{output} already holds a run; add --resume to continue it, or give a new --output")
        if (output / "final").exists():
            raise UserError(f"{output} already holds a run {without_checkpoint(output)}")
        return None
    if checkpoint is None:
        raise UserError(f"--resume: the run in {output} finished {without_checkpoint(output)}"
                        if ours and (output / "final").exists() else
                        f"--resume: no complete checkpoint in {output / 'checkpoints'}"
                        + ("; run the command without --resume to start again" if ours else ""))
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    if "config" not in saved:
        raise UserError(f"--resume: {checkpoint} does not record the run's settings, "
                        "so continuing it cannot be checked")
    changed = changed_on_resume(saved["config"], config)
    if changed:
        raise UserError(f"--resume: this run was started with other settings: {', '.join(changed)}; a resumed run "
                        "may change only --max-steps, --logging-steps, --save-steps, --report-to, --eval-steps, "
                        "--gradient-checkpointing and --sharding; "
                        "start a new --output")
    finished = output / FINISHED
    if finished.is_file():
        step = json.loads(finished.read_text())["step"]
        if config.max_steps is None or config.max_steps <= step:
            raise UserError(f"--resume: the run in {output} finished at step {step} and exported its model to "
                            f"{output / 'final'}; nothing to resume (a larger --max-steps trains it on)")
    if config.max_steps is not None and config.max_steps < saved["step"]:
        raise UserError(f"--resume: --max-steps {config.max_steps} is below the step {saved['step']} of the newest "
                        f"checkpoint, {checkpoint}; give at least {saved['step']}")
    return checkpoint


def without_checkpoint(output: Path) -> str:
    """A run that exported its model but wrote no checkpoint cannot go on, nor be started again over its model."""
    return (f"without a checkpoint to go on from (--save-steps); its model is {output / 'final'}: give a new "
            f"--output, with --model {output / 'final'} to train on from it")


def extension_note(output: Path, checkpoint: Path | None, total_steps: int) -> str | None:
    """What continuing a finished run does, said before it starts: it goes on from the newest checkpoint (none is
    written at the last step), and the finished run's model is kept (checkpoint.keep_finished_export)."""
    if checkpoint is None or not (output / FINISHED).is_file():
        return None
    finished = json.loads((output / FINISHED).read_text())["step"]
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    again = {0: "", 1: f"step {finished} is trained again, "}.get(finished - saved,
                                                                 f"steps {saved + 1} to {finished} are trained again, ")
    return (f"the run finished at step {finished}; it goes on from its newest checkpoint, step {saved}: {again}"
            f"to step {total_steps} under the new schedule; its model of step {finished} moves to "
            f"{output / f'final-step-{finished}'} when the new one is exported")


def check_scored_for_the_model(config: TrainConfig, tokenizer, index: ShardIndex, data: str) -> None:
    """Token ids mean something only under the tokenizer that made them; without --ref-model, the shards'
    reference log-probs must be the policy's own."""
    if index.tokenizer_hash != tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"the shards in {data} were scored with another tokenizer or chat template than {config.model}'s; "
            "score the data with this model (treg-score --model ...) or train the model the data was scored for"
        )
    scorer, scored_for = index.provenance.scorer_model, index.provenance.model
    if config.ref_model is None and scorer != scored_for:
        raise UserError(f"the reference log-probs in {data} come from the --scorer-model {scorer}, not from "
                        f"{scored_for}; train with --ref-model {scored_for} to compute them online")
    if config.ref_model is None and model_identity(scored_for) != model_identity(config.model) and main_process():
        print(f"treg-train: warning: the shards in {data} were scored with {scored_for}, not with --model "
              f"{config.model} (same tokenizer): their reference log-probs are the other model's, so the policy "
              "starts away from its reference and the first loss is not ln 2; score the data with --model, or pass "
              "--ref-model", file=sys.stderr)


def main_process() -> bool:
    """Whether this process says what all of them would (warnings are printed once)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def same_files(a: list[Path], b: list[Path]) -> bool:
    return [f.resolve() for f in a] == [f.resolve() for f in b]


def eval_index(config: TrainConfig, tokenizer, training: ShardIndex) -> ShardIndex | None:
    """The held-out pairs: --eval-data's shards, checked as the training data is, or the pairs --eval-fraction
    holds out of --data; None without either."""
    if config.eval_data:
        index = ShardIndex(config.eval_data, reading(config), flag="--eval-data")
        check_scored_for_the_model(config, tokenizer, index, config.eval_data)
        if same_files(index.files, training.files) and main_process():
            print("treg-train: warning: --eval-data is --data's own shards: the evaluation measures pairs the run "
                  "trains on; give held-out pairs, or --eval-fraction", file=sys.stderr)
    elif config.eval_fraction:
        index = ShardIndex(config.data, reading(config), holdout=config.eval_fraction, held_out=True)
        if index.num_pairs == 0:
            raise UserError(f"--eval-fraction {config.eval_fraction} holds out none of the "
                            f"{index.total_rows} pairs in {config.data}; raise it")
    else:
        return None
    index.check_every_group()  # a bad held-out value found after the last step would lose the run
    return index


def warn_on_precision_mismatch(scored: str, computed: str, data: str) -> None:
    """Reference log-probs from the shards and the policy's own should come from the same precision."""
    if scored == computed:
        return
    if scored in DTYPES:
        what, advice = f"in {scored}", f"treg-score --dtype {computed}, or train with --dtype {scored}"
    else:  # shards from before the dtype was resolved: vLLM's 'auto' ran fp32 checkpoints in bf16
        what, advice = "in an unrecorded precision ('auto')", f"treg-score --dtype {computed}"
    print(f"treg-train: warning: the reference log-probs in {data} were scored {what} but this run computes "
          f"in {computed}; rescore with {advice}", file=sys.stderr)


def count_steps(config: TrainConfig, index: ShardIndex) -> int:
    """--max-steps, or the full global batches in --num-train-epochs epochs: the epochs follow one another in one
    stream (readers.TrainingStream), so only the last epoch's tail can be left out."""
    if index.num_pairs < config.global_batch_size:
        held = (f" (--eval-fraction {config.eval_fraction} holds out {index.total_rows - index.num_pairs} of the "
                f"{index.total_rows}; lower it)" if config.eval_fraction else "")
        raise UserError(f"{index.num_pairs} training pairs give no step of --global-batch-size "
                        f"{config.global_batch_size}{held}")
    return config.max_steps or index.num_pairs * config.num_train_epochs // config.global_batch_size


def leftover_note(config: TrainConfig, index: ShardIndex) -> str | None:
    """What a --global-batch-size that does not divide the pairs does to the epochs, said at the start."""
    leftover = index.num_pairs % config.global_batch_size
    if not leftover:
        return None
    untrained = index.num_pairs * config.num_train_epochs % config.global_batch_size
    return (f"{index.num_pairs} pairs are not a whole number of global batches of {config.global_batch_size}: the "
            f"{leftover} left over at the end of an epoch open the next epoch's first batch"
            + (f"; the last {untrained} pairs of epoch {config.num_train_epochs} are not trained"
               if untrained and not config.max_steps else ""))
