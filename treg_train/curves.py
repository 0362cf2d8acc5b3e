"""Training curves: a run folder's metrics.jsonl drawn as one self-contained HTML page, with the
run's settings beside the charts. Each chart is inline SVG with one circle per logged step (its
value in `data-value` and a hover title); no script and nothing from the network, so the page
opens offline and reads the same in any browser."""

from __future__ import annotations

import html
import math
from pathlib import Path

import yaml

from treg_data.errors import UserError
from treg_train.metrics import read_metrics_file

# Charts in reading order; a metric not named here gets a chart of its own, so none is left out.
PANELS = [
    ("Loss", ["loss", "dpo_loss", "reg_loss"]),
    ("Reward accuracy", ["rewards/accuracies"]),
    ("Implicit rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
    ("Token-reward agreement", ["token_reward_agreement"]),
    ("Pair weights", ["mean_w", "wpo_weight"]),
    ("Log-probabilities", ["logps/chosen", "logps/rejected"]),
    ("Gradient norm", ["grad_norm"]),
    ("Learning rate", ["learning_rate"]),
    ("Tokens per second per device", ["tokens_per_second_per_device"]),
    ("Peak memory (GB)", ["peak_memory_gb"]),
]
NOT_DRAWN = {"step", "epoch"}
COLOURS = ["#1f6fb4", "#d1495b", "#2a9d4b", "#8a5cc2"]
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 470, 220, 76, 12, 12, 36


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run}; give a treg-train output folder")
    rows = read_metrics_file(path)
    if not rows:
        raise UserError(f"{path} is empty: the run has not logged a step yet")
    return rows


def panels(rows: list[dict]) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """(title, {series name: [(step, value), ...]}) per chart; `eval/x` is drawn beside `x`."""
    names = [name for name in dict.fromkeys(k for row in rows for k in row) if name not in NOT_DRAWN]
    charts = [(title, [n for m in metrics for n in (m, f"eval/{m}") if n in names]) for title, metrics in PANELS]
    shown = {n for _, series in charts for n in series}
    charts += [(name, [name]) for name in names if name not in shown]

    def points(name: str) -> list[tuple[int, float]]:
        return [(row["step"], float(row[name])) for row in rows
                if isinstance(row.get(name), (int, float)) and math.isfinite(row[name])]

    return [(title, {name: points(name) for name in series}) for title, series in charts if series]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def chart_svg(title: str, series: dict[str, list[tuple[int, float]]]) -> str:
    """One line chart; the axis labels are the data's own extremes, so every point can be read back."""
    values = [v for pts in series.values() for _, v in pts] or [0.0]
    steps = [s for pts in series.values() for s, _ in pts] or [0]
    lo, hi = min(values), max(values)
    if lo == hi:  # a flat line still needs a range
        lo, hi = lo - (abs(lo) * 0.1 or 1.0), hi + (abs(hi) * 0.1 or 1.0)
    first, last = min(steps), max(steps)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(step: int) -> float:
        return LEFT + (plot_w * (step - first) / (last - first) if last > first else plot_w / 2)

    def y(value: float) -> float:
        return TOP + plot_h * (hi - value) / (hi - lo)

    parts = [f'<svg class="chart" data-title="{html.escape(title)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" role="img">',
             f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="frame"/>']
    for value, anchor in ((hi, TOP + 4), (lo, TOP + plot_h)):
        parts.append(f'<text class="ytick" data-value="{value!r}" data-y="{y(value):.2f}" x="{LEFT - 6}" '
                     f'y="{anchor}" text-anchor="end">{_fmt(value)}</text>')
    for step, anchor in ((first, "start"), (last, "end")):
        parts.append(f'<text class="xtick" data-step="{step}" x="{x(step):.2f}" y="{HEIGHT - BOTTOM + 16}" '
                     f'text-anchor="{anchor}">step {step}</text>')
    for colour, (name, pts) in zip(COLOURS * 4, series.items()):
        line = " ".join(f"{x(s):.2f},{y(v):.2f}" for s, v in pts)
        parts.append(f'<g class="series" data-series="{html.escape(name)}" stroke="{colour}" fill="{colour}">'
                     f'<polyline points="{line}" fill="none" stroke-width="1.5"/>')
        parts += [f'<circle class="point" data-step="{s}" data-value="{v!r}" cx="{x(s):.2f}" cy="{y(v):.2f}" r="2.2">'
                  f"<title>{html.escape(name)} at step {s}: {_fmt(v)}</title></circle>" for s, v in pts]
        parts.append("</g>")
    parts.append("</svg>")
    legend = "".join(f'<span class="key" style="color:{colour}">■ {html.escape(name)}</span>'
                     for colour, name in zip(COLOURS * 4, series))
    return f'<figure><figcaption>{html.escape(title)} {legend}</figcaption>{"".join(parts)}</figure>'


def render_page(run: str | Path, rows: list[dict], settings: dict) -> str:
    title = f"treg-train curves: {Path(run).resolve().name}"
    training = [row for row in rows if "loss" in row] or rows  # evaluation writes lines of its own
    last = training[-1]
    summary = (f"{len(training)} logged step(s), last at step {last['step']}: loss {_fmt(last.get('loss', math.nan))}, "
               f"reward accuracy {_fmt(last.get('rewards/accuracies', math.nan))}")
    table = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in settings.items())
    charts = "".join(chart_svg(name, series) for name, series in panels(rows))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<p class="summary">{html.escape(summary)}</p><div class="layout"><main class="charts">{charts}</main>'
            f'<aside><h2>settings</h2><table class="settings">{table}</table></aside></div></body></html>\n')


def run_settings(run: str | Path) -> dict:
    path = Path(run) / "config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def write_curves(run: str | Path, output: str | Path | None = None) -> Path:
    target = Path(output) if output else Path(run) / "curves.html"
    page = render_page(run, read_metrics(run), run_settings(run))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(page, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write {target}: {err.strerror or err}") from None
    return target


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px;margin:0 0 4px}.summary{color:#555;margin:0 0 16px}
.layout{display:flex;gap:24px;align-items:flex-start}.charts{display:flex;flex-wrap:wrap;gap:16px;flex:1}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:8px}figcaption{font-weight:600;margin-bottom:4px}
.key{font-weight:400;font-size:12px;margin-left:10px}.frame{fill:#fafafa;stroke:#ccc}
text{font-size:11px;fill:#555}aside{min-width:260px}table{border-collapse:collapse;font-size:12px}
th{text-align:left;padding:2px 8px 2px 0;color:#555;font-weight:400}td{font-family:ui-monospace,monospace}
"""
