"""`treg-score`: score a preference dataset into Parquet shards of token-level rewards."""

from __future__ import annotations

from typing import Optional

import typer

from treg_data.errors import UserError, run_cli
from treg_data.pairs import Columns
from treg_data.precision import DTYPE_CHOICES

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def score(
    model: str = typer.Option(..., help="Policy / reference model: Hub id or local folder. Its chat template renders the prompts."),
    dataset: str = typer.Option(..., help="Hub dataset id, or a local .json/.jsonl/.parquet file or folder."),
    output: str = typer.Option(..., help="Folder for the shards and manifest.json."),
    split: str = typer.Option("train", help="Dataset split."),
    dataset_config: Optional[str] = typer.Option(None, help="Hub dataset configuration name."),
    prompt_column: str = typer.Option("prompt", help="Prompt column (string or messages); if absent, the turns before chosen's answer."),
    chosen_column: str = typer.Option("chosen", help="Chosen response column (string or messages)."),
    rejected_column: str = typer.Option("rejected", help="Rejected response column (string or messages)."),
    id_column: str = typer.Option("id", help="Id column; rows without one get a content hash."),
    scorer_model: Optional[str] = typer.Option(None, help="Model that computes the token rewards (default: --model). Needs the same vocabulary."),
    revision: Optional[str] = typer.Option(None, help="Model revision (branch, tag or commit)."),
    backend: str = typer.Option("vllm", help="'vllm' (default) or 'hf' (plain transformers reference scorer)."),
    revision_template: Optional[str] = typer.Option(None, help="YAML/JSON file with 'better' and 'worse' revision prompts using {prompt} and {response}."),
    chat_template: Optional[str] = typer.Option(None, help="Jinja chat template file, for tokenizers without one."),
    max_length: int = typer.Option(2048, help="Max tokens of prompt + response; longer pairs are skipped."),
    max_prompt_length: int = typer.Option(1800, help="Max prompt tokens; longer pairs are skipped."),
    max_model_len: Optional[int] = typer.Option(None, help="Max tokens of a revision sequence (default: 2 x max-length + revision prompt, capped at the model's context)."),
    dtype: str = typer.Option("auto", help="Model dtype: auto (the checkpoint's own, as transformers reads it), bfloat16, float16, float32."),
    tensor_parallel_size: int = typer.Option(1, help="vLLM tensor parallel size."),
    data_parallel_size: int = typer.Option(1, help="Scoring workers on this node, one engine each on its own GPU(s) or CPU cores; one output folder."),
    gpu_memory_utilization: float = typer.Option(0.9, help="vLLM GPU memory fraction."),
    enforce_eager: bool = typer.Option(False, help="vLLM: skip graph compilation (faster start, slower steps)."),
    batch_size: int = typer.Option(256, help="Pairs per scorer call (6 sequences each)."),
    shard_size: int = typer.Option(10_000, help="Rows per Parquet shard."),
    num_workers: int = typer.Option(1, help="Split the input into this many contiguous parts..."),
    worker_index: int = typer.Option(0, help="...and score this one (0-based)."),
    strict: bool = typer.Option(False, help="Fail on the first malformed row instead of skipping it."),
    overwrite: bool = typer.Option(False, help="Replace data in --output that was scored with other settings."),
    seed: int = typer.Option(0, help="Engine seed."),
    push_to_hub: Optional[str] = typer.Option(None, help="Upload the finished dataset to this Hub repository (ORG/NAME)."),
    hub_private: bool = typer.Option(False, help="With --push-to-hub: create the repository as private."),
) -> None:
    """Score every response token of a preference dataset with the contrastive reward of T-REG."""
    from treg_data import pipeline

    if dtype not in DTYPE_CHOICES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if backend not in ("vllm", "hf"):
        raise UserError(f"--backend must be 'vllm' or 'hf', got {backend!r}")
    for name, value in (("max-length", max_length), ("max-prompt-length", max_prompt_length),
                        ("batch-size", batch_size), ("shard-size", shard_size), ("num-workers", num_workers),
                        ("data-parallel-size", data_parallel_size), ("tensor-parallel-size", tensor_parallel_size)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    config = pipeline.ScoreConfig(
        model=model, dataset=dataset, output=output, split=split, dataset_config=dataset_config,
        columns=Columns(prompt=prompt_column, chosen=chosen_column, rejected=rejected_column, id=id_column),
        scorer_model=scorer_model, revision=revision, backend=backend, revision_template=revision_template,
        chat_template=chat_template, max_length=max_length, max_prompt_length=max_prompt_length,
        max_model_len=max_model_len, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, batch_size=batch_size,
        shard_size=shard_size, num_workers=num_workers, worker_index=worker_index, strict=strict,
        overwrite=overwrite, seed=seed,
    )
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
