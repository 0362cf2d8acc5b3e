"""`treg-score`: score a preference dataset into Parquet shards of token-level rewards."""

from __future__ import annotations

from dataclasses import fields
from typing import Optional

from treg_data.command_line import CONTEXT, GroupedTyperCommand, option, run_cli, typer_app
from treg_data.errors import UserError
from treg_data.pairs import Columns
from treg_data.precision import DTYPE_CHOICES

app = typer_app()
INPUT, MODEL, SCORING, OUTPUT, DISTRIBUTED = "Input", "Model", "Scoring", "Output", "Distributed"


@app.command(cls=GroupedTyperCommand, context_settings=CONTEXT)
def score(
    # input
    dataset: str = option(..., INPUT, "Hub dataset id, or a local .json/.jsonl/.parquet file or folder."),
    split: str = option("train", INPUT, "Dataset split."),
    dataset_config: Optional[str] = option(None, INPUT, "Hub dataset configuration name."),
    prompt_column: str = option(
        "prompt", INPUT, "Prompt column (string or messages); if absent, the turns before chosen's answer."),
    chosen_column: str = option("chosen", INPUT, "Chosen response column (string or messages)."),
    rejected_column: str = option("rejected", INPUT, "Rejected response column (string or messages)."),
    id_column: str = option("id", INPUT, "Id column; rows without one get a content hash."),
    strict: bool = option(False, INPUT, "Fail on the first malformed row instead of skipping it."),
    # model
    model: str = option(
        ..., MODEL, "Policy / reference model: Hub id or local folder. Its chat template renders the prompts."),
    scorer_model: Optional[str] = option(
        None, MODEL, "Model that computes the token rewards (default: --model). Needs the same vocabulary."),
    dpo_model: Optional[str] = option(
        None, MODEL, "A DPO-trained model (same vocabulary): also write *_dpo_rewards, sigmoid(its token log-prob - "
        "*_ref_logps) - 0.5. It runs in a second engine; with vLLM each engine gets half the GPU memory "
        "fraction."),
    model_revision: Optional[str] = option(None, MODEL, "Revision of --model on the Hub (branch, tag or commit)."),
    chat_template: Optional[str] = option(None, MODEL, "Jinja chat template file, for tokenizers without one."),
    dtype: str = option("auto", MODEL, "auto (the checkpoint's own, as transformers reads it), bfloat16, float16 "
                        "or float32."),
    # scoring
    backend: str = option("vllm", SCORING, "'vllm' (default) or 'hf' (plain transformers reference scorer)."),
    revision_prompts: Optional[str] = option(
        None, SCORING, "YAML/JSON file with the 'better' and 'worse' revision prompts, using {prompt} and {response}."),
    max_length: int = option(2048, SCORING, "Max tokens of prompt + response; longer pairs are skipped."),
    max_prompt_length: int = option(1800, SCORING, "Max prompt tokens; longer pairs are skipped."),
    max_model_len: Optional[int] = option(
        None, SCORING, "Max tokens of a revision sequence (default: 2 x max-length + revision prompt, capped at the "
        "model's context)."),
    batch_size: int = option(256, SCORING, "Pairs per scorer call (6 sequences each)."),
    seed: int = option(0, SCORING, "Engine seed."),
    gpu_memory_utilization: float = option(
        0.9, SCORING, "vLLM GPU memory fraction (with --dpo-model: shared, half for each of the two engines)."),
    enforce_eager: bool = option(False, SCORING, "vLLM: skip graph compilation (faster start, slower steps)."),
    # output
    output: str = option(..., OUTPUT, "Folder for the shards and manifest.json."),
    shard_size: int = option(10_000, OUTPUT, "Rows per Parquet shard."),
    overwrite: bool = option(False, OUTPUT, "Replace data in --output that was scored with other settings."),
    push_to_hub: Optional[str] = option(None, OUTPUT, "Upload the finished dataset to this Hub repository (ORG/NAME)."),
    hub_private: bool = option(False, OUTPUT, "With --push-to-hub: create the repository as private."),
    # distributed
    tensor_parallel_size: int = option(1, DISTRIBUTED, "vLLM tensor parallel size."),
    data_parallel_size: int = option(
        1, DISTRIBUTED, "Scoring workers on this node, one engine each on its own GPU(s) or CPU cores; one output "
        "folder."),
    num_workers: int = option(1, DISTRIBUTED, "Split the input into this many contiguous parts..."),
    worker_index: int = option(0, DISTRIBUTED, "...and score this one (0-based)."),
) -> None:
    """Score every response token of a preference dataset with the contrastive reward of T-REG."""
    from treg_data import pipeline

    settings = dict(locals())  # every option by name: ScoreConfig takes its fields from them

    if dtype not in DTYPE_CHOICES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if backend not in ("vllm", "hf"):
        raise UserError(f"--backend must be 'vllm' or 'hf', got {backend!r}")
    for name, value in (("max-length", max_length), ("max-prompt-length", max_prompt_length),
                        ("batch-size", batch_size), ("shard-size", shard_size), ("num-workers", num_workers),
                        ("data-parallel-size", data_parallel_size), ("tensor-parallel-size", tensor_parallel_size)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    columns = Columns(**{name: settings[f"{name}_column"] for name in ("prompt", "chosen", "rejected", "id")})
    names = [field.name for field in fields(pipeline.ScoreConfig) if field.name != "columns"]
    config = pipeline.ScoreConfig(columns=columns, **{name: settings[name] for name in names})
    if data_parallel_size > 1:
        from treg_data.data_parallel import run_data_parallel

        summary = run_data_parallel(config, data_parallel_size)
    else:
        summary = pipeline.run(config)
    print(summary.text())
    if push_to_hub:
        if summary.manifest is None:
            print(f"not pushing yet: the last worker to finish pushes {output} to {push_to_hub}")
            return
        from treg_data.hub import push_to_hub as push

        print(f"uploaded to {push(output, push_to_hub, private=hub_private)}")


def main() -> None:
    run_cli(app, "treg-score", "interrupted; complete shards are kept and a rerun continues after them")


if __name__ == "__main__":
    main()
