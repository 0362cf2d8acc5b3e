"""Training curves: a run folder's metrics.jsonl drawn as one self-contained HTML page (treg_core.html),
with the run's settings beside the charts. Each chart is inline SVG with one circle per logged step
(its value in `data-value` and a hover title)."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from treg_core.atomic import write_text
from treg_core.errors import UserError
from treg_core.html import element, escape, page, page_path, svg
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

    def x(step: int) -> str:
        return f"{LEFT + (plot_w * (step - first) / (last - first) if last > first else plot_w / 2):.2f}"

    def y(value: float) -> str:
        return f"{TOP + plot_h * (hi - value) / (hi - lo):.2f}"

    parts = [element("rect", x=LEFT, y=TOP, width=plot_w, height=plot_h, class_="frame")]
    parts += [element("text", _fmt(value), class_="ytick", data_value=repr(value), data_y=y(value), x=LEFT - 6,
                      y=anchor, text_anchor="end") for value, anchor in ((hi, TOP + 4), (lo, TOP + plot_h))]
    parts += [element("text", f"step {step}", class_="xtick", data_step=step, x=x(step), y=HEIGHT - BOTTOM + 16,
                      text_anchor=anchor) for step, anchor in ((first, "start"), (last, "end"))]
    for colour, (name, pts) in zip(COLOURS * 4, series.items()):
        line = element("polyline", points=" ".join(f"{x(s)},{y(v)}" for s, v in pts), fill="none", stroke_width=1.5)
        points = "".join(element("circle", element("title", escape(f"{name} at step {s}: {_fmt(v)}")), class_="point",
                                 data_step=s, data_value=repr(v), cx=x(s), cy=y(v), r=2.2) for s, v in pts)
        parts.append(element("g", line + points, class_="series", data_series=name, stroke=colour, fill=colour))
    legend = "".join(element("span", escape(f"■ {name}"), class_="key", style=f"color:{colour}")
                     for colour, name in zip(COLOURS * 4, series))
    return element("figure", element("figcaption", f"{escape(title)} {legend}")
                   + svg(WIDTH, HEIGHT, "".join(parts), class_="chart", data_title=title))


def render_page(run: str | Path, rows: list[dict], settings: dict) -> str:
    title = f"treg-train curves: {Path(run).resolve().name}"
    training = [row for row in rows if "loss" in row] or rows  # evaluation writes lines of its own
    last = training[-1]
    summary = (f"{len(training)} logged step(s), last at step {last['step']}: loss {_fmt(last.get('loss', math.nan))}, "
               f"reward accuracy {_fmt(last.get('rewards/accuracies', math.nan))}")
    table = "".join(element("tr", element("th", escape(str(k))) + element("td", escape(str(v))))
                    for k, v in settings.items())
    charts = "".join(chart_svg(name, series) for name, series in panels(rows))
    return page(title, _CSS, element("p", escape(summary), class_="summary") + element(
        "div", element("main", charts, class_="charts") + element(
            "aside", element("h2", "settings") + element("table", table, class_="settings")), class_="layout"))


def run_settings(run: str | Path) -> dict:
    path = Path(run) / "config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def write_curves(run: str | Path, output: str | Path | None = None) -> Path:
    target = page_path(output) if output else Path(run) / "curves.html"
    try:
        write_text(target, render_page(run, read_metrics(run), run_settings(run)))
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
