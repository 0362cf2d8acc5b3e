"""treg-inspect's report, rendered by real headless Chromium."""

import html
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import render_in_chromium

from treg_data.report import token_texts


def _inspect(*args):
    return subprocess.run([sys.executable, "-m", "treg_data.inspect_cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_report_shows_pairs_tokens_and_sums(learnable_shards, tmp_path):
    rows = pq.read_table(Path(learnable_shards) / "data").to_pylist()
    chosen_ids = [rows[3]["id"], rows[50]["id"]]
    page = tmp_path / "report.html"
    result = _inspect(learnable_shards, "--id", chosen_ids[0], "--id", chosen_ids[1], "--output", str(page))
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained

    dom = render_in_chromium(page, tmp_path)
    sections = re.findall(r'<section class="pair" data-id="([^"]+)"', dom)
    assert sections == chosen_ids
    for row in (rows[3], rows[50]):
        section = dom.split(f'data-id="{row["id"]}"')[1].split("</section>")[0]
        for side in ("chosen", "rejected"):
            block = section.split(f'data-side="{side}"')[1]
            tokens = re.search(r'<div class="tokens" data-kind="rhat">(.*?)</div>', block).group(1)
            spans = re.findall(r'<span class="tok" style="background:rgba\([^)]*\)" title="r̂ = ([-+0-9.]+)">', tokens)
            assert len(spans) == len(row[f"{side}_ids"])
            assert [float(s) for s in spans] == pytest.approx(row[f"{side}_rewards"], abs=1e-4)
            shown_sum = float(re.search(r'class="sum" data-kind="rhat">([-+0-9.]+)<', block).group(1))
            assert shown_sum == pytest.approx(sum(row[f"{side}_rewards"]), abs=1e-4)
        assert html.escape(row["chosen"][0]["content"]) in re.sub(r"<[^>]+>", "", section)


def test_report_with_a_checkpoint_shows_implicit_rewards(learnable_shards, tiny_model, tmp_path):
    page = tmp_path / "extreme.html"
    result = _inspect(learnable_shards, "--extreme", "2", "--checkpoint", tiny_model, "--beta", "0.1",
                      "--output", str(page))
    assert result.returncode == 0, result.stderr
    dom = render_in_chromium(page, tmp_path)
    assert len(re.findall(r'<section class="pair"', dom)) == 2
    assert dom.count('data-kind="implicit"') == 2 * 2 * 2  # a sum and a token row per side
    # The checkpoint is the reference model itself: every implicit reward is ~0.
    implicit = [float(v) for v in re.findall(r'title="β·log π_θ/π_ref = ([-+0-9.]+)"', dom)]
    assert implicit and max(abs(v) for v in implicit) < 1e-3


def test_unknown_id_and_conflicting_choices_are_one_line(learnable_shards):
    result = _inspect(learnable_shards, "--id", "no-such-pair")
    assert result.returncode == 2 and "no pair with id no-such-pair" in result.stderr
    result = _inspect(learnable_shards, "--random", "2", "--extreme", "2")
    assert result.returncode == 2 and "one of --id, --random or --extreme" in result.stderr


def test_token_texts_keep_split_characters_whole(tokenizer):
    text = "Ünïcode → 数学 🙂 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_texts(tokenizer, [], ids)
    assert "".join(pieces) == text and len(pieces) == len(ids)


def test_reward_distribution_matches_the_rows(learnable_shards):
    from treg_data.reward_stats import reward_distribution, shown_histogram

    rows = pq.read_table(Path(learnable_shards) / "data").to_pylist()
    dist = reward_distribution(sorted((Path(learnable_shards) / "data").glob("*.parquet")))
    for side in ("chosen", "rejected"):
        values = [v for row in rows for v in row[f"{side}_rewards"]]
        assert dist.tokens(side) == len(values)
        assert dist.share_positive(side) == sum(v > 0 for v in values) / len(values)
        assert dist.mean_sum(side) == pytest.approx(sum(sum(row[f"{side}_rewards"]) for row in rows) / len(rows))
    labels, shares = shown_histogram(dist)
    assert len(labels) == 10 and all(s.sum() == pytest.approx(1.0) for s in shares.values())
    left, right = float(labels[0].split()[-1]), float(labels[-1].split()[-1])  # "< -0.008", "≥ +0.008"
    for side in ("chosen", "rejected"):  # the end bins hold the tails
        values = [v for row in rows for v in row[f"{side}_rewards"]]
        assert shares[side][0] == pytest.approx(sum(v < left for v in values) / len(values), abs=2 / len(values))
        assert shares[side][-1] == pytest.approx(sum(v >= right for v in values) / len(values), abs=2 / len(values))


def test_report_shows_the_reward_distribution(learnable_shards, tmp_path):
    page = tmp_path / "report.html"
    assert _inspect(learnable_shards, "--random", "1", "--output", str(page)).returncode == 0
    dom = render_in_chromium(page, tmp_path)
    rows = pq.read_table(Path(learnable_shards) / "data").to_pylist()
    values = [v for row in rows for side in ("chosen", "rejected") for v in row[f"{side}_rewards"]]
    assert f"{len(values):,} response tokens, {sum(v > 0 for v in values) / len(values):.1%} with r̂ &gt; 0" in dom
    for side in ("chosen", "rejected"):
        bars = [float(s) for s in
                re.findall(rf'class="bar" data-side="{side}" data-bin="\d+" data-share="([^"]+)"', dom)]
        assert len(bars) == 10 and sum(bars) == pytest.approx(1.0)


def test_report_shows_the_dpo_models_token_signals(tiny_model, tmp_path):
    """With the shards of --dpo-model and --reverse-dpo-model, each response also shows log π_dpo/π_ref (TGDPO's and
    SePO's signal) and log π_dpo/π_rev (TIS-DPO's), token by token."""
    from helpers import hf_score_config, make_pairs, perturbed_copy, write_jsonl

    from treg_data import pipeline

    folder = tmp_path / "scored"
    pipeline.run(hf_score_config(tiny_model, write_jsonl(tmp_path / "pairs.jsonl", make_pairs(3)), folder,
                                 dpo_model=perturbed_copy(tiny_model, tmp_path / "dpo", seed=1),
                                 reverse_dpo_model=perturbed_copy(tiny_model, tmp_path / "reverse", seed=2)))
    page = tmp_path / "report.html"
    assert _inspect(str(folder), "--random", "3", "--output", str(page)).returncode == 0
    dom = render_in_chromium(page, tmp_path)
    for row in pq.read_table(folder / "data").to_pylist():
        section = dom.split(f'data-id="{row["id"]}"')[1].split("</section>")[0]
        for side in ("chosen", "rejected"):
            block = section.split(f'data-side="{side}"')[1]
            for kind, symbol, values in (
                    ("dpo", "log π_dpo/π_ref", np.subtract(row[f"{side}_dpo_logps"], row[f"{side}_ref_logps"])),
                    ("contrast", "log π_dpo/π_rev",
                     np.subtract(row[f"{side}_dpo_logps"], row[f"{side}_rev_dpo_logps"]))):
                tokens = re.search(rf'<div class="tokens" data-kind="{kind}">(.*?)</div>', block).group(1)
                shown = [float(v) for v in re.findall(rf'title="{re.escape(symbol)} = ([-+0-9.]+)"', tokens)]
                assert shown == pytest.approx(values, abs=1e-4) and np.abs(values).max() > 1e-3


@pytest.mark.parametrize("args, expected", [
    (["--random", "0"], "'--random': 0 is not in the range x>=1"),
    (["--extreme", "-1"], "'--extreme': -1 is not in the range x>=1"),
    (["--beta", "nan"], "--beta nan: it must be a positive number"),
])
def test_counts_and_beta_that_show_nothing_are_refused(learnable_shards, tmp_path, args, expected):
    result = _inspect(learnable_shards, *args, "--output", tmp_path / "report.html")
    assert result.returncode == 2 and expected in result.stderr
    assert not (tmp_path / "report.html").exists()


def test_a_run_folder_as_checkpoint_names_its_model(learnable_shards, tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    result = _inspect(learnable_shards, "--checkpoint", tmp_path / "run", "--output", tmp_path / "report.html")
    assert result.returncode == 2
    assert f"--checkpoint {tmp_path / 'run'} is a treg-train run folder; give its model, {tmp_path / 'run' / 'final'}" \
        in result.stderr


def test_the_report_of_a_data_folder_goes_beside_the_manifest(learnable_shards, tmp_path):
    import shutil

    folder = Path(shutil.copytree(learnable_shards, tmp_path / "scored"))
    result = _inspect(folder / "data", "--random", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (folder / "report.html").is_file() and not (folder / "data" / "report.html").exists()
