"""The memory plan from the data's lengths: forwards as long as the collator can make them from the pairs (no
longer than a full one), so that --gradient-checkpointing auto leaves checkpointing off where the pairs are short,
and the plan stays close to the peak a run on short pairs measures."""

import json
import random
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_training_pair, read_metrics, run, train_command

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines" / "bench"))


def test_packed_forwards_hold_the_longest_pairs_up_to_the_budget_and_the_share():
    from treg_train.plan import longest_forward, most_response_tokens

    # tokens of each pair 28, 60, 20, 261; its longest sequence 15, 30, 10, 230
    lengths = [(10, 5, 3), (20, 10, 10), (5, 5, 5), (30, 200, 1)]
    assert longest_forward(lengths, 2048, 16384, 16, True) == 28 + 60 + 20 + 261
    assert longest_forward(lengths, 2048, 16384, 2, True) == 261 + 60  # a rank's share: its 2 longest pairs
    assert longest_forward(lengths, 2048, 300, 16, True) == 300  # --micro-batch-tokens caps a pack
    assert longest_forward(lengths, 100, 16384, 16, True) == 28 + 60 + 20  # beyond --max-length: skipped
    assert longest_forward(lengths, 2048, 100, 16, True) == 261  # a pair alone over the budget is one forward
    assert longest_forward(lengths, 5, 16384, 16, True) == 0  # nothing trained: nothing forwarded
    assert most_response_tokens(lengths, 2048, 2) == 201 + 20  # the log-prob kernel's rows: the most responses
    assert most_response_tokens(lengths, 100, 2) == 20 + 10


def test_padded_forwards_cost_every_pair_the_longest_sequence():
    from treg_train.plan import longest_forward

    lengths = [(10, 5, 3), (20, 10, 10), (5, 5, 5), (30, 200, 1)]  # longest 15, 30, 10, 230
    assert longest_forward(lengths, 2048, 16384, 16, False) == 2 * 4 * 230
    assert longest_forward(lengths, 2048, 16384, 2, False) == 2 * 2 * 230
    # a budget of 460 holds one pair of 230, or seven of 30 of which there are three: 2 x 3 x 30 = 180 < 460
    assert longest_forward(lengths, 2048, 460, 16, False) == 460
    assert longest_forward(lengths, 200, 16384, 16, False) == 2 * 3 * 30
    assert longest_forward(lengths, 200, 100, 16, False) == 60  # one pair of 30, or the two no longer than 15


@pytest.mark.parametrize("padding_free", [True, False])
def test_no_micro_batch_the_collator_builds_is_longer_than_planned(padding_free):
    """Random shares of random pairs through the real collator: every forward within the bound, and the bound
    reached by a rank holding the right pairs (packed: to within one pair)."""
    from treg_train.collate import collate, micro_batches
    from treg_train.plan import longest_forward

    rng = random.Random(0)
    pairs = [make_training_pair(rng.randint(1, 60), rng.randint(1, 80), rng.randint(1, 80), id=str(i))
             for i in range(60)]
    lengths = np.array([(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs])
    budget, share, max_length = 700, 8, 120
    bound = longest_forward(lengths, max_length, budget, share, padding_free)
    trained = [p for p in pairs if p.longest <= max_length]

    def first_forward(held: list) -> int:  # tokens of the first (the longest pairs') micro-batch of a rank's pairs
        return collate(micro_batches(held, budget, padding_free)[0], padding_free).input_ids.numel()

    drawn = max(collate(batch, padding_free).input_ids.numel()
                for _ in range(300) for batch in micro_batches(rng.sample(trained, share), budget, padding_free))
    assert drawn <= bound
    if padding_free:  # the longest pairs pack up to the budget, short of it by less than a pair
        kept = sorted(trained, key=lambda p: -p.num_tokens)[:share]
        assert bound - first_forward(kept) < max(p.num_tokens for p in kept)
    else:  # a pair and the longest pairs no longer than it, padded to its length: exactly the bound
        ordered = sorted(trained, key=lambda p: p.longest)
        assert max(first_forward(ordered[max(0, i + 1 - share):i + 1]) for i in range(len(ordered))) == bound


def _printed_plan(capsys, **settings) -> tuple[dict, str]:
    from treg_train.cli import print_plan
    from treg_train.config import TrainConfig

    print_plan(TrainConfig(plan=True, global_batch_size=16, **settings))
    table = capsys.readouterr().out
    return json.loads(table.strip().splitlines()[-1]), table


def test_plan_with_data_plans_the_data_s_forwards(tiny_model, learnable_shards, capsys, tmp_path):
    from treg_train.index import ShardIndex

    without, table = _printed_plan(capsys, model=tiny_model)
    assert not without["from_data"] and without["forward_tokens"] == 16384
    assert "assumes full forwards of 16384 tokens: give --data to plan from the data's lengths" in table
    planned, table = _printed_plan(capsys, model=tiny_model, data=learnable_shards)
    lengths = ShardIndex(learnable_shards).pair_lengths()
    assert lengths.shape == (96, 3) and (lengths > 0).all()
    packed = np.sort(2 * lengths[:, 0] + lengths[:, 1] + lengths[:, 2])[::-1][:16].sum()  # varlen packs the pairs
    assert planned["from_data"] and planned["forward_tokens"] == packed < 16384 // 4
    assert f"forwards of at most {packed} tokens, from the data's lengths" in table
    assert planned["parts"]["activations"] < without["parts"]["activations"] / 4
    assert planned["parts"]["log-prob chunk"] < without["parts"]["log-prob chunk"]  # fewer rows than the pairs hold
    unread, table = _printed_plan(capsys, model=tiny_model, data=str(tmp_path / "missing"))
    assert unread["forward_tokens"] == 16384 and "--data was not read, so the plan is the settings' worst case" in table


def test_auto_leaves_checkpointing_off_where_the_data_is_short(tiny_model, learnable_shards, monkeypatch):
    """On a device where full forwards fit only with checkpointing, the data's short pairs fit without it."""
    from treg_train import plan as plans
    from treg_train.config import TrainConfig
    from treg_train.index import ShardIndex

    monkeypatch.setattr(plans, "process_memory_gb", lambda: 0.3)  # the process alike in every plan
    config, cpu = TrainConfig(model=tiny_model, data=learnable_shards, global_batch_size=16), torch.device("cpu")
    lengths = ShardIndex(learnable_shards).pair_lengths()
    least = plans.plan_run(replace(config, gradient_checkpointing="true"), 1, cpu, torch.float32)[0].peak_memory_gb
    monkeypatch.setattr(plans, "device_memory_gb", lambda device: least * 1.01 / plans.FIT_SHARE)
    assumed, note = plans.plan_run(config, 1, cpu, torch.float32)
    assert assumed.checkpointing != "none" and "--gradient-checkpointing auto" in note
    from_data, note = plans.plan_run(config, 1, cpu, torch.float32, lengths=lengths)
    assert from_data.checkpointing == "none" and note is None and from_data.tokens < assumed.tokens


@pytest.mark.slow
def test_the_plan_from_short_pairs_is_close_to_the_measured_peak(tiny_model, learnable_shards, tmp_path):
    """A two-step run of the small model (45 M parameters) on the short pairs, treg-train's default
    --micro-batch-tokens and --max-length: the plan it prints (from the data) within 30% of the peak it logs, where
    full forwards would plan several times that (peak RSS on a CPU, as pipelines/bench/memory_plan.py measures)."""
    from common import local_model

    from treg_train import plan as plans
    from treg_train.config import TrainConfig

    model = local_model(tmp_path, "small")  # the tiny model's tokenizer: the shards' ids are its own
    output = tmp_path / "run"
    result = run(train_command("--model", model, "--data", learnable_shards, "--output", output, "--max-steps", "2",
                               "--global-batch-size", "16", "--logging-steps", "1", "--save-steps", "0"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = re.search(r"memory plan: ([\d.]+) GB .*checkpointing: none; forwards of at most (\d+) tokens, from the "
                     r"data's lengths", result.stderr)
    assert line, result.stderr[-3000:]
    planned, tokens = float(line.group(1)), int(line.group(2))
    measured = max(m["peak_memory_gb"] for m in read_metrics(output) if "peak_memory_gb" in m)
    assert planned == pytest.approx(measured, rel=0.30), (planned, measured, tokens)
    full = plans.plan_run(TrainConfig(model=model, global_batch_size=16, gradient_checkpointing="false"), 1,
                          torch.device("cpu"), torch.float32, strict=False)[0]  # as before: full forwards
    assert full.tokens == 16384 and full.peak_memory_gb > 2 * measured, (full.line(), measured)
