"""Read preference rows from local JSON / JSONL / Parquet files or a Hub dataset, streaming.

A source knows its row count up front, so workers can take contiguous, deterministic slices,
and can start reading at any row (resume). Unparseable lines become InvalidRow, never a crash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from treg_core.errors import UserError, first_line, unreadable
from treg_core.sources import looks_local

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
INTACT = "replace it with an intact copy (if some of it was scored, score it again with --overwrite)"


@dataclass(frozen=True)
class InvalidRow:
    id: str
    reason: str
    detail: str


Row = dict[str, Any] | InvalidRow


class RowSource:
    description: str
    num_rows: int
    fingerprint: str  # changes when the rows do: a rerun over a changed input is refused

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, Row]]:
        """(index, row) for start <= index < stop, in input order."""
        raise NotImplementedError


def open_source(dataset: str, split: str = "train", config: str | None = None) -> RowSource:
    source = _open(dataset, split, config)
    if not source.num_rows:  # scoring nothing would end in a "finished" folder of no pairs
        raise UserError(f"--dataset {dataset} holds no rows; give one of preference rows")
    return source


def _open(dataset: str, split: str, config: str | None) -> RowSource:
    path = Path(dataset)
    if not path.exists() and (looks_local(dataset) or path.suffix in LOCAL_SUFFIXES):
        raise UserError(f"--dataset {dataset}: no such file or folder (a Hub dataset is named ORG/NAME)")
    if path.exists():
        files = sorted(f for f in path.rglob("*") if f.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
        kinds = {LOCAL_SUFFIXES.get(f.suffix) for f in files}
        if not files or None in kinds or len(kinds) > 1:
            raise UserError(f"{dataset}: expected .json, .jsonl or .parquet files (one kind), "
                            f"found {[f.name for f in files] or 'none'}")
        try:
            return ParquetSource(files) if kinds == {"parquet"} else JsonSource(files)
        except OSError as err:  # a file this process may not read
            raise unreadable(err.filename or dataset, err, INTACT) from None
    return HubSource(dataset, split, config)


def worker_range(num_rows: int, num_workers: int, worker_index: int) -> tuple[int, int]:
    """Contiguous slice of the input for one worker; the slices cover every row exactly once."""
    if not 0 <= worker_index < num_workers:
        raise UserError(f"--worker-index must be in [0, {num_workers}), got {worker_index}")
    return worker_index * num_rows // num_workers, (worker_index + 1) * num_rows // num_workers


class JsonSource(RowSource):
    """JSON Lines, or a JSON array per file (read whole, as JSON arrays cannot be streamed)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.description = ", ".join(map(str, files))
        self._arrays = {f: _load_array(f) for f in files if _starts_with_bracket(f)}
        self._counts = [len(self._arrays[f]) if f in self._arrays else _count_lines(f) for f in files]
        self.num_rows = sum(self._counts)
        self.fingerprint = files_fingerprint(files)

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, Row]]:
        offset = 0
        for file, count in zip(self.files, self._counts):
            if offset + count > start and offset < stop:
                lo, hi = max(start - offset, 0), min(stop - offset, count)
                items = self._arrays[file][lo:hi] if file in self._arrays else _parse_lines(file, lo, hi)
                for i, item in enumerate(items):
                    yield offset + lo + i, _as_row(item, file, lo + i)
            offset += count


def _parquet_rows(file: Path) -> int:
    """Its rows, counted once every row group has been read: a damaged file is refused before any engine starts, not
    where scoring reaches the damage. An empty file has none."""
    import pyarrow.parquet as pq

    if not file.stat().st_size:
        return 0
    with _reading(file):
        parquet = pq.ParquetFile(file, page_checksum_verification=True)
        for group in range(parquet.num_row_groups):
            parquet.read_row_group(group)
        return parquet.metadata.num_rows


@contextmanager
def _reading(file: Path):
    """pyarrow's errors while the block reads an input file (damaged, cut short, or unreadable) as one line."""
    import pyarrow as pa

    try:
        yield
    except (OSError, pa.ArrowInvalid) as err:
        raise unreadable(file, err, INTACT) from None


class ParquetSource(RowSource):
    def __init__(self, files: list[Path]):

        self.files = files
        self.description = ", ".join(map(str, files))
        self._counts = [_parquet_rows(f) for f in files]
        self.num_rows = sum(self._counts)
        self.fingerprint = files_fingerprint(files)

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, Row]]:
        import pyarrow.parquet as pq

        index = 0
        for file, count in zip(self.files, self._counts):
            if index + count <= start or index >= stop:
                index += count
                continue
            with _reading(file):
                for batch in pq.ParquetFile(file, page_checksum_verification=True).iter_batches(batch_size=1024):
                    if index + batch.num_rows > start:
                        for row in batch.to_pylist():
                            if start <= index < stop:
                                yield index, row
                            index += 1
                    else:
                        index += batch.num_rows
                    if index >= stop:
                        return


class HubSource(RowSource):
    """A Hub dataset through `datasets` (memory-mapped Arrow cache; honours HF_HUB_OFFLINE)."""

    def __init__(self, name: str, split: str, config: str | None):
        import datasets

        try:
            self.dataset = datasets.load_dataset(name, config, split=split)
        except Exception as err:  # the library raises many types; the user needs one line
            raise UserError(f"cannot load dataset {name!r} (split {split!r}): {first_line(err)}") from None
        self.description = f"{name} [{split}]"
        self.num_rows = len(self.dataset)
        self.fingerprint = self.dataset._fingerprint  # datasets' own hash of the cached table

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, Row]]:
        for offset, row in enumerate(self.dataset.select(range(start, stop))):
            yield start + offset, row


def files_fingerprint(files: list[Path]) -> str:
    """SHA-256 of the files' names and bytes (about a second per GB)."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _starts_with_bracket(file: Path) -> bool:
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(4096), b""):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1] == b"["
    return False


def _load_array(file: Path) -> list:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON: {err}") from None


def _count_lines(file: Path) -> int:
    with open(file, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def _parse_lines(file: Path, lo: int, hi: int) -> Iterator[Any]:
    with open(file, "rb") as handle:
        for line in islice((line for line in handle if line.strip()), lo, hi):
            try:
                yield json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                yield InvalidRow("", "invalid_json", str(err))


def _as_row(item: Any, file: Path, line: int) -> Row:
    where = f"{file.name} record {line + 1}"
    if isinstance(item, InvalidRow):
        return InvalidRow(where, item.reason, item.detail)
    if not isinstance(item, dict):
        return InvalidRow(where, "malformed_row", f"expected a JSON object, got {type(item).__name__}")
    return item
