"""`treg-score --status DIR`: how far an output folder is, read from its files alone.

Nothing is scored, written or locked, and no engine is loaded: the report comes from the manifests, the shards'
metadata (the input rows each shard covers) and, for a Ray run, the record it leaves in the folder. A worker's part
of the input is the contiguous slice `worker_range` gives it; the input's row count is taken from the last worker's
manifest, or from the footers of a local Parquet input, never by reading the rows. The exit code says whether the
folder is finished, so that scripts can key on it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from treg_core.contract import (
    DATA_DIR,
    FIRST_SHARD_GLOB,
    MANIFEST,
    MANIFESTS_DIR,
    WORKER_MANIFEST_GLOB,
    Counts,
    Manifest,
    Provenance,
    ShardInfo,
    WorkerManifest,
    output_root,
    read_shard_metadata,
    read_worker_manifest,
    worker_manifest_path,
    worker_prefix,
)
from treg_core.errors import UserError
from treg_core.folders import LOCK, MARKER
from treg_data.inputs import LOCAL_SUFFIXES, worker_range
from treg_data.ray_executor import RAY_RECORD

FINISHED_CODE, UNFINISHED_CODE = 0, 3  # --status's exit codes (2 is a one-line error, as for every command)
SLURM_SCRIPT = "pipelines/launch/score_slurm_array.sh"
LISTED = 16  # up to this many workers, one line each; more are summarised
FINISHED, IN_PROGRESS, NOT_STARTED = "finished", "in progress", "not started"


@dataclass(frozen=True)
class WorkerStatus:
    index: int
    state: str  # FINISHED, IN_PROGRESS (a complete shard, or its lock file: it ran) or NOT_STARTED
    shards: int = 0  # complete shards
    rows: int = 0  # pairs scored into them
    skipped: int = 0
    input_done: int = 0  # input rows its complete shards (or, finished, its manifest) cover
    input_rows: int | None = None  # the size of its slice of the input; None: not knowable without reading it


@dataclass(frozen=True)
class FolderStatus:
    root: Path
    provenance: Provenance | None  # None: nothing is scored yet
    workers: list[WorkerStatus]
    input_rows: int | None  # the input's row count, where known
    totals: Counts | None  # manifest.json's: the folder is finished
    ray: dict | None  # the Ray run's record, when a Ray run scored here

    @property
    def finished(self) -> bool:
        return self.totals is not None

    @property
    def exit_code(self) -> int:
        return FINISHED_CODE if self.finished else UNFINISHED_CODE

    @property
    def unfinished(self) -> list[int]:
        return [w.index for w in self.workers if w.state != FINISHED]

    def text(self) -> str:
        if self.provenance is None:
            return "\n".join([f"{self.root}: nothing is scored yet", *self._advice()])
        done = len(self.workers) - len(self.unfinished)
        state = "finished" if self.finished else "unfinished"
        lines = [f"{self.root}: {state}, {done} of {len(self.workers)} workers finished", *self._layout()]
        lines += self._worker_lines() if len(self.workers) <= LISTED else self._worker_summary()
        return "\n".join(lines + self._advice())

    def _layout(self) -> list[str]:
        p = self.provenance
        dataset = p.dataset + (f" ({p.dataset_config})" if p.dataset_config else "")
        rows = f", {self.input_rows} rows" if self.input_rows is not None else ""
        lines = [f"  layout    split {p.split}, {p.num_workers} workers, shards of {p.shard_size} rows",
                 f"  model     {p.model}" + (f" (scored by {p.scorer_model})" if p.scorer_model != p.model else ""),
                 f"  dataset   {dataset}{rows}"]
        if self.totals:
            t = self.totals
            lines.append(f"  totals    {t.pairs_read} pairs read, {t.pairs_scored} scored, {t.pairs_skipped} "
                         f"skipped, {t.tokens} tokens (manifest.json)")
        return lines

    def _worker_lines(self) -> list[str]:
        lines = [f"  worker {w.index:<{len(str(len(self.workers) - 1))}}  {w.state}{_details(w)}" for w in self.workers]
        if any(w.state == IN_PROGRESS and w.input_rows is None for w in self.workers):
            lines.append("  (a slice's size needs the input's row count, and this input's rows are counted only by "
                         "reading it)")
        return lines

    def _worker_summary(self) -> list[str]:
        lines = [f"  workers   {len(self.unfinished)} of {len(self.workers)} unfinished"]
        for state in (FINISHED, IN_PROGRESS, NOT_STARTED):
            group = [w for w in self.workers if w.state == state]
            listed = f" ({array_list([w.index for w in group])})" if state != FINISHED else ""
            counts = _totals(group) if state != NOT_STARTED else ""
            if group:
                lines.append(f"  {state + ':':<12} {len(group)}{listed}{counts}")
        return lines

    def _advice(self) -> list[str]:
        if self.finished:
            return []
        lines = ["to finish it, rerun what scored it; each worker continues after its last complete shard:"]
        if self.ray:
            actors, address = self.ray.get("num_actors", "?"), self.ray.get("ray_address") or "a local cluster"
            lines.append(f"  a Ray run ({actors} actors on {address}): {shlex.join(map(str, self.ray['argv']))}")
        elif self.provenance is not None:
            workers, missing = len(self.workers), array_list(self.unfinished)
            ways = {"one run per worker:": f"your treg-score command with --num-workers {workers} --worker-index I, "
                                           f"for I in {missing}",
                    "--data-parallel-size:": "the same command again",
                    "a SLURM array:": f"sbatch --array={missing} --export=ALL,NUM_WORKERS={workers} {SLURM_SCRIPT} "
                                      "CONFIG",
                    "": "(CONFIG: the recipe the array ran, one task per worker)"}
            lines += [f"  {way:<22}{command}" for way, command in ways.items()]
        else:
            lines.append("  your treg-score command with this --output")
        return lines + [f"(exit code {UNFINISHED_CODE}: unfinished)"]


def _details(worker: WorkerStatus) -> str:
    if worker.state == NOT_STARTED:
        return ""
    shards = f"{worker.shards} complete shard{'' if worker.shards == 1 else 's'}"
    of = f" of {worker.input_rows}" if worker.input_rows is not None else ""
    counts = f"{worker.rows} rows scored, {worker.skipped} skipped"
    if worker.state == FINISHED:
        return f": {counts}, {shards}"
    return f": {shards}, {worker.input_done}{of} input rows done ({counts})"


def _totals(workers: list[WorkerStatus]) -> str:
    rows, skipped, done = (sum(getattr(w, name) for w in workers) for name in ("rows", "skipped", "input_done"))
    sizes = [w.input_rows for w in workers]
    of = f" of {sum(sizes)}" if None not in sizes else ""
    return f", {done}{of} input rows done ({rows} rows scored, {skipped} skipped)"


def array_list(indices: list[int]) -> str:
    """Sorted worker numbers as SLURM's --array takes them, runs compressed: 1,3-5,9."""
    runs: list[list[int]] = []
    for index in sorted(indices):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# ---- reading the folder ----------------------------------------------------------------------------


def folder_status(folder: str | Path) -> FolderStatus:
    """Where the treg-score output `folder` (or its data/ folder) stands; a folder treg-score did not write is a
    one-line error."""
    root = _checked_root(folder)
    ray = _ray_record(root)
    manifest = _manifest(root)
    provenance = manifest.provenance if manifest else _any_provenance(root)
    if provenance is None:
        return FolderStatus(root, None, [], None, None, ray)
    count = provenance.num_workers
    manifests = {i: read_worker_manifest(p) for i in range(count)
                 if (p := worker_manifest_path(root, i, count)).is_file()}
    shards = {i: _shard_infos(root, provenance, i) for i in range(count) if i not in manifests}
    input_rows = manifest.counts.pairs_read if manifest else _input_rows(provenance, manifests)
    slices = _slices(count, manifests, shards, input_rows)
    if slices is None:  # the row count disagrees with where the workers started: the input changed since
        input_rows, slices = None, _slices(count, manifests, shards, None)
    workers = [_worker(i, manifests.get(i), shards.get(i, []), slices[i], _ran(root, provenance, i))
               for i in range(count)]
    return FolderStatus(root, provenance, workers, input_rows, manifest.counts if manifest else None, ray)


def _checked_root(folder: str | Path) -> Path:
    root = output_root(folder)
    if not root.exists():
        raise UserError(f"{root}: no such folder; give the --output of a treg-score run")
    if not root.is_dir():
        raise UserError(f"{root} is a file; give the --output folder of a treg-score run")
    marker = root / MARKER
    owner = marker.read_text(encoding="utf-8", errors="replace").strip() if marker.is_file() else None
    if owner != "treg-score":
        what = f"holds {owner} output" if owner else f"was not written by treg-score (no {MARKER} marker)"
        raise UserError(f"{root} {what}; give the --output folder of a treg-score run")
    return root


def _manifest(root: Path) -> Manifest | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))


def _any_provenance(root: Path) -> Provenance | None:
    """The run's provenance, from a worker manifest or a first shard: a folder holds one run's layout."""
    for path in sorted((root / MANIFESTS_DIR).glob(WORKER_MANIFEST_GLOB)):
        return read_worker_manifest(path).provenance
    for path in sorted((root / DATA_DIR).glob(FIRST_SHARD_GLOB)):
        return read_shard_metadata(path).provenance
    return None


def _shard_infos(root: Path, provenance: Provenance, index: int) -> list[ShardInfo]:
    """What each complete shard of an unfinished worker covers, in order."""
    prefix = worker_prefix(provenance.split, index, provenance.num_workers)
    return [read_shard_metadata(path).shard for path in sorted((root / DATA_DIR).glob(f"{prefix}*.parquet"))]


def _ran(root: Path, provenance: Provenance, index: int) -> bool:
    """The worker has run (a worker takes its own lock file before it scores), complete shard or not."""
    prefix = worker_prefix(provenance.split, index, provenance.num_workers)
    return (root / f"{LOCK}-{prefix.rstrip('-')}").exists()


def _input_rows(provenance: Provenance, manifests: dict[int, WorkerManifest]) -> int | None:
    """The input's row count: where the last worker's slice ends, or a local Parquet input's footers say."""
    last = manifests.get(provenance.num_workers - 1)
    if last is not None:
        return last.input_end
    path = Path(provenance.dataset)
    files = sorted(f for f in path.rglob("*") if f.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
    if not path.exists() or not files or any(f.suffix != ".parquet" for f in files):
        return None  # a JSON or Hub input is counted only by reading it
    try:
        return sum(pq.read_metadata(f).num_rows for f in files)
    except (OSError, pa.ArrowInvalid):
        return None


def _slices(count: int, manifests: dict[int, WorkerManifest], shards: dict[int, list[ShardInfo]],
            input_rows: int | None) -> list[tuple[int | None, int | None]] | None:
    """Each worker's slice of the input, (start, end), None where unknown: from the row count, else from where the
    workers' files say they start. None when the row count puts a worker's start elsewhere than its files do."""
    starts = [manifests[i].input_start if i in manifests else shards[i][0].input_start if shards[i] else None
              for i in range(count)]
    if input_rows is not None:
        ranges = [worker_range(input_rows, count, i) for i in range(count)]
        return ranges if all(s in (None, r[0]) for s, r in zip(starts, ranges)) else None
    ends = [manifests[i].input_end if i in manifests else starts[i + 1] if i + 1 < count else None
            for i in range(count)]
    return list(zip(starts, ends))


def _worker(index: int, manifest: WorkerManifest | None, shards: list[ShardInfo],
            piece: tuple[int | None, int | None], ran: bool) -> WorkerStatus:
    start, end = piece
    size = end - start if start is not None and end is not None else None
    if manifest is not None:
        return WorkerStatus(index, FINISHED, len(manifest.shards), manifest.rows, len(manifest.skipped),
                            manifest.input_end - manifest.input_start, size)
    if not shards and not ran:
        return WorkerStatus(index, NOT_STARTED, input_rows=size)
    done = shards[-1].input_end - shards[0].input_start if shards else 0
    return WorkerStatus(index, IN_PROGRESS, len(shards), sum(s.rows for s in shards),
                        sum(len(s.skipped) for s in shards), done, size)


def _ray_record(root: Path) -> dict | None:
    path = root / RAY_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}); rerun the treg-score --executor ray command that scored "
                        f"{root}") from None
    if not isinstance(record, dict) or not isinstance(record.get("argv"), list):
        raise UserError(f"{path} holds no Ray run record (no argv list); rerun the treg-score --executor ray command "
                        f"that scored {root}")
    return record
