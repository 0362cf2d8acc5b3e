"""Parquet shards that reruns can trust (datatrove-style), and the manifest.

Layout of an output folder:
    data/{split}-{worker:05d}-of-{workers:05d}-{shard:05d}.parquet   shards, rows in input order
    manifests/worker-{worker:05d}-of-{workers:05d}.json                written when a worker finishes
    manifest.json, skipped.jsonl                                       written once every worker has
    .treg                                                              marks the folder as treg-score's

treg-score writes only into a new or empty folder, or one it marked before, and while the workers of one
run write there no process of another run (or worker layout) may (treg_core.folders).

A shard is written to a hidden temporary name, flushed to disk and renamed, so a file with the
final name is always complete; its pages carry checksums, so one damaged later is found where it is
read (treg_core.contract.open_shard), not read as numbers. Its Parquet metadata holds the provenance
and the input rows it covers; a rerun continues after the last complete shard and writes exactly the
same rows.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from treg_core.atomic import replacing, write_json, write_text
from treg_core.contract import (
    DATA_DIR,
    FIRST_SHARD_GLOB,
    FORMAT,
    MANIFEST,
    MANIFESTS_DIR,
    METADATA_KEY,
    SIGNALS_KEY,
    SKIPPED,
    WORKER_MANIFEST_GLOB,
    Counts,
    Manifest,
    Provenance,
    RecordMismatch,
    ShardInfo,
    ShardMetadata,
    WorkerManifest,
    read_shard_metadata,
    read_worker_manifest,
    shard_name,
    worker_manifest_path,
    worker_prefix,
)
from treg_core.errors import UserError, writing
from treg_core.folders import LOCK, check_folder, claim_folder, lock_folder, share_folder
from treg_data.signals import largest_signals

ROW_GROUP_SIZE = 1000  # the unit readers fetch, so streaming needs little memory


@dataclass
class Progress:
    """What a worker has done so far: input position and counts, carried across reruns."""

    next_input: int
    next_shard: int = 0
    rows: int = 0
    tokens: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"id", "reason", "detail"}
    finished: bool = False  # the worker manifest exists: nothing left to do

    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(entry["reason"] for entry in self.skipped))


class ShardStore:
    def __init__(self, output: str | Path, split: str, worker_index: int, num_workers: int, provenance: Provenance):
        self.root = Path(output)
        self.data_dir = self.root / DATA_DIR
        self.split = split
        self.worker_index = worker_index
        self.num_workers = num_workers
        self.provenance = provenance
        self.prefix = worker_prefix(split, worker_index, num_workers)

    # ---- resume -------------------------------------------------------------------------

    def resume(self, start: int, overwrite: bool) -> Progress:
        """Check the folder holds only compatible work, then return where this worker stands. The folder's lock is
        held from here on, shared with the other workers of this run only: a process of another layout (or an
        --overwrite of other data) is refused while this one runs, and so is a second run of the same worker."""
        check_folder(self.root, "treg-score")
        share_folder(self.root, "treg-score", self.layout)
        lock_folder(self.root, "treg-score", f"-{self.prefix.rstrip('-')}")
        claim_folder(self.root, "treg-score")
        with writing(self.data_dir):  # a read-only folder: one line
            self.data_dir.mkdir(parents=True, exist_ok=True)
            for tmp in self.data_dir.glob(f".{self.prefix}*"):
                tmp.unlink()  # left by a killed run; never trusted
            self._refuse_or_remove_foreign(overwrite)
            if overwrite:
                for path in self._own_shards():
                    path.unlink()
                self.worker_manifest_path.unlink(missing_ok=True)
        self._check_writable()
        if self.worker_manifest_path.exists():  # this worker finished before: nothing left to do
            done = read_worker_manifest(self.worker_manifest_path)
            return Progress(next_input=done.input_end, next_shard=len(done.shards), rows=done.rows,
                            tokens=done.tokens, skipped=done.skipped, finished=True)
        progress = Progress(next_input=start)
        for number, path in enumerate(self._own_shards()):
            meta = read_shard_metadata(path).shard
            if path.name != self.shard_name(number) or meta.input_start != progress.next_input:
                raise UserError(f"{path} does not continue the shards before it; remove it or use --overwrite")
            progress.next_input = meta.input_end
            progress.next_shard = number + 1
            progress.rows += meta.rows
            progress.tokens += meta.tokens
            progress.skipped += meta.skipped
        return progress

    @property
    def layout(self) -> dict:
        """What every worker of this run shares: the settings that decide the shards, the number of workers among
        them."""
        return {k: v for k, v in self.provenance.to_dict().items() if k not in Provenance.IGNORED}

    def _check_writable(self) -> None:
        """A file can be created in the folder and in its data/: a read-only one is refused before any scoring, not
        when the first shard (or, after the last, the manifest) is written. Listings skip the probe's name."""
        for folder in (self.root, self.data_dir):
            probe = folder / f"{LOCK}-probe-{os.getpid()}"
            with writing(folder):
                probe.touch()
                probe.unlink()

    def _refuse_or_remove_foreign(self, overwrite: bool) -> None:
        for path in self._first_shards_and_manifests():
            try:
                differences = self.provenance.differences(_provenance_of(path))
            except RecordMismatch:  # records of another treg version: its keys differ
                differences = ["the record format"]
            if not differences:
                continue
            if not overwrite:
                named = ["the input's content" if d == "input_fingerprint" else d for d in differences]
                raise UserError(
                    f"{self.root} already holds data scored with other settings ({', '.join(named)} differ, "
                    f"e.g. {path.name}); use a new --output, or --overwrite to replace it"
                )
            stem = path.name.split("-of-")[0] if path.suffix == ".parquet" else None
            for stale in (self.data_dir.glob(f"{stem}-of-*") if stem else [path]):
                stale.unlink()
        if overwrite:
            for name in (MANIFEST, SKIPPED):
                (self.root / name).unlink(missing_ok=True)

    def _first_shards_and_manifests(self) -> list[Path]:
        firsts = sorted(self.data_dir.glob(FIRST_SHARD_GLOB))
        return firsts + sorted((self.root / MANIFESTS_DIR).glob(WORKER_MANIFEST_GLOB))

    def _own_shards(self) -> list[Path]:
        return sorted(self.data_dir.glob(f"{self.prefix}*.parquet"))

    # ---- writing ------------------------------------------------------------------------

    def shard_name(self, number: int) -> str:
        return shard_name(self.split, self.worker_index, self.num_workers, number)

    def write_shard(self, number: int, rows: list[dict], shard: ShardInfo) -> Path:
        meta = ShardMetadata(self.provenance, shard).to_dict()
        schema = self.provenance.schema  # optional columns only when the run wrote them
        table = pa.Table.from_pylist(rows, schema=schema)
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta),
                                               SIGNALS_KEY: json.dumps(largest_signals(table))})
        target = self.data_dir / self.shard_name(number)
        with writing(target), replacing(target) as tmp:  # page checksums: readers find damage
            pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_SIZE, write_page_checksum=True)
        return self.data_dir / self.shard_name(number)

    @property
    def worker_manifest_path(self) -> Path:
        return worker_manifest_path(self.root, self.worker_index, self.num_workers)

    def finish(self, progress: Progress, input_start: int, input_end: int, scoring_path: str,
               reward_check: dict | None = None) -> Path | None:
        """Record this worker as done; write manifest.json when every worker is. Returns its path."""
        worker = WorkerManifest(
            provenance=self.provenance, worker_index=self.worker_index, input_start=input_start, input_end=input_end,
            shards=[self.shard_name(n) for n in range(progress.next_shard)], rows=progress.rows,
            tokens=progress.tokens, skipped=progress.skipped, scoring_path=scoring_path, reward_check=reward_check,
        )
        write_json(self.worker_manifest_path, worker.to_dict())
        return merge_manifests(self.root, self.num_workers)


@dataclass
class _Pending:
    """A processed input row waiting for its shard: a scored row or a skip report."""

    index: int
    row: dict | None = None
    skip: dict | None = None
    tokens: int = 0


class ShardCutter:
    """Cuts scored rows into shards of exactly `shard_size` rows, in input order. A shard covers
    the input rows from the previous shard's end to its last row, skips included; skips after the
    last row belong to no shard, and the worker manifest keeps them."""

    def __init__(self, store: ShardStore, progress: Progress, shard_size: int):
        self.store, self.progress, self.shard_size = store, progress, shard_size
        self.pending: list[_Pending] = []

    def add_row(self, index: int, row: dict, tokens: int) -> None:
        self.pending.append(_Pending(index, row=row, tokens=tokens))

    def add_skip(self, index: int, skip: dict) -> None:
        self.pending.append(_Pending(index, skip=skip))

    def flush(self, final: bool = False) -> None:
        """Write every full shard; at the end, the remainder too."""
        self.pending.sort(key=lambda item: item.index)
        while True:
            scored_positions = [i for i, item in enumerate(self.pending) if item.row is not None]
            if len(scored_positions) >= self.shard_size:
                cut = scored_positions[self.shard_size - 1] + 1
            elif final and scored_positions:
                cut = len(self.pending)
            else:
                break
            taken, self.pending = self.pending[:cut], self.pending[cut:]
            rows = [item.row for item in taken if item.row is not None]
            skipped = [item.skip for item in taken if item.skip is not None]
            tokens, end = sum(item.tokens for item in taken), taken[-1].index + 1
            self.store.write_shard(self.progress.next_shard, rows,
                                   ShardInfo(self.progress.next_input, end, len(rows), tokens, skipped))
            self.progress.next_shard += 1
            self.progress.next_input = end
            self.progress.rows += len(rows)
            self.progress.tokens += tokens
            self.progress.skipped += skipped
        if final:
            self.progress.skipped += [item.skip for item in self.pending]
            self.pending = []


def merge_manifests(root: Path, num_workers: int) -> Path | None:
    """Combine the worker manifests once all are present. Deterministic, so racing writers agree."""
    paths = [worker_manifest_path(root, i, num_workers) for i in range(num_workers)]
    if not all(p.exists() for p in paths):
        return None
    workers = [read_worker_manifest(p) for p in paths]
    skipped = [entry for w in workers for entry in w.skipped]
    manifest = Manifest(
        format=FORMAT,
        provenance=workers[0].provenance,
        counts=Counts(
            pairs_read=sum(w.input_end - w.input_start for w in workers),
            pairs_scored=sum(w.rows for w in workers),
            pairs_skipped=len(skipped),
            skipped_by_reason=dict(sorted(Counter(e["reason"] for e in skipped).items())),
            tokens=sum(w.tokens for w in workers),
        ),
        shards=[f"{DATA_DIR}/{name}" for w in workers for name in w.shards],
        skipped_examples=skipped[:20],
        scoring_path=sorted({w.scoring_path for w in workers} - {""}),
        reward_check=next((w.reward_check for w in workers if w.reward_check), None),
    )
    write_text(root / SKIPPED, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in skipped))
    write_json(root / MANIFEST, manifest.to_dict())
    return root / MANIFEST


def _provenance_of(path: Path) -> Provenance:
    if path.suffix == ".parquet":
        return read_shard_metadata(path).provenance
    return read_worker_manifest(path).provenance
