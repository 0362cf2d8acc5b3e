"""How r̂ is distributed over a scored dataset: whether the revision prompts separate anything on
this data, seen before paying for training. One streaming pass over the reward columns (a row
group at a time), so any dataset size fits in memory.

Reported: a histogram of r̂ over every response token, chosen and rejected apart; the share of
tokens with r̂ > 0; and the mean per-response sum Σ_t r̂_t for chosen and for rejected responses
(T-REG expects chosen > rejected). Tokens are counted on fine fixed bins over r̂'s whole range
[-0.5, 0.5]; the histogram shown zooms to a symmetric range holding 99.5% of them, the tails
folded into its end bins, because r̂ is usually small and wide bins would show one bar.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from treg_core.contract import SIDES, column, open_shard, reading_shard
from treg_core.html import element, escape, svg

FINE_BINS = 1000  # of width 0.001 over [-0.5, 0.5], where r̂ = ½·tanh(·) lies
FINE_EDGES = np.linspace(-0.5, 0.5, FINE_BINS + 1)
SHOWN_RANGES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # each a multiple of 5 fine bins
SHOWN_BINS = 10


@dataclass
class RewardDistribution:
    counts: dict[str, np.ndarray]  # side -> tokens per bin of FINE_EDGES
    positive: dict[str, int]  # side -> tokens with r̂ > 0
    sum_total: dict[str, float]  # side -> Σ over responses of Σ_t r̂_t
    responses: int  # pairs counted (each has one response per side)

    def tokens(self, side: str | None = None) -> int:
        return int(sum(self.counts[s].sum() for s in ([side] if side else SIDES)))

    def share_positive(self, side: str | None = None) -> float:
        positive = sum(self.positive[s] for s in ([side] if side else SIDES))
        return positive / max(self.tokens(side), 1)

    def mean_sum(self, side: str) -> float:
        return self.sum_total[side] / max(self.responses, 1)


def reward_distribution(files: list[Path], name: str = "rewards") -> RewardDistribution:
    counts = {side: np.zeros(FINE_BINS, dtype=np.int64) for side in SIDES}
    positive, sum_total, responses = dict.fromkeys(SIDES, 0), dict.fromkeys(SIDES, 0.0), 0
    for file in files:
        shard = open_shard(file)
        for group in range(shard.num_row_groups):
            with reading_shard(file):
                table = shard.read_row_group(group, columns=[column(side, name) for side in SIDES])
            responses += table.num_rows
            for side in SIDES:
                values = pc.list_flatten(table.column(column(side, name))).to_numpy().astype(np.float64)
                counts[side] += np.histogram(values, bins=FINE_EDGES)[0]
                positive[side] += int((values > 0).sum())
                sum_total[side] += float(values.sum())
    return RewardDistribution(counts, positive, sum_total, responses)


def shown_histogram(dist: RewardDistribution) -> tuple[list[str], dict[str, np.ndarray]]:
    """(bin labels, side -> share of that side's tokens per bin) over the smallest range of
    SHOWN_RANGES holding 99.5% of all tokens, the tails folded into the end bins."""
    total = dist.counts["chosen"] + dist.counts["rejected"]
    centre = FINE_BINS // 2
    width = next((r for r in SHOWN_RANGES if total[centre - round(r * FINE_BINS):centre + round(r * FINE_BINS)].sum()
                  >= 0.995 * total.sum()), SHOWN_RANGES[-1])
    half = round(width * FINE_BINS)  # fine bins on each side of 0
    step = 2 * half // SHOWN_BINS
    cuts = [centre - half + n * step for n in range(SHOWN_BINS + 1)]
    cuts[0], cuts[-1] = 0, FINE_BINS
    shares = {side: np.array([dist.counts[side][a:b].sum() for a, b in zip(cuts[:-1], cuts[1:])])
              / max(dist.tokens(side), 1) for side in SIDES}
    edges = [float(FINE_EDGES[centre - half + n * step]) for n in range(SHOWN_BINS + 1)]
    def fmt(value: float) -> str:
        return f"{value:+g}" if abs(value) > 1e-12 else "0"

    labels = ([f"< {fmt(edges[1])}"] + [f"[{fmt(a)}, {fmt(b)})" for a, b in zip(edges[1:-2], edges[2:-1])]
              + [f"≥ {fmt(edges[-2])}"])
    return labels, shares


def summary_line(dist: RewardDistribution) -> str:
    return (f"{dist.tokens():,} response tokens, {dist.share_positive():.1%} with r̂ > 0 "
            f"(chosen {dist.share_positive('chosen'):.1%}, rejected {dist.share_positive('rejected'):.1%}); "
            f"mean Σ r̂ per response: chosen {dist.mean_sum('chosen'):+.3f}, rejected {dist.mean_sum('rejected'):+.3f}")


def markdown_table(dist: RewardDistribution) -> str:
    """The histogram as a Markdown table: share of each side's tokens per bin, with a bar."""
    rows = ["| r̂ | chosen | rejected |", "|---|---|---|"]
    labels, shares = shown_histogram(dist)
    for label, c, r in zip(labels, shares["chosen"], shares["rejected"]):
        rows.append(f"| `{label}` | {c:6.1%} {'█' * round(c * 40)} | {r:6.1%} {'█' * round(r * 40)} |")
    return "\n".join(rows)


def histogram_svg(dist: RewardDistribution) -> str:
    """The shown histogram as inline SVG: per bin, the share of chosen and of rejected tokens."""
    width, height, left, bottom, top = 720, 180, 30, 36, 8
    labels, shares = shown_histogram(dist)
    peak = max(float(max(v.max() for v in shares.values())), 1e-9)
    slot = (width - 2 * left) / len(labels)
    colours = {"chosen": "#2a9d8f", "rejected": "#e9a03b"}
    parts = []
    for n, label in enumerate(labels):
        x = left + n * slot
        for k, side in enumerate(SIDES):
            share = float(shares[side][n])
            bar = (height - bottom - top) * share / peak
            title = element("title", escape(f"{side}, r̂ {label}: {share:.1%}"))
            parts.append(element("rect", title, class_="bar", data_side=side, data_bin=n, data_share=repr(share),
                                 x=f"{x + 3 + k * (slot - 6) / 2:.1f}", y=f"{height - bottom - bar:.1f}",
                                 width=f"{(slot - 6) / 2:.1f}", height=f"{bar:.1f}", fill=colours[side]))
        if n:  # the edge between two bins
            parts.append(element("text", escape(label.split(",")[0].lstrip("[≥ ")), x=f"{x:.1f}",
                                 y=height - bottom + 13, text_anchor="middle", font_size=10))
    key = " ".join(element("tspan", f"■ {side}", fill=colours[side]) for side in SIDES)
    parts.append(element("text", f"r̂ (the end bins hold the tails) · bar: share of the side's tokens · {key}",
                         x=left, y=height - 6, font_size=10))
    return svg(width, height, "".join(parts), class_="histogram")
