"""The two ways training reads a ShardIndex: the shuffled stream of global batches it trains on, and the
storage-order reader evaluation uses.

Memory stays flat in dataset size. The training order is built from row-group sizes alone (a seeded
permutation of row groups, then a shuffle buffer), and each epoch runs it twice: over row coordinates, to
mark the rows this rank trains on (a byte per row), then over row content. That pass reads a row group
only if it holds a marked row, once, when the order reaches it; the marked rows go into the shuffle
buffer as copies, the others as None (so the order is the same on every rank), and the group's table is
dropped. The position in the stream is a number of global batches, so resuming regenerates the order
and skips ahead, reading nothing for the batches skipped.

Several ranks split each global batch by its pairs' token counts (`balanced_shares`; 4 bytes a row, counted
once from the shards' token-id columns), so that they train about as many tokens each.
"""

from __future__ import annotations

import collections
import itertools
import random
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from treg_core.errors import UserError
from treg_train.index import ShardIndex, TrainingPair


def rank_slice(batch: list, rank: int, world_size: int) -> list:
    """This rank's disjoint share of a batch of held-out pairs."""
    return batch[rank::world_size]


def balanced_shares(tokens: np.ndarray, world_size: int) -> list[int]:
    """The rank that trains each pair of a global batch (`tokens`: each pair's tokens, in the batch's order), so
    that the ranks train as many pairs (give or take one, as `rank_slice` would) and about as many tokens: the
    longest pair first, each to the rank with the fewest tokens so far that has room. The ranks wait for the
    slowest at every collective, so a step takes as long as the rank with the most tokens."""
    room = [len(tokens) // world_size + (r < len(tokens) % world_size) for r in range(world_size)]
    loads = [0] * world_size
    shares = [0] * len(tokens)
    for pair in sorted(range(len(tokens)), key=lambda pair: -int(tokens[pair])):  # stable: ties in batch order
        rank = min((r for r in range(world_size) if room[r]), key=lambda r: loads[r])
        shares[pair], loads[rank], room[rank] = rank, loads[rank] + int(tokens[pair]), room[rank] - 1
    return shares


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
                       world_size: int = 1) -> Iterator[tuple[float, int, list[TrainingPair]]]:
        """(epochs done after the batch, as TRL logs them; the batch's number; this rank's pairs of that global
        batch, `balanced_shares`) forever. The epochs' orders follow one another in one stream cut into global
        batches, so the pairs left over at the end of an epoch open the next one's first batch: every batch is
        full and no pair is dropped (only the run's own end can leave the last epoch's tail untrained)."""
        total = self.index.num_pairs
        if total < global_batch_size:
            raise UserError(f"{total} pairs are fewer than --global-batch-size {global_batch_size}")
        if world_size > 1:
            self.index.tokens_by_row()  # counted now, not while the first batch is read
        return self._global_batches(global_batch_size, start_batch, rank, world_size)

    def _global_batches(self, global_batch_size: int, start_batch: int, rank: int,
                        world_size: int) -> Iterator[tuple[float, int, list[TrainingPair]]]:
        total = self.index.num_pairs
        epoch = start_batch * global_batch_size // total  # the epoch in which the batch `start_batch` begins
        position, batch = epoch * total, []  # the stream position of the epoch's first pair
        while True:
            marked = self.rows_of_rank(epoch, global_batch_size, start_batch, rank, world_size)
            for pair in self.pairs(epoch, marked):
                if position // global_batch_size >= start_batch:
                    batch.append(pair)
                position += 1
                if position % global_batch_size == 0 and batch:
                    yield (position / total, position // global_batch_size - 1,
                           [pair for pair in batch if pair is not None])
                    batch = []
            epoch += 1

    def rows_of_rank(self, epoch: int, global_batch_size: int, start_batch: int, rank: int,
                     world_size: int) -> np.ndarray:
        """Which rows of the folder this rank trains on in the global batches from `start_batch` on that take
        pairs of `epoch`, one bool per row: a pass over the order's coordinates, which reads no row content.
        Several ranks split each batch by `balanced_shares` of its pairs' tokens (ShardIndex.tokens_by_row); a
        batch that straddles two epochs is split as a whole, from the coordinates of both."""
        marked = np.zeros(self.index.total_rows, dtype=bool)
        begin, end = epoch * self.index.num_pairs, (epoch + 1) * self.index.num_pairs
        if world_size == 1:
            for position, row in enumerate(self._row_numbers(epoch), start=begin):
                marked[row] = position // global_batch_size >= start_batch
            return marked
        tokens = self.index.tokens_by_row()
        for first, rows in self._batches_of_epoch(epoch, global_batch_size):
            if first // global_batch_size < start_batch:
                continue
            for position, row, share in zip(itertools.count(first), rows, balanced_shares(tokens[rows], world_size)):
                if share == rank and begin <= position < end:
                    marked[row] = True
        return marked

    def _batches_of_epoch(self, epoch: int, global_batch_size: int) -> Iterator[tuple[int, list[int]]]:
        """(stream position of its first pair, the folder's row numbers of its pairs) of each global batch that
        takes pairs of `epoch`, whole: with the end of the previous epoch's order or the start of the next's where
        the batch reaches into them. One batch at a time."""
        begin, end = epoch * self.index.num_pairs, (epoch + 1) * self.index.num_pairs
        first = begin - begin % global_batch_size
        last = -(-end // global_batch_size) * global_batch_size  # the end of the batch holding the epoch's last pair
        before = collections.deque(self._row_numbers(epoch - 1), maxlen=begin - first) if first < begin else ()
        rows = itertools.chain(before, self._row_numbers(epoch), itertools.islice(self._row_numbers(epoch + 1),
                                                                                  last - end))
        for position in itertools.count(first, global_batch_size):
            batch = list(itertools.islice(rows, global_batch_size))
            if not batch:
                return
            yield position, batch

    def _row_numbers(self, epoch: int) -> Iterator[int]:
        return (int(self.index.first_row[group]) + row for group, row in self.order(epoch))

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
