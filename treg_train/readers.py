"""The two ways training reads a ShardIndex: the shuffled stream of global batches it trains on, and the
storage-order reader evaluation uses.

Memory stays flat in dataset size. The training order is built from row-group sizes alone (a seeded
permutation of row groups, then a shuffle buffer), and each epoch runs it twice: over row coordinates, to
mark the rows this rank trains on (a byte per row), then over row content. That pass reads a row group
only if it holds a marked row, once, when the order reaches it; the marked rows go into the shuffle
buffer as copies, the others as None (so the order is the same on every rank), and the group's table is
dropped. The position in the stream is a number of global batches, so resuming regenerates the order
and skips ahead, reading nothing for the batches skipped.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from treg_core.errors import UserError
from treg_train.index import ShardIndex, TrainingPair


def rank_slice(batch: list, rank: int, world_size: int) -> list:
    """This rank's disjoint share of a global batch."""
    return batch[rank::world_size]


class TrainingStream:
    """The index's rows in a shuffled order fixed by (seed, epoch), cut into global batches of which each
    rank reads only its share. The batches are the same for every world size."""

    def __init__(self, index: ShardIndex, seed: int, buffer_size: int):
        self.index, self.seed, self.buffer_size = index, seed, buffer_size

    def order(self, epoch: int) -> Iterator[tuple[int, int]]:
        """Every (row group, row) once."""
        return self._shuffled(epoch, lambda group: [(group, row) for row in self.index.rows(group)])

    def pairs(self, epoch: int, marked: np.ndarray) -> Iterator[TrainingPair | None]:
        """The rows of `order`, in that order: a TrainingPair for each row marked in `marked` (one bool per row
        of the folder), None for the others. A row group is read only if it holds a marked row, once."""
        return self._shuffled(epoch, lambda group: self._marked_pairs(group, marked))

    def global_batches(self, global_batch_size: int, start_batch: int = 0, rank: int = 0,
                       world_size: int = 1) -> Iterator[tuple[int, int, list[TrainingPair]]]:
        """(epoch, batch index within the epoch, this rank's pairs of that global batch) forever; incomplete last
        batches are dropped, so every global batch has exactly global_batch_size pairs."""
        per_epoch = self.index.num_pairs // global_batch_size
        if per_epoch == 0:
            raise UserError(f"{self.index.num_pairs} pairs are fewer than --global-batch-size {global_batch_size}")
        epoch, skip = divmod(start_batch, per_epoch)
        while True:
            marked = self.rows_of_rank(epoch, global_batch_size, skip, rank, world_size)
            for index, batch in enumerate(_cut(self.pairs(epoch, marked), global_batch_size, per_epoch)):
                if index >= skip:
                    yield epoch, index, rank_slice(batch, rank, world_size)
            epoch, skip = epoch + 1, 0

    def rows_of_rank(self, epoch: int, global_batch_size: int, skip: int, rank: int, world_size: int) -> np.ndarray:
        """Which rows of the folder this rank trains on in an epoch's global batches from `skip` on, one bool per
        row: a pass over the order's coordinates, which reads no row content."""
        marked = np.zeros(self.index.total_rows, dtype=bool)
        batches = _cut(self.order(epoch), global_batch_size, self.index.num_pairs // global_batch_size)
        for number, batch in enumerate(batches):
            if number >= skip:
                for group, row in rank_slice(batch, rank, world_size):
                    marked[self.index.first_row[group] + row] = True
        return marked

    def _shuffled(self, epoch: int, items: Callable[[int], list]) -> Iterator:
        """A row group's items (one per row on this side of the split) in the shuffled order. The random draws
        depend on the row counts alone, so every kind of item comes in the same order; a group's items are
        made when the order reaches it and only the shuffle buffer keeps them."""
        rng = random.Random(f"{self.seed}-{epoch}")
        group_order = list(range(len(self.index.groups)))
        rng.shuffle(group_order)
        buffer: list = []
        for group in group_order:
            for item in items(group):
                if len(buffer) < self.buffer_size:
                    buffer.append(item)
                    continue
                pick = rng.randrange(self.buffer_size)
                yield buffer[pick]
                buffer[pick] = item
        rng.shuffle(buffer)
        yield from buffer

    def _marked_pairs(self, group: int, marked: np.ndarray) -> list[TrainingPair | None]:
        """A row group's rows on this side of the split: a TrainingPair if marked, None if not."""
        rows = np.asarray(self.index.rows(group), dtype=np.int64)
        mine = marked[self.index.first_row[group] + rows]
        if not mine.any():
            return [None] * len(rows)
        pairs = iter(self.index.pairs(self.index.table(group), rows[mine]))
        return [next(pairs) if m else None for m in mine]


def _cut(order: Iterator, size: int, count: int) -> Iterator[list]:
    """The first `count` batches of `size` items of `order`; the rest of it is dropped."""
    for _ in range(count):
        yield [next(order) for _ in range(size)]


class EvalReader:
    """The index's pairs in storage order (evaluation needs no shuffle), by coordinates. The last row group
    read is kept, so reading in storage order reads each group once."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self._last: tuple[int, pa.Table] | None = None

    @property
    def num_pairs(self) -> int:
        return self.index.num_pairs

    def coordinates(self) -> Iterator[tuple[int, int]]:
        """Every (row group, row) once in storage order."""
        for group in range(len(self.index.groups)):
            for row in self.index.rows(group):
                yield group, row

    def read(self, group: int, row: int) -> TrainingPair:
        if self._last is None or self._last[0] != group:
            self._last = None  # drop the old table before reading the new one
            self._last = group, self.index.table(group)
        return self.index.pairs(self._last[1], [row])[0]
