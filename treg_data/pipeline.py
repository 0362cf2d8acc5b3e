"""treg-score's pipeline, as steps: read rows (treg_data.inputs) -> parse and encode each pair
(treg_data.pairs, treg_data.encoding) -> score a chunk in one engine call (treg_data.scoring) ->
cut shards of exactly `shard_size` rows (treg_data.shards)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from treg_core import __version__
from treg_core.contract import Provenance, tokenizer_fingerprint
from treg_core.errors import BadRow, UserError
from treg_core.precision import resolve_dtype
from treg_core.sources import check_same_vocabulary, load_tokenizer
from treg_data.config import ScoreConfig, validate
from treg_data.edits import EDIT_DIFF_TRANSFORM
from treg_data.encoding import EncodedPair, PairEncoder, revision_overhead
from treg_data.inputs import InvalidRow, open_source, worker_range
from treg_data.lengths import LengthLimits, resolve_max_model_len
from treg_data.models import load_model_config, model_context
from treg_data.pairs import Columns, parse_pair, row_id
from treg_data.revision_prompts import AUTO, SHIPPED, RevisionPrompts, load_revision_prompts
from treg_data.reward_check import run_check
from treg_data.rewards import REWARD_TRANSFORM
from treg_data.row_notices import RowNotices
from treg_data.scorers import EngineOptions, Scorer, build_scorer
from treg_data.scoring import score_pairs
from treg_data.shards import ShardCutter, ShardStore, merge_manifests

__all__ = ["PartScorer", "ScoreConfig", "Summary", "run"]

SHOWN_SKIPS = 5


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
    duplicate_ids: int = 0  # rows whose id an earlier row of this run had (kept, and warned about)

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
            *([f"  duplicate ids  {self.duplicate_ids} (kept; see the warnings above)"] if self.duplicate_ids else []),
            f"  tokens scored  {self.tokens} this run: {rate:,.0f} tokens/s, {pairs_rate:,.1f} pairs/s while scoring",
            f"  output         {self.output}"
            + (f" (manifest: {self.manifest.name})" if self.manifest else " (waiting for other workers)"),
        ]
        return "\n".join(lines)


def run(config: ScoreConfig) -> Summary:
    """Score this worker's part of the input (--worker-index of --num-workers)."""
    started = time.perf_counter()
    parts = PartScorer(config)
    try:
        return parts.score(config.worker_index, started)
    finally:
        parts.close()


class PartScorer:
    """What every part of one run shares, set up once: the tokenizer (checked against the other models'), the
    prompt sets, the length limits, the input and the engines, which start on the first pair to score and then
    serve every part this process is given (one under `run`, several in a treg-score --executor ray actor)."""

    def __init__(self, config: ScoreConfig):
        self.config = config = validate(config)
        self.tokenizer = _checked_tokenizer(config)
        self.candidates = candidate_prompt_sets(config)
        model_config = load_model_config(config.scorer_model or config.model, config.model_revision)
        self.dtype = resolve_dtype(config.dtype, model_config)
        self.max_model_len = resolve_max_model_len(
            config.max_model_len, model_context(model_config), config.max_length,
            max((revision_overhead(self.tokenizer, c) for c in self.candidates), default=0))
        self.limits = LengthLimits(config.max_length, config.max_prompt_length, self.max_model_len)
        self.source = open_source(config.dataset, config.split, config.dataset_config)
        self.engine = _Engine(config.backend, config.engine_options(self.dtype, self.max_model_len),
                              config.other_engine_options(self.dtype, self.max_model_len), config.ce_scores)
        self.revision_prompts = self.candidates[0] if len(self.candidates) == 1 else None
        self.check: dict | None = None  # the reward check, measured once for every part
        self._checked = False

    def score(self, worker_index: int, started: float | None = None) -> Summary:
        """Score part `worker_index` of --num-workers into --output, continuing after its last complete shard;
        a part found finished is only merged."""
        config, started = self.config, started or time.perf_counter()
        start, stop = worker_range(self.source.num_rows, config.num_workers, worker_index)
        _check_columns(list(islice(self.source.rows(start, stop), config.batch_size)), config)
        # The prompt set is part of the provenance: under auto it is chosen before the folder is read.
        if config.revision_prompts == AUTO and not self._checked:
            self.revision_prompts, self.check = self._reward_check(None)
        store = ShardStore(config.output, config.split, worker_index, config.num_workers,
                           provenance(config, self.tokenizer, self.revision_prompts, self.source.fingerprint,
                                      self.dtype, self.max_model_len))
        progress = store.resume(start, config.overwrite)
        seconds_before = self.engine.seconds
        if progress.finished:
            print(f"{config.output}: worker {worker_index}'s part is already scored; nothing to do", file=sys.stderr)
            return self._summary(progress, start, stop, started, merge_manifests(store.root, config.num_workers),
                                 progress.tokens, progress.rows, seconds_before)
        if config.reward_check and self.revision_prompts and not self._checked:
            _, self.check = self._reward_check(self.revision_prompts)
        if progress.next_input > start:
            print(f"resuming after {progress.next_shard} complete shard(s), at input row {progress.next_input}",
                  file=sys.stderr)
        tokens_before, rows_before = progress.tokens, progress.rows
        # Re-read from the start of the chunk the last run was in, so every chunk holds the same
        # pairs as in an uninterrupted run and batch-dependent rounding cannot differ.
        chunk_start = progress.next_input - (progress.next_input - start) % config.batch_size
        encoder = PairEncoder(self.tokenizer, self.revision_prompts, self.limits,
                              config.max_edit_tokens if config.token_rewards == "edit-diff" else None)
        duplicate_ids = _score_chunks(self.source.rows(chunk_start, stop), stop - chunk_start, config, encoder,
                                      self.engine, ShardCutter(store, progress, config.shard_size))
        manifest = store.finish(progress, start, stop, self.engine.scoring_path, self.check)
        return self._summary(progress, start, stop, started, manifest, tokens_before, rows_before, seconds_before,
                             duplicate_ids)

    def _reward_check(self, chosen: RevisionPrompts | None) -> tuple[RevisionPrompts, dict | None]:
        self._checked = True
        return run_check(self.engine.main(), self.tokenizer, self.limits, chosen, self.config.seed)

    def _summary(self, progress, start: int, stop: int, started: float, manifest: Path | None, tokens_before: int,
                 rows_before: int, seconds_before: float, duplicate_ids: int = 0) -> Summary:
        """This part's summary: what this run added to the tokens, rows and scorer time it found (`*_before`)."""
        return Summary(
            output=Path(self.config.output), pairs_read=stop - start, pairs_scored=progress.rows,
            skipped_by_reason=progress.skip_counts(), tokens=progress.tokens - tokens_before,
            seconds=time.perf_counter() - started, score_seconds=self.engine.seconds - seconds_before,
            scoring_path=self.engine.scoring_path, manifest=manifest, pairs_scored_now=progress.rows - rows_before,
            duplicate_ids=duplicate_ids,
        )

    def close(self) -> None:
        self.engine.close()


def _checked_tokenizer(config: ScoreConfig):
    """--model's tokenizer, once every other model is found to share its vocabulary."""
    tokenizer = load_tokenizer(config.model, config.model_revision, config.chat_template, needs_chat_template=True)
    if config.scorer_model and config.scorer_model != config.model:
        check_same_vocabulary(tokenizer, load_tokenizer(config.scorer_model, needs_chat_template=True),
                              config.scorer_model)
    for name, model in config.other_models.items():
        flag = "--dpo-model" if name == "dpo" else "--reverse-dpo-model"
        check_same_vocabulary(tokenizer, load_tokenizer(model, chat_template=config.chat_template,
                                                        needs_chat_template=True), model, flag=flag)
    return tokenizer


def candidate_prompt_sets(config: ScoreConfig) -> list[RevisionPrompts]:
    """The prompt sets the run may score with: none under edit-diff, every shipped one under auto, else one."""
    if config.token_rewards == "edit-diff":
        return []
    if config.revision_prompts == AUTO:
        return list(SHIPPED.values())
    return [load_revision_prompts(config.revision_prompts)]


def provenance(config: ScoreConfig, tokenizer, revision_prompts: RevisionPrompts | None, input_fingerprint: str,
               dtype: str, max_model_len: int) -> Provenance:
    """Everything that decides the shards' content; a rerun with any of it different is refused."""
    return Provenance(
        model=config.model,
        model_revision=config.model_revision,
        scorer_model=config.scorer_model or config.model,
        dpo_model=config.dpo_model,
        reverse_dpo_model=config.reverse_dpo_model,
        ref_topk=config.ref_topk,
        ce_scores=config.ce_scores,
        tokenizer_hash=tokenizer_fingerprint(tokenizer),
        dataset=str(Path(config.dataset).resolve()) if Path(config.dataset).exists() else config.dataset,
        dataset_config=config.dataset_config,
        input_fingerprint=input_fingerprint,
        split=config.split,
        columns=vars(config.columns),
        token_rewards=config.token_rewards,
        revision_prompts=revision_prompts.as_dict() if revision_prompts else {},
        # Under edit-diff the near-edit rule decides which pairs are kept: a rerun with another one is refused.
        reward_transform=REWARD_TRANSFORM if revision_prompts else
        f"{EDIT_DIFF_TRANSFORM}; near edits of at most {config.max_edit_tokens} tokens",
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        max_model_len=max_model_len,
        backend=config.backend,
        dtype=dtype,
        num_workers=config.num_workers,
        shard_size=config.shard_size,
        treg_version=__version__,
    )


class _Engine:
    """The scorer (and those of the other models: --dpo-model, --reverse-dpo-model), started on the first
    pair to score (so bad input is reported before the engines' long start), and the time spent inside them. The
    main scorer's options carry --ref-topk (`topk`): its top-K tokens are scored with the rest. With `ce_scores`
    (--ce-scores) the other two models also run in transformers for their contrastive estimate: the hf back-end's
    own scorers of them, or two more loaded beside vLLM's engines."""

    def __init__(self, backend: str, options: EngineOptions, other_options: dict[str, EngineOptions],
                 ce_scores: bool = False):
        self.backend, self.options, self.other_options, self.ce_scores = backend, options, other_options, ce_scores
        self.scorer: Scorer | None = None
        self.others: dict[str, Scorer] = {}
        self.ce: Scorer | None = None
        self.seconds = 0.0

    @property
    def scoring_path(self) -> str:
        return f"{self.backend}:{self.scorer.scoring_path}" if self.scorer else f"{self.backend}: nothing to score"

    def main(self) -> Scorer:
        """The scorer of the main model, started on first use."""
        if self.scorer is None:
            self.scorer = build_scorer(self.backend, self.options)
            tqdm.write(f"scoring path: {self.scoring_path}", file=sys.stderr)
        return self.scorer

    def score(self, pairs: list[EncodedPair]) -> list[dict]:
        self.main()
        for name, options in self.other_options.items():
            if name not in self.others:
                self.others[name] = build_scorer(self.backend, options)
                tqdm.write(f"{name} model {options.model}: {self.backend}:{self.others[name].scoring_path}",
                           file=sys.stderr)
        if self.ce_scores and self.ce is None:
            from treg_data.contrastive_estimate import ContrastiveEstimate

            self.ce = ContrastiveEstimate(*(self.others[name] if self.backend == "hf" else self.other_options[name]
                                            for name in ("dpo", "rev_dpo")))
            tqdm.write(f"--ce-scores: {self.ce.scoring_path}", file=sys.stderr)
        started = time.perf_counter()
        rows = score_pairs(self.scorer, pairs, self.others, topk=self.options.topk, ce=self.ce)  # --ref-topk
        self.seconds += time.perf_counter() - started
        return rows

    def close(self) -> None:
        """Every engine is closed, even when closing one fails; the first failure is raised."""
        failure = None
        for scorer in [self.scorer, *self.others.values(), self.ce]:
            try:
                if scorer is not None:
                    scorer.close()
            except Exception as err:  # noqa: BLE001 - close the others, then raise
                failure = failure or err
        if failure is not None:
            raise failure


def _score_chunks(rows, total: int, config: ScoreConfig, encoder: PairEncoder, engine: _Engine,
                  cutter: ShardCutter) -> int:
    """`batch_size` pairs per engine call. Rows before the resume point are in shards already:
    they are scored again only so that each chunk is as in an uninterrupted run, and not kept.
    Returns how many of this run's rows repeat an earlier row's id."""
    bar = tqdm(total=total, unit="pair", desc="scoring", dynamic_ncols=True, file=sys.stderr)
    skips, notices, tokens = _SkipReport(config.strict), RowNotices(), 0
    for chunk in _chunks(rows, config.batch_size):
        encoded = []
        for index, row in chunk:
            item = _encode(row, encoder, config.columns)
            if isinstance(item, EncodedPair):
                encoded.append((index, item))
                for line in notices.check(index, item.pair) if index >= cutter.progress.next_input else ():
                    tqdm.write(line, file=sys.stderr)
            elif index >= cutter.progress.next_input:
                skips.report(index, item)
                cutter.add_skip(index, item)
        if encoded:
            for (index, pair), scored in zip(encoded, engine.score([pair for _, pair in encoded])):
                if index >= cutter.progress.next_input:
                    cutter.add_row(index, scored, pair.num_tokens)
            tokens += sum(pair.num_tokens for _, pair in encoded)
        cutter.flush()
        bar.update(len(chunk))
        bar.set_postfix_str(f"{tokens / max(engine.seconds, 1e-9):,.0f} tok/s")
    cutter.flush(final=True)
    bar.close()
    return notices.duplicate_ids


def _check_columns(chunk: list, config: ScoreConfig) -> None:
    """A column that no row of the first chunk has is a mistyped name, not a dataset of bad rows: said before any
    engine starts. (The prompt column may be absent: the prompt is then the turns before chosen's answer.)"""
    rows = [row for _, row in chunk if isinstance(row, dict)]
    keys = set().union(*rows) if rows else set()
    named = [("--chosen-column", config.chosen_column), ("--rejected-column", config.rejected_column)]
    if config.prompt_column != ScoreConfig.prompt_column:  # given explicitly: it must be there
        named.append(("--prompt-column", config.prompt_column))
    for flag, name in named:
        if rows and name not in keys:
            raise UserError(f"{flag} {name}: none of the first {len(rows)} input rows has it (they have "
                            f"{', '.join(sorted(keys))}); give the column's name")


def _chunks(rows, size: int):
    chunk = []
    for item in rows:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encode(row: dict | InvalidRow, encoder: PairEncoder, columns: Columns) -> EncodedPair | dict:
    """The pair ready to score, or its skip report: {"id", "reason", "detail"}."""
    if isinstance(row, InvalidRow):  # the reader could not make a row of it
        return {"id": row.id, "reason": row.reason, "detail": row.detail}
    try:
        return encoder.encode(parse_pair(row, columns))
    except BadRow as bad:
        return {"id": row_id(row, columns), "reason": bad.reason, "detail": bad.detail}


class _SkipReport:
    """Shows the first few skipped rows as they happen; under --strict, the first one stops the run."""

    def __init__(self, strict: bool):
        self.strict, self.shown = strict, 0

    def report(self, index: int, skip: dict) -> None:
        if self.strict:
            raise UserError(f"row {skip['id']} (input row {index}): {skip['reason']}: {skip['detail']} (--strict)")
        if self.shown < SHOWN_SKIPS:
            self.shown += 1
            tqdm.write(f"skipped {skip['id']}: {skip['reason']} ({skip['detail']})", file=sys.stderr)
