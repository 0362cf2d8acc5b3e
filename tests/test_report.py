"""treg-inspect's report, rendered by real headless Chromium."""

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from treg_data.report import token_texts

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _render(page: Path, tmp_path: Path) -> str:
    """The DOM after Chromium has loaded the page (the network is off: the page must need none)."""
    assert Path(CHROMIUM).exists(), "headless Chromium is needed: apt-get install chromium"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _inspect(*args):
    return subprocess.run([sys.executable, "-m", "treg_data.inspect_cli", *args], capture_output=True, text=True, timeout=300)


def test_report_shows_pairs_tokens_and_sums(learnable_shards, tmp_path):
    rows = pq.read_table(Path(learnable_shards) / "data").to_pylist()
    chosen_ids = [rows[3]["id"], rows[50]["id"]]
    page = tmp_path / "report.html"
    result = _inspect(learnable_shards, "--id", chosen_ids[0], "--id", chosen_ids[1], "--output", str(page))
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained

    dom = _render(page, tmp_path)
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
    result = _inspect(learnable_shards, "--extreme", "2", "--checkpoint", tiny_model, "--beta", "0.1", "--output", str(page))
    assert result.returncode == 0, result.stderr
    dom = _render(page, tmp_path)
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
