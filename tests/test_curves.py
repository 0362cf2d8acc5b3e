"""treg-curves: a run's metrics.jsonl drawn as inline SVG, checked in real headless Chromium."""

import json
import random
import re
import subprocess
import sys

import pytest
import yaml
from helpers import render_in_chromium

from treg_train.curves import PANELS

NAMES = [name for _, names in PANELS for name in names] + ["skipped_too_long"]


@pytest.fixture
def run(tmp_path):
    rng = random.Random(0)
    folder = tmp_path / "run"
    folder.mkdir()
    rows = [{"step": step, **{name: rng.uniform(-3, 3) for name in NAMES}, "epoch": 0} for step in (2, 4, 6, 7)]
    rows[1]["eval/loss"], rows[3]["eval/loss"] = 0.61, 0.55
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "config.yaml").write_text(yaml.safe_dump({"loss": "dpo_reg", "alpha": 0.25, "learning_rate": 5e-7}))
    return folder, rows


def _charts(dom: str) -> dict[str, str]:
    return dict(re.findall(r'<svg class="chart" data-title="([^"]+)"(.*?)</svg>', dom, re.S))


def test_curves_page_draws_every_metric_at_every_logged_step(run, tmp_path):
    folder, rows = run
    result = subprocess.run([sys.executable, "-m", "treg_train.curves_cli", str(folder)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    page = folder / "curves.html"
    assert str(page) in result.stdout
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # opens offline

    charts = _charts(render_in_chromium(page, tmp_path))
    assert list(charts) == [title for title, _ in PANELS] + ["skipped_too_long"]
    drawn = set()
    for _title, svg in charts.items():
        ticks = {float(v): float(y) for v, y in re.findall(r'class="ytick" data-value="([^"]+)" data-y="([^"]+)"', svg)}
        (hi, y_hi), (lo, y_lo) = sorted(ticks.items(), reverse=True)
        series = re.findall(r'<g class="series" data-series="([^"]+)"(.*?)</g>', svg, re.S)
        values = []
        for name, body in series:
            drawn.add(name)
            points = [(int(s), float(v), float(cy)) for s, v, cy in
                      re.findall(r'class="point" data-step="(\d+)" data-value="([^"]+)" cx="[^"]+" cy="([^"]+)"', body)]
            logged = [(row["step"], row[name]) for row in rows if name in row]
            assert [(s, v) for s, v, _ in points] == logged  # one point per logged step, its exact value
            for _, value, cy in points:  # read back through the axis labels
                assert hi + (cy - y_hi) * (lo - hi) / (y_lo - y_hi) == pytest.approx(value, abs=0.01 * (hi - lo))
            values += [v for _, v in logged]
        assert (hi, lo) == pytest.approx((max(values), min(values)))
    assert drawn == set(NAMES) | {"eval/loss"}
    assert re.search(r'data-series="eval/loss"', charts["Loss"])
    assert re.search(r"<th>alpha</th><td>0.25</td>", text)


def test_the_summary_is_the_last_training_line_even_after_an_evaluation(run):
    from treg_train.curves import render_page

    folder, rows = run
    page = render_page(folder, rows + [{"step": rows[-1]["step"], "eval/loss": 0.5}], {})
    assert f"{len(rows)} logged step(s), last at step {rows[-1]['step']}: loss {rows[-1]['loss']:.4g}" in page


def test_a_line_cut_off_by_a_kill_is_left_out_by_the_page_and_by_resume(run):
    from treg_train.curves import read_metrics
    from treg_train.metrics import MetricSink

    folder, rows = run
    with open(folder / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 8, "loss": 0.4')  # a kill in the middle of a write
    assert read_metrics(folder) == rows
    MetricSink(folder, "none", {}, enabled=True).truncate_after(4)
    assert read_metrics(folder) == [row for row in rows if row["step"] <= 4]


def test_a_folder_without_metrics_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "treg_train.curves_cli", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no metrics.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_a_page_never_replaces_a_file_treg_reads(run, learnable_shards):
    folder, _ = run
    metrics = (folder / "metrics.jsonl").read_bytes()
    result = subprocess.run([sys.executable, "-m", "treg_train.curves_cli", str(folder), "--output",
                             str(folder / "metrics.jsonl")], capture_output=True, text=True)
    assert result.returncode == 2 and "give the path of an .html file" in result.stderr
    assert (folder / "metrics.jsonl").read_bytes() == metrics
    from pathlib import Path

    manifest = Path(learnable_shards) / "manifest.json"
    before = manifest.read_bytes()
    result = subprocess.run([sys.executable, "-m", "treg_data.inspect_cli", learnable_shards, "--output",
                             str(manifest)], capture_output=True, text=True)
    assert result.returncode == 2 and "give the path of an .html file" in result.stderr
    assert manifest.read_bytes() == before and "Traceback" not in result.stderr


def test_a_damaged_metrics_file_is_one_line(run):
    folder, _ = run
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n\x01garbage\n')
    result = subprocess.run([sys.executable, "-m", "treg_train.curves_cli", str(folder)], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "line 2, is not a metrics line" in result.stderr
    assert "Traceback" not in result.stderr
