"""Streaming, batching and collation of scored shards for training."""

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import make_training_pair

from treg_core.contract import METADATA_KEY
from treg_core.errors import UserError
from treg_core.forward import TokenLogprobs
from treg_train.collate import collate, micro_batches, scatter_tokens
from treg_train.index import Reading, ShardIndex
from treg_train.model import load_causal_lm
from treg_train.readers import EvalReader, TrainingStream, balanced_shares


def test_order_covers_every_pair_once_and_depends_only_on_seed_and_epoch(learnable_shards):
    dataset = ShardIndex(learnable_shards)
    assert dataset.num_pairs == 96 and len(dataset.groups) == 3
    first = list(TrainingStream(dataset, 1, 16).order(0))
    assert Counter(first) == Counter((g, r) for g, (_, _, n) in enumerate(dataset.groups) for r in range(n))
    assert list(TrainingStream(dataset, 1, 16).order(0)) == first
    assert list(TrainingStream(dataset, 2, 16).order(0)) != first
    assert list(TrainingStream(dataset, 1, 16).order(1)) != first


def _ids(batches):
    return [(epoch, index, [pair.id for pair in pairs]) for epoch, index, pairs in batches]


def test_global_batches_resume_by_skipping_and_ranks_are_disjoint(learnable_shards):
    dataset = ShardIndex(learnable_shards)
    stream = TrainingStream(dataset, 0, 32).global_batches(16)
    batches = _ids(next(stream) for _ in range(9))  # crosses into the second epoch (6 per epoch)
    assert [(e, i) for e, i, _ in batches][5:7] == [(1.0, 5), (7 / 6, 6)]  # epochs done after it, as TRL logs
    resumed = TrainingStream(dataset, 0, 32).global_batches(16, start_batch=4)
    assert _ids(next(resumed) for _ in range(5)) == batches[4:9]
    _, _, batch = batches[0]
    shares = [_ids([next(TrainingStream(dataset, 0, 32).global_batches(16, rank=r, world_size=4))])[0][2]
              for r in range(4)]
    assert sorted(x for share in shares for x in share) == sorted(batch) and all(len(s) == 4 for s in shares)
    assert all([x for x in batch if x in share] == share for share in shares)  # each in the batch's order


@pytest.mark.parametrize("start_batch", [0, 4, 5])
def test_no_pair_is_dropped_when_the_global_batch_does_not_divide_them(learnable_shards, start_batch):
    """96 pairs in batches of 20: the 16 left over from an epoch open the next one's first batch, with the
    epochs' own orders one after the other; resuming mid-way, even inside the straddling batch, gives the same."""
    dataset = ShardIndex(learnable_shards)
    reader = EvalReader(dataset)
    stream = [reader.read(*c).id for e in (0, 1, 2) for c in TrainingStream(dataset, 0, 16).order(e)]
    batches = _ids(itertools.islice(TrainingStream(dataset, 0, 16).global_batches(20, start_batch), 9 - start_batch))
    assert [ids for _, _, ids in batches] == [stream[20 * b:20 * b + 20] for b in range(start_batch, 9)]
    assert [e for e, _, _ in batches] == [20 * (b + 1) / 96 for b in range(start_batch, 9)]
    assert sorted(stream[:96]) == sorted(pair.id for pair in map(reader.read, *zip(*reader.coordinates())))
    shares = [[pair.id for pair in next(TrainingStream(dataset, 0, 16).global_batches(20, 4, r, 3))[2]]
              for r in range(3)]
    assert sorted(sum(shares, [])) == sorted(stream[80:100])  # the straddling batch, split whole
    assert sorted(map(len, shares)) == [6, 7, 7]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_shares_of_the_ranks_make_up_the_global_batches_of_one_process(learnable_shards, world_size):
    dataset = ShardIndex(learnable_shards)
    reader = EvalReader(dataset)
    expected = [[reader.read(*c).id for c in order[i:i + 12]]  # 8 batches of 12 an epoch
                for order in (list(TrainingStream(dataset, 0, 16).order(e)) for e in (0, 1))
                for i in range(0, 96, 12)]
    streams = [TrainingStream(dataset, 0, 16).global_batches(12, rank=r, world_size=world_size)
               for r in range(world_size)]
    tokens = {pair.id: pair.num_tokens for pair in map(reader.read, *zip(*reader.coordinates()))}
    for batch in expected[:10]:  # into the second epoch
        shares = [[pair.id for pair in next(stream)[2]] for stream in streams]
        split = balanced_shares(np.array([tokens[pair] for pair in batch]), world_size)
        assert shares == [[pair for pair, r in zip(batch, split) if r == rank] for rank in range(world_size)]


def test_the_ranks_split_a_batch_into_as_many_pairs_and_about_as_many_tokens():
    assert balanced_shares(np.array([10, 1, 10, 1]), 2) == [0, 0, 1, 1]  # 11 tokens each; every other pair: 20 and 2
    rng = np.random.default_rng(0)
    for _ in range(300):
        world_size = int(rng.integers(2, 6))
        tokens = rng.integers(1, 1000, size=int(rng.integers(world_size, 40)))
        shares = np.array(balanced_shares(tokens, world_size))
        counts = np.bincount(shares, minlength=world_size)
        loads = np.bincount(shares, weights=tokens, minlength=world_size)
        assert counts.max() - counts.min() <= 1 and counts.sum() == len(tokens)
        assert loads.max() - loads.min() <= tokens.max(), (tokens, world_size)


def test_a_rank_reads_only_the_row_groups_holding_its_pairs(learnable_shards, monkeypatch):
    dataset = ShardIndex(learnable_shards)
    read = []

    class CountingFile(pq.ParquetFile):
        def __init__(self, source, *args, **kwargs):
            super().__init__(source, *args, **kwargs)
            self.name = Path(source).name

        def read_row_group(self, index, *args, **kwargs):
            read.append((self.name, index))
            return super().read_row_group(index, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", CountingFile)
    # A buffer of one keeps the order within row groups (of 40, 40 and 16 rows): with 48 ranks, each trains on
    # two pairs an epoch, from at most two of the three groups; resumed at the second batch, on one.
    order = list(TrainingStream(dataset, 0, 1).order(0))
    for rank in range(0, 48, 5):
        for start in (0, 1):
            stream = TrainingStream(dataset, seed=0, buffer_size=1).global_batches(48, start_batch=start, rank=rank,
                                                                                  world_size=48)
            read.clear()
            mine = [pair.id for _, _, pairs in itertools.islice(stream, 2 - start) for pair in pairs]
            tokens = dataset.tokens_by_row()
            coordinates = []
            for batch in range(start, 2):
                batch_coordinates = order[48 * batch:48 * batch + 48]
                split = balanced_shares(tokens[[dataset.first_row[g] + r for g, r in batch_coordinates]], 48)
                coordinates.append(batch_coordinates[split.index(rank)])
            groups = {dataset.groups[group][:2] for group, _ in coordinates}
            assert sorted(read) == sorted((dataset.files[file].name, row_group) for file, row_group in groups)
            assert len(groups) < 3
            read.clear()
            reader = EvalReader(dataset)
            assert mine == [reader.read(*c).id for c in coordinates]


@pytest.mark.parametrize("packed", [True, False])
def test_micro_batches_respect_the_token_budget(packed):
    shapes = [(10, 30, 5), (50, 20, 40), (5, 5, 5), (30, 60, 10), (8, 8, 90)]
    pairs = [make_training_pair(p, c, r) for p, c, r in shapes]
    batches = micro_batches(pairs, max_tokens=200, padding_free=packed)
    assert sorted(id(p) for b in batches for p in b) == sorted(id(p) for p in pairs)
    for batch in batches:
        inputs = collate(batch, packed)
        assert inputs.input_ids.numel() <= 200 or len(batch) == 1


def test_packed_padded_and_single_sequence_log_probs_agree(tiny_model, learnable_shards):
    dataset = ShardIndex(learnable_shards)
    reader = EvalReader(dataset)
    pairs = [reader.read(0, row) for row in range(5)]
    model = TokenLogprobs(load_causal_lm(tiny_model, torch.float32)).eval()
    results = {}
    with torch.no_grad():
        for packed in (True, False):
            inputs = collate(pairs, packed)
            assert (inputs.input_ids.shape[0] == 1) == packed
            results[packed] = scatter_tokens(model(inputs.input_ids, inputs.position_ids, inputs.predict_index,
                                                   inputs.targets).logps, inputs.token_mask)
        torch.testing.assert_close(results[True], results[False], atol=1e-5, rtol=0)
        # ...and both equal the stored reference log-probs of the scorer (same untrained model).
        stored = collate(pairs, True).ref_logps
        torch.testing.assert_close(results[True], stored, atol=1e-4, rtol=0)
    packed = collate(pairs, True)
    assert packed.input_ids.shape[0] == 1 and packed.num_tokens == packed.input_ids.numel()


def test_reward_column_and_missing_columns(learnable_shards):
    with pytest.raises(UserError, match="chosen_dpo_rewards"):
        ShardIndex(learnable_shards, Reading(reward_column="dpo_rewards"))
    pair = EvalReader(ShardIndex(learnable_shards, Reading(reward_column="better_logps"))).read(0, 0)
    assert pair.chosen_rewards[0] < 0 and len(pair.chosen_rewards) == len(pair.chosen_ids)


def test_foreign_and_mixed_shards_are_refused(learnable_shards, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.table({"id": ["a"]}), foreign / "plain.parquet")
    with pytest.raises(UserError, match="not a treg shard"):
        ShardIndex(str(foreign))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, file in enumerate(sorted((Path(learnable_shards) / "data").glob("*.parquet"))[:2]):
        table = pq.read_table(file)
        meta = json.loads(table.schema.metadata[METADATA_KEY])
        meta["provenance"]["tokenizer_hash"] = f"hash-{i}"
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), mixed / file.name)
    with pytest.raises(UserError, match="different tokenizers"):
        ShardIndex(str(mixed))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .parquet shards"):
        ShardIndex(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="neither a folder nor a Hub dataset id"):
        ShardIndex(str(tmp_path / "missing"))


def test_a_missing_eval_data_is_named_as_the_flag_it_came_from(tmp_path):
    from treg_train.config import TrainConfig
    from treg_train.preflight import eval_index

    config = TrainConfig(model="m", data="d", output="o", eval_data=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="^--eval-data .*missing is neither a folder nor a Hub dataset id"):
        eval_index(config, None, None)
