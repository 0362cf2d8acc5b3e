"""treg-score's settings: every field is a flag (treg_core.command_line), and a YAML recipe with the same
names is `--config`. Fields marked `engine` are vLLM engine arguments: they reach `vllm.LLM` under their
own name, so a new engine option is one field here."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from treg_core.command_line import REQUIRED, above, at_least, check_ranges, optional, require, setting, share, within
from treg_core.errors import UserError
from treg_core.precision import DTYPE_CHOICES
from treg_data.pairs import Columns
from treg_data.revision_prompts import AUTO
from treg_data.scorers import BACKENDS, EngineOptions

TOKEN_REWARDS = ("contrastive", "edit-diff")
EXECUTORS = ("local", "ray")
MAX_REF_TOPK = 100  # --ref-topk: K ids and log-probs per response token, 8 bytes each before compression
INPUT, MODEL, SCORING, OUTPUT, DISTRIBUTED = "Input", "Model", "Scoring", "Output", "Distributed"


def engine_setting(default, group: str, help: str):
    """A setting passed to vllm.LLM as it is."""
    return setting(default, group, help, engine=True)


@dataclass(frozen=True)
class ScoreConfig:
    # input
    dataset: str = setting(REQUIRED, INPUT, "Hub dataset id, or a local .json/.jsonl/.parquet file or folder.")
    split: str = setting("train", INPUT, "Dataset split.")
    dataset_config: str | None = setting(None, INPUT, "Hub dataset configuration name.")
    prompt_column: str = setting(
        "prompt", INPUT, "Prompt column (string or messages); if absent, the turns before chosen's answer.")
    chosen_column: str = setting("chosen", INPUT, "Chosen response column (string or messages).")
    rejected_column: str = setting("rejected", INPUT, "Rejected response column (string or messages).")
    id_column: str = setting("id", INPUT, "Id column; rows without one get a content hash.")
    strict: bool = setting(False, INPUT, "Fail on the first malformed row instead of skipping it.")
    # model
    model: str = setting(
        REQUIRED, MODEL, "Policy / reference model: Hub id or local folder. Its chat template renders the prompts.")
    scorer_model: str | None = setting(
        None, MODEL, "Model that computes the token rewards (default: --model). Needs the same vocabulary.")
    dpo_model: str | None = setting(
        None, MODEL, "A DPO-trained model (same vocabulary): also write its token log-probs *_dpo_logps and "
        "*_dpo_rewards, sigmoid(*_dpo_logps - *_ref_logps) - 0.5. It runs in an engine of its own; with vLLM the "
        "engines share the GPU memory fraction equally.")
    reverse_dpo_model: str | None = setting(
        None, MODEL, "With --dpo-model: a model trained with chosen and rejected swapped (treg-train --swap-pairs); "
        "also write its token log-probs *_rev_dpo_logps, for TIS-DPO's weights.")
    model_revision: str | None = setting(None, MODEL, "Revision of --model on the Hub (branch, tag or commit).")
    chat_template: str | None = setting(None, MODEL, "Jinja chat template file, for tokenizers without one.")
    dtype: str = setting(
        "auto", MODEL, "auto (the checkpoint's own, as transformers reads it), bfloat16, float16 or float32.")
    # scoring
    backend: str = setting("vllm", SCORING, "'vllm' (default) or 'hf' (plain transformers reference scorer).")
    token_rewards: str = setting(
        "contrastive", SCORING, "contrastive: r̂ from the two revision prompts (T-REG); edit-diff: +0.5 / -0.5 on the "
        "tokens where chosen and rejected differ, for near-edit pairs (no revision scoring).")
    revision_prompts: str | None = setting(
        None, SCORING, "A shipped prompt set (revision, the default; truthful; instruct; examples), 'auto' (the set "
        "whose reward check is best on this model), or a YAML/JSON file: 'better', 'worse', optional 'role' "
        "(user/system).")
    reward_check: bool = setting(
        True, SCORING, "At the start, measure how well the token rewards locate the errors of treg's minimal-edit "
        "pairs (treg-probe), print it and record it in the manifest.")
    ref_topk: int = setting(
        0, SCORING, "Also store each response token's K most likely reference tokens and their log-probs "
        "(*_ref_topk_ids, *_ref_topk_logps), for TDPO's KL from the shards (treg-train --loss tdpo1/tdpo2 without "
        "--ref-model); 0: none.")
    ce_scores: bool = setting(
        False, SCORING, "Also store cDPO's contrastive estimate log p_ce(y_t) of each response token (*_ce_logps) "
        "from the positive (--dpo-model) and negative (--reverse-dpo-model) models, for treg-train --loss cdpo. "
        "Computed with transformers, both models in memory, whatever --backend is: vLLM's prompt log-probs give no "
        "whole distributions.")
    max_edit_tokens: int = setting(
        16, SCORING, "With --token-rewards edit-diff: the most tokens an edited span may have; other pairs are skipped "
        "as not_near_edit.")
    max_length: int = setting(2048, SCORING, "Max tokens of prompt + response; longer pairs are skipped.")
    max_prompt_length: int = setting(1800, SCORING, "Max prompt tokens; longer pairs are skipped.")
    max_model_len: int | None = setting(
        None, SCORING, "Max tokens of a revision sequence (default: 2 x max-length + revision prompt, capped at the "
        "model's context).")
    batch_size: int = setting(256, SCORING, "Pairs per scorer call (6 sequences each).")
    seed: int = engine_setting(0, SCORING, "Engine seed.")
    gpu_memory_utilization: float = engine_setting(
        0.9, SCORING, "vLLM GPU memory fraction (with --dpo-model: shared, half for each of the two engines).")
    enforce_eager: bool = engine_setting(False, SCORING, "vLLM: skip graph compilation (faster start, slower steps).")
    # output
    output: str = setting(REQUIRED, OUTPUT, "Folder for the shards and manifest.json.")
    shard_size: int = setting(10_000, OUTPUT, "Rows per Parquet shard.")
    overwrite: bool = setting(False, OUTPUT, "Replace data in --output that was scored with other settings.")
    push_to_hub: str | None = setting(
        None, OUTPUT, "Upload the finished dataset to this Hub repository (ORG/NAME).")
    hub_private: bool = setting(False, OUTPUT, "With --push-to-hub: create the repository as private.")
    status: str | None = setting(
        None, OUTPUT, "Report how far this treg-score output folder is (workers finished, in progress, not started; "
        "the command that finishes it) and exit: 0 finished, 3 unfinished, 2 not a treg-score folder. Nothing else "
        "is needed, and nothing is scored, written or locked.")
    # distributed
    tensor_parallel_size: int = engine_setting(1, DISTRIBUTED, "vLLM tensor parallel size.")
    data_parallel_size: int = setting(
        1, DISTRIBUTED, "Scoring workers on this node, one engine each on its own GPU(s) or CPU cores; one output "
        "folder.")
    num_workers: int = setting(1, DISTRIBUTED, "Split the input into this many contiguous parts...")
    worker_index: int = setting(0, DISTRIBUTED, "...and score this one (0-based).")
    executor: str = setting(
        "local", DISTRIBUTED, "local: score in this process (or --data-parallel-size processes); ray: hand the "
        "--num-workers parts to --num-actors scoring actors on a Ray cluster (pip install 'treg[ray]').")
    ray_address: str | None = setting(
        None, DISTRIBUTED, "With --executor ray: the cluster to join, as ray.init takes it ('auto', "
        "'ray://host:10001'); default: start or join a local one.")
    num_actors: int = setting(
        1, DISTRIBUTED, "With --executor ray: scoring actors, one engine each (--tensor-parallel-size GPUs per actor "
        "on GPU machines, else a share of the CPU cores). The input is cut into --num-workers parts (default: one per "
        "actor; a rerun must give the same): more parts than actors balance the load, as an actor that finishes "
        "early takes the next part.")

    @property
    def columns(self) -> Columns:
        return Columns(self.prompt_column, self.chosen_column, self.rejected_column, self.id_column)

    @property
    def other_models(self) -> dict[str, str]:
        """The models scored after the policy prompt besides the reference, by the column name they write
        (`{side}_{name}_logps`)."""
        return {name: model for name, model in (("dpo", self.dpo_model), ("rev_dpo", self.reverse_dpo_model))
                if model}

    def engine_options(self, dtype: str, max_model_len: int) -> EngineOptions:
        """The engine's settings, with the dtype and context length resolved for this model. With
        --dpo-model the engines share the GPU, each getting an equal part of --gpu-memory-utilization."""
        engine = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("engine")}
        engine["gpu_memory_utilization"] /= 1 + len(self.other_models)
        return EngineOptions(model=self.scorer_model or self.model, revision=self.model_revision, dtype=dtype,
                             max_model_len=max_model_len, engine=engine, topk=self.ref_topk)

    def other_engine_options(self, dtype: str, max_model_len: int) -> dict[str, EngineOptions]:
        """The engines of `other_models`: the main one's settings (one dtype for both sides of every
        log-ratio), another model."""
        main = self.engine_options(dtype, max_model_len)
        return {name: replace(main, model=model, revision=None, topk=0) for name, model in self.other_models.items()}


# Every numeric setting's meaningful range, checked before any work.
RANGES = {
    **{name: (at_least(1), "at least 1") for name in ("max_length", "max_prompt_length", "batch_size", "shard_size",
                                                      "num_workers", "data_parallel_size", "tensor_parallel_size",
                                                      "max_edit_tokens", "num_actors")},
    "max_model_len": (optional(above(0)), "a positive number of tokens (leave it out for the default)"),
    "worker_index": (at_least(0), "an integer >= 0"),
    "seed": (at_least(0), "an integer >= 0"),
    "gpu_memory_utilization": (share, "in (0, 1]: the share of the GPU's memory vLLM may take"),
    "ref_topk": (within(0, MAX_REF_TOPK + 1), f"an integer from 0 (none) to {MAX_REF_TOPK}"),
}


def validate(config: ScoreConfig) -> ScoreConfig:
    """Settings that cannot work, refused before anything is read or started; each message says the fix."""
    require(config, () if config.status else ("dataset", "model", "output"))  # --status reads a folder, no more
    if config.dtype not in DTYPE_CHOICES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {config.dtype!r}")
    if config.backend not in BACKENDS:
        raise UserError(f"--backend must be 'vllm' or 'hf', got {config.backend!r}")
    check_ranges(config, RANGES)
    if config.worker_index >= config.num_workers:
        raise UserError(f"--worker-index {config.worker_index} must be below --num-workers {config.num_workers} "
                        "(workers count from 0)")
    _check_executor(config)
    if config.dpo_model and config.scorer_model and config.scorer_model != config.model:
        raise UserError("--dpo-model needs the reference log-probs of --model itself, but --scorer-model computes "
                        "them; score the DPO rewards in a run without --scorer-model")
    if config.token_rewards not in TOKEN_REWARDS:
        raise UserError(f"--token-rewards must be one of {', '.join(TOKEN_REWARDS)}, got {config.token_rewards!r}")
    if config.token_rewards == "edit-diff" and config.revision_prompts:
        raise UserError("--token-rewards edit-diff scores no revision prompt: leave out --revision-prompts")
    if config.revision_prompts == AUTO and not config.reward_check:
        raise UserError("--revision-prompts auto chooses by the reward check: leave out --no-reward-check, or name "
                        "a set")
    if config.ce_scores and not (config.dpo_model and config.reverse_dpo_model):
        raise UserError("--ce-scores contrasts a positive and a negative model: give both, --dpo-model (positive) "
                        "and --reverse-dpo-model (negative)")
    if config.reverse_dpo_model and not config.dpo_model:
        raise UserError("--reverse-dpo-model is one half of a contrastive pair: give the DPO model too, "
                        "--dpo-model")
    return config


def _check_executor(config: ScoreConfig) -> None:
    """Ray hands out the parts itself; its settings mean nothing to a local run."""
    if config.executor not in EXECUTORS:
        raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}, got {config.executor!r}")
    if config.executor == "local":
        for flag, given in (("--num-actors", config.num_actors != 1), ("--ray-address", config.ray_address)):
            if given:
                raise UserError(f"{flag} is a setting of --executor ray: add --executor ray, or leave it out")
        return
    if config.data_parallel_size > 1:
        raise UserError("--executor ray runs its own scoring actors: give --num-actors "
                        f"{config.data_parallel_size} instead of --data-parallel-size {config.data_parallel_size}")
    if config.worker_index:
        raise UserError("--executor ray scores every part of the input itself: leave out --worker-index (give "
                        "--num-workers alone to choose how many parts)")
