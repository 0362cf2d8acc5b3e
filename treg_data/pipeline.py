"""treg-score's pipeline: read rows -> validate and encode -> score in chunks -> rewards -> shards."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from treg_data import __version__
from treg_data.encoding import CONTEXTS, EncodedPair, LengthLimits, PairEncoder, revision_overhead, tokenizer_fingerprint
from treg_data.errors import BadRow, UserError, first_line
from treg_data.inputs import InvalidRow, open_source, worker_range
from treg_data.pairs import Columns, parse_pair, row_id
from treg_data.precision import resolve_dtype
from treg_data.revision_prompts import load_revision_prompts
from treg_data.rewards import REWARD_TRANSFORM, contrastive_rewards
from treg_data.scorers import EngineOptions, Scorer, build_scorer
from treg_data.schema import SIDES
from treg_data.shards import Progress, ShardStore, merge_manifests

SHOWN_SKIPS = 5


@dataclass(frozen=True)
class ScoreConfig:
    model: str
    dataset: str
    output: str
    split: str = "train"
    dataset_config: str | None = None
    columns: Columns = Columns()
    scorer_model: str | None = None
    revision: str | None = None
    backend: str = "vllm"
    revision_template: str | None = None
    chat_template: str | None = None
    max_length: int = 2048
    max_prompt_length: int = 1800
    max_model_len: int | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    batch_size: int = 256
    shard_size: int = 10_000
    num_workers: int = 1
    worker_index: int = 0
    strict: bool = False
    overwrite: bool = False
    seed: int = 0


@dataclass
class Summary:
    output: Path
    pairs_read: int
    pairs_scored: int
    skipped_by_reason: dict[str, int]
    tokens: int
    seconds: float
    score_seconds: float  # time inside the scorer, engine start excluded
    scoring_path: str
    manifest: Path | None
    pairs_scored_now: int = 0

    def text(self) -> str:
        skipped = sum(self.skipped_by_reason.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped_by_reason.items())) or "none"
        rate = self.tokens / self.score_seconds if self.score_seconds else 0.0
        pairs_rate = (self.pairs_scored_now / self.score_seconds) if self.score_seconds else 0.0
        lines = [
            f"treg-score finished in {self.seconds:.1f}s ({self.scoring_path})",
            f"  pairs read     {self.pairs_read}",
            f"  pairs scored   {self.pairs_scored}",
            f"  pairs skipped  {skipped} ({reasons})",
            f"  tokens scored  {self.tokens} this run: {rate:,.0f} tokens/s, {pairs_rate:,.1f} pairs/s while scoring",
            f"  output         {self.output}"
            + (f" (manifest: {self.manifest.name})" if self.manifest else " (waiting for other workers)"),
        ]
        return "\n".join(lines)


def run(config: ScoreConfig) -> Summary:
    started = time.perf_counter()
    tokenizer = load_tokenizer(config.model, config.revision, config.chat_template)
    if config.scorer_model and config.scorer_model != config.model:
        check_same_vocabulary(tokenizer, load_tokenizer(config.scorer_model, None, None), config.scorer_model)
    revision_prompts = load_revision_prompts(config.revision_template)
    model_config = load_model_config(config.scorer_model or config.model, config.revision)
    dtype = resolve_dtype(config.dtype, model_config)
    context = model_context(model_config)
    if config.max_model_len and context and config.max_model_len > context:
        raise UserError(f"--max-model-len {config.max_model_len} is beyond the model's context of {context} tokens")
    max_model_len = config.max_model_len or default_max_model_len(context, config.max_length,
                                                                  revision_overhead(tokenizer, revision_prompts))
    encoder = PairEncoder(tokenizer, revision_prompts, LengthLimits(config.max_length, config.max_prompt_length, max_model_len))

    source = open_source(config.dataset, config.split, config.dataset_config)
    start, stop = worker_range(source.num_rows, config.num_workers, config.worker_index)
    provenance = {
        "model": config.model,
        "model_revision": config.revision,
        "scorer_model": config.scorer_model or config.model,
        "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "dataset": str(Path(config.dataset).resolve()) if Path(config.dataset).exists() else config.dataset,
        "dataset_config": config.dataset_config,
        "input_fingerprint": source.fingerprint,
        "split": config.split,
        "columns": vars(config.columns),
        "revision_prompts": revision_prompts.as_dict(),
        "reward_transform": REWARD_TRANSFORM,
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "max_model_len": max_model_len,
        "backend": config.backend,
        "dtype": dtype,
        "num_workers": config.num_workers,
        "shard_size": config.shard_size,
        "treg_version": __version__,
    }
    store = ShardStore(config.output, config.split, config.worker_index, config.num_workers, provenance)
    progress = store.resume(start, config.overwrite)
    options = EngineOptions(
        model=config.scorer_model or config.model, revision=config.revision, dtype=dtype,
        max_model_len=max_model_len, tensor_parallel_size=config.tensor_parallel_size,
        gpu_memory_utilization=config.gpu_memory_utilization, enforce_eager=config.enforce_eager, seed=config.seed,
    )
    writer = _ChunkedScoring(config, encoder, store, progress, options)
    tokens_before, rows_before = progress.tokens, progress.rows
    if progress.finished:
        print(f"{config.output}: this worker's part is already scored; nothing to do", file=sys.stderr)
        manifest = merge_manifests(store.root, config.num_workers)
    else:
        if progress.next_input > start:
            print(f"resuming after {progress.next_shard} complete shard(s), at input row {progress.next_input}", file=sys.stderr)
        # Re-read from the start of the chunk the last run was in, so every chunk holds the same
        # pairs as in an uninterrupted run and batch-dependent rounding cannot differ.
        chunk_start = progress.next_input - (progress.next_input - start) % config.batch_size
        try:
            writer.run(source.rows(chunk_start, stop), total=stop - chunk_start)
        finally:
            if writer.scorer is not None:
                writer.scorer.close()
        manifest = store.finish(progress, start, stop, {"scoring_path": writer.scoring_path})
    return Summary(
        output=Path(config.output), pairs_read=stop - start, pairs_scored=progress.rows,
        skipped_by_reason=progress.skip_counts(), tokens=progress.tokens - tokens_before,
        seconds=time.perf_counter() - started, score_seconds=writer.score_seconds,
        scoring_path=writer.scoring_path, manifest=manifest, pairs_scored_now=progress.rows - rows_before,
    )


@dataclass
class _Done:
    """A processed input row waiting for its shard: a scored row or a skip report."""

    index: int
    row: dict | None = None
    skip: dict | None = None
    tokens: int = 0


class _ChunkedScoring:
    """Scores `batch_size` pairs per engine call and cuts shards of exactly `shard_size` rows."""

    def __init__(self, config: ScoreConfig, encoder: PairEncoder, store: ShardStore, progress: Progress, options: EngineOptions):
        self.config, self.encoder, self.store, self.progress, self.options = config, encoder, store, progress, options
        self.scorer: Scorer | None = None  # started on the first pair to score, after input checks
        self.pending: list[_Done] = []
        self.shown_skips = 0
        self.score_seconds = 0.0

    @property
    def scoring_path(self) -> str:
        return f"{self.config.backend}:{self.scorer.path}" if self.scorer else f"{self.config.backend}: nothing to score"

    def run(self, rows, total: int) -> None:
        bar = tqdm(total=total, unit="pair", desc="scoring", dynamic_ncols=True, file=sys.stderr)
        tokens = 0
        chunk: list[tuple[int, object]] = []
        for item in rows:
            chunk.append(item)
            if len(chunk) == self.config.batch_size:
                tokens += self._process(chunk)
                bar.update(len(chunk))
                bar.set_postfix_str(f"{tokens / max(self.score_seconds, 1e-9):,.0f} tok/s")
                chunk = []
        if chunk:
            self._process(chunk)
            bar.update(len(chunk))
        self._flush(final=True)
        bar.close()

    def _process(self, chunk) -> int:
        """Encode, score and queue one chunk; rows before `next_input` are already in shards and
        are only re-scored to keep the chunk as in an uninterrupted run."""
        encoded: list[tuple[int, EncodedPair]] = []
        for index, row in chunk:
            try:
                if isinstance(row, InvalidRow):
                    raise BadRow(row.reason, row.detail)
                encoded.append((index, self.encoder.encode(parse_pair(row, self.config.columns))))
            except BadRow as bad:
                if index >= self.progress.next_input:
                    self._skip(index, row, bad)
        if encoded:
            if self.scorer is None:
                self.scorer = build_scorer(self.config.backend, self.options)
                tqdm.write(f"scoring path: {self.scoring_path}", file=sys.stderr)
            started = time.perf_counter()
            rows = score_pairs(self.scorer, [pair for _, pair in encoded])
            self.score_seconds += time.perf_counter() - started
            self.pending += [_Done(index, row=row, tokens=pair.num_tokens)
                             for (index, pair), row in zip(encoded, rows) if index >= self.progress.next_input]
        self.pending.sort(key=lambda done: done.index)
        self._flush(final=False)
        return sum(pair.num_tokens for _, pair in encoded)

    def _skip(self, index: int, row, bad: BadRow) -> None:
        rid = row.id if isinstance(row, InvalidRow) else row_id(row, self.config.columns)
        if self.config.strict:
            raise UserError(f"row {rid} (input row {index}): {bad.reason}: {bad.detail} (--strict)")
        if self.shown_skips < SHOWN_SKIPS:
            self.shown_skips += 1
            tqdm.write(f"skipped {rid}: {bad.reason} ({bad.detail})", file=sys.stderr)
        self.pending.append(_Done(index, skip={"id": rid, "reason": bad.reason, "detail": bad.detail}))

    def _flush(self, final: bool) -> None:
        """Write every full shard in `pending`; at the end, the remainder too. A shard covers the
        input rows from the previous shard's end to its last row, skips included."""
        while True:
            scored_positions = [i for i, done in enumerate(self.pending) if done.row is not None]
            if len(scored_positions) >= self.config.shard_size:
                cut = scored_positions[self.config.shard_size - 1] + 1
            elif final and scored_positions:
                cut = len(self.pending)
            else:
                break
            taken, self.pending = self.pending[:cut], self.pending[cut:]
            rows = [done.row for done in taken if done.row is not None]
            skipped = [done.skip for done in taken if done.skip is not None]
            tokens, end = sum(done.tokens for done in taken), taken[-1].index + 1
            self.store.write_shard(self.progress.next_shard, rows, self.progress.next_input, end, tokens, skipped)
            self.progress.next_shard += 1
            self.progress.next_input = end
            self.progress.rows += len(rows)
            self.progress.tokens += tokens
            self.progress.skipped += skipped
        if final:  # skips after the last row belong to no shard; the worker manifest keeps them
            self.progress.skipped += [done.skip for done in self.pending]
            self.pending = []


def score_pairs(scorer: Scorer, pairs: list[EncodedPair]) -> list[dict]:
    """One scorer call for all six sequences of every pair, then one shard row per pair."""
    requests = [(resp.prefixes[ctx], resp.ids) for p in pairs for resp in (p.chosen, p.rejected) for ctx in CONTEXTS]
    logps = iter(scorer.score(requests))
    rows = []
    for p in pairs:
        row = {"id": p.pair.id, "prompt": p.pair.prompt, "chosen": [p.pair.chosen], "rejected": [p.pair.rejected],
               "prompt_ids": p.prompt_ids}
        for side, resp in zip(SIDES, (p.chosen, p.rejected)):
            by_context = {ctx: next(logps) for ctx in CONTEXTS}
            row[f"{side}_ids"] = resp.ids
            for ctx in CONTEXTS:
                row[f"{side}_{ctx}_logps"] = by_context[ctx]
            row[f"{side}_rewards"] = contrastive_rewards(by_context["better"], by_context["worse"])
        rows.append(row)
    return rows


def load_tokenizer(name: str, revision: str | None, chat_template: str | None):
    from transformers import AutoTokenizer

    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise UserError(f"model folder {name} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except Exception as err:  # OSError, ValueError, HTTP errors...: one line for the user
        raise UserError(f"cannot load the tokenizer of {name!r}: {first_line(err)}") from None
    if chat_template:
        try:
            tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot read --chat-template {chat_template}: {err}") from None
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer of {name!r} has no chat template; pass one with --chat-template FILE")
    return tokenizer


def check_same_vocabulary(policy_tokenizer, scorer_tokenizer, scorer_name: str) -> None:
    if policy_tokenizer.get_vocab() != scorer_tokenizer.get_vocab():
        raise UserError(
            f"--scorer-model {scorer_name} has a different vocabulary from --model; token rewards need "
            "identical token ids, so use a scorer from the same model family and tokenizer"
        )


def load_model_config(name: str, revision: str | None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=revision)
    except Exception as err:
        raise UserError(f"cannot load the model config of {name!r}: {first_line(err)}") from None


def model_context(model_config) -> int | None:
    return getattr(model_config.get_text_config(), "max_position_embeddings", None) or getattr(model_config, "n_positions", None)


def default_max_model_len(context: int | None, max_length: int, revision_prompt_tokens: int) -> int:
    """Room for a revision sequence of a max-length pair: it quotes the response and then holds it,
    so about twice max_length plus the revision prompt; capped at the model's context."""
    wanted = 2 * max_length + revision_prompt_tokens
    return min(wanted, context) if context else wanted
