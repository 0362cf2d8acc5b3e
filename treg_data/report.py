"""The token-reward report of `treg-inspect`: each response's tokens coloured by r̂ (blue for
positive, red for negative), chosen and rejected side by side, like the paper's Figure 3; with the
shards of treg-score --dpo-model (and --reverse-dpo-model), the DPO model's token log-ratio (and the
contrast of the two) that TGDPO, SePO and TIS-DPO weight tokens by; with a trained checkpoint, its
implicit token rewards β·log π_θ/π_ref. One self-contained HTML file: inline CSS, no scripts, no network."""

from __future__ import annotations

import heapq
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from treg_core.contract import (
    SIDES,
    SIGNALS,
    check_column_types,
    column,
    open_shard,
    reading_shard,
    shard_files,
    side_columns,
)
from treg_core.errors import UserError
from treg_core.html import element, escape, page
from treg_data.reward_stats import RewardDistribution, histogram_svg, summary_line

COLUMNS = ["id", "prompt", "prompt_ids"] + [name for side in SIDES
                                           for name in side_columns(side, ("ids", "rewards", "ref_logps"))]
SHOWN_SIGNALS = [signal for signal in SIGNALS.values() if signal.shown_as]
OPTIONAL = [name for side in SIDES for name in side_columns(side, tuple(dict.fromkeys(
    n for signal in SHOWN_SIGNALS for n in signal.columns if n not in ("rewards", "ref_logps"))))]
SHOWN_PER_ID = 50  # pairs shown of one --id that many pairs share
# The rows a response can show, by kind: what each is, and the symbol of its values.
KINDS = {
    "rhat": ("self-generated token reward r̂", "r̂"),
    **{signal.shown_as: (signal.meaning, signal.symbol) for signal in SHOWN_SIGNALS},
    "implicit": ("implicit token reward of the trained policy", "β·log π_θ/π_ref"),
}


@dataclass
class ResponseView:
    tokens: list[str]
    rows: dict[str, np.ndarray]  # kind (KINDS) -> one value per token; "rhat" always

    @property
    def rewards(self) -> np.ndarray:
        return self.rows["rhat"]


@dataclass
class PairView:
    id: str
    prompt: list[dict]
    chosen: ResponseView
    rejected: ResponseView


def _rows(files: list[Path]):
    for file in files:
        parquet = open_shard(file)
        columns = COLUMNS + [name for name in OPTIONAL if name in parquet.schema_arrow.names]
        check_column_types(file, parquet.schema_arrow, columns)
        with reading_shard(file):  # a damaged page is found where the batch holding it is read
            for batch in parquet.iter_batches(batch_size=256, columns=columns):
                yield from batch.to_pylist()


def rows_by_id(data: str | Path, files: list[Path], ids: list[str]) -> list[dict]:
    """Every pair with one of `ids` (up to SHOWN_PER_ID each), in input order; where several share an id (the
    input repeated it), a line on stderr says how many and which are shown."""
    found: dict[str, list[dict]] = {i: [] for i in ids}
    counts = dict.fromkeys(ids, 0)
    for row in _rows(files):
        if row["id"] in found:
            counts[row["id"]] += 1
            if len(found[row["id"]]) < SHOWN_PER_ID:
                found[row["id"]].append(row)
    missing = [i for i, count in counts.items() if not count]
    if missing:
        raise UserError(f"no pair with id {', '.join(missing)} in {data}")
    for pair_id, count in counts.items():
        if count > 1:
            shown = f"all {count} are shown" if count <= SHOWN_PER_ID else f"the first {SHOWN_PER_ID} are shown"
            print(f"treg-inspect: {count} pairs share the id {pair_id!r} (the input repeats it): {shown}, in input "
                  "order", file=sys.stderr)
    return [row for rows in found.values() for row in rows]


def select_rows(data: str | Path, ids: list[str] | None = None, sample: int | None = None,
                extreme: int | None = None, seed: int = 0) -> list[dict]:
    """Pairs by id, a seeded random sample, or those with the largest |Σ r̂| (one pass, bounded memory)."""
    files = shard_files(data)
    if ids:
        return rows_by_id(data, files, ids)
    if extreme:
        score = lambda r: sum(abs(sum(r[column(side, "rewards")])) for side in SIDES)  # noqa: E731
        top = heapq.nlargest(extreme, ((score(r), n, r) for n, r in enumerate(_rows(files))))
        return [row for *_, row in top]
    rng, reservoir = random.Random(seed), []
    for n, row in enumerate(_rows(files)):  # reservoir sampling
        if len(reservoir) < (sample or 5):
            reservoir.append(row)
        elif (j := rng.randrange(n + 1)) < len(reservoir):
            reservoir[j] = row
    return reservoir


def token_texts(tokenizer, prefix_ids: list[int], ids: list[int]) -> list[str]:
    """Each token's text, decoded incrementally after a little of the prompt (for tokenizers whose
    decoding depends on the left context). A token that ends inside a multi-byte character shows
    nothing; the token completing the character shows all of it."""
    all_ids = list(prefix_ids[-8:])
    prefix_offset, read_offset = 0, len(all_ids)
    texts = []
    for token in ids:
        all_ids.append(token)
        before = tokenizer.decode(all_ids[prefix_offset:read_offset])
        after = tokenizer.decode(all_ids[prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            texts.append(after[len(before):])
            prefix_offset, read_offset = read_offset, len(all_ids)
        else:
            texts.append("")
    return texts


def build_views(rows: list[dict], tokenizer, implicit: list[tuple[np.ndarray, np.ndarray]] | None) -> list[PairView]:
    views = []
    for n, row in enumerate(rows):
        sides = []
        for k, side in enumerate(SIDES):
            rows = {"rhat": np.asarray(row[column(side, "rewards")], dtype=np.float64)}
            for signal in SHOWN_SIGNALS:
                if all(column(side, name) in row for name in signal.columns):
                    first, second = (np.asarray(row[column(side, name)], dtype=np.float64) for name in signal.columns)
                    rows[signal.shown_as] = first - second
            if implicit:
                rows["implicit"] = implicit[n][k]
            sides.append(ResponseView(token_texts(tokenizer, row["prompt_ids"], row[column(side, "ids")]), rows))
        views.append(PairView(row["id"], row["prompt"], *sides))
    return views


def implicit_rewards(checkpoint: str, rows: list[dict], beta: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """β · (log π_θ − log π_ref) per token, with π_θ from the checkpoint and π_ref from the shards."""
    from treg_data.scorers import EngineOptions
    from treg_data.scorers.hf_scorer import HFScorer

    scorer = HFScorer(EngineOptions(model=checkpoint, dtype="float32"))
    requests = [(row["prompt_ids"], row[column(side, "ids")]) for row in rows for side in SIDES]
    logps = scorer.score(requests)
    out = []
    for n, row in enumerate(rows):
        out.append(tuple(beta * (logps[2 * n + k] - np.asarray(row[column(side, "ref_logps")]))
                         for k, side in enumerate(SIDES)))
    return out


# ---- HTML --------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1a1a1a; }
h1 { font-size: 20px; } h2 { font-size: 15px; margin: 0 0 6px; }
.meta, .legend { font-size: 13px; color: #444; margin-bottom: 4px; }
.pair { border: 1px solid #ccc; border-radius: 6px; padding: 12px; margin: 16px 0; }
.prompt { background: #f6f6f6; padding: 8px; white-space: pre-wrap; font-size: 13px; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; margin-top: 8px; }
.side h3 { font-size: 14px; margin: 4px 0; }
.tokens { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; line-height: 1.7;
          border: 1px solid #eee; padding: 6px; margin-bottom: 6px; }
.label { font-size: 12px; color: #555; }
.tok { border-radius: 2px; }
.swatch { display: inline-block; padding: 0 6px; margin: 0 2px; }
"""


def _colour(value: float, scale: float) -> str:
    strength = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    rgb = "37,99,235" if value >= 0 else "220,38,38"  # blue: positive, red: negative
    return f"rgba({rgb},{0.85 * strength:.3f})"


def _tokens_html(tokens: list[str], values: np.ndarray, scale: float, kind: str, name: str) -> str:
    spans = "".join(element("span", escape(t), class_="tok", style=f"background:{_colour(v, scale)}",
                            title=f"{name} = {v:+.4f}") for t, v in zip(tokens, values))
    return element("div", spans, class_="tokens", data_kind=kind)


def _side_html(label: str, view: ResponseView, scales: dict[str, float]) -> str:
    heading, parts = label, []
    for kind, values in view.rows.items():
        what, symbol = KINDS[kind]
        heading += f" · Σ {symbol} = " + element("span", f"{values.sum():+.4f}", class_="sum", data_kind=kind)
        parts += [element("div", what, class_="label"), _tokens_html(view.tokens, values, scales[kind], kind, symbol)]
    return element("div", element("h3", heading) + "".join(parts), class_="side", data_side=label)


def _pair_html(view: PairView, scales: dict[str, float]) -> str:
    prompt = "\n\n".join(f"{m['role']}: {m['content']}" for m in view.prompt)
    sides = _side_html("chosen", view.chosen, scales) + _side_html("rejected", view.rejected, scales)
    return element("section", element("h2", f"pair {escape(view.id)}") + element("div", escape(prompt), class_="prompt")
                   + element("div", sides, class_="sides"), class_="pair", data_id=view.id)


def render_html(views: list[PairView], title: str, meta: dict[str, str],
                distribution: RewardDistribution | None = None) -> str:
    """The report as one HTML string. Colours saturate at the 99th percentile of |value|."""

    def scale(kind: str) -> float:
        values = [np.abs(getattr(v, side).rows[kind]) for v in views for side in SIDES if kind in getattr(v, side).rows]
        values = np.concatenate(values) if values else np.zeros(1)
        return float(np.quantile(values, 0.99)) if values.size else 0.0

    scales = {kind: scale(kind) for kind in KINDS}
    shown = [kind for kind in KINDS if views and kind in views[0].chosen.rows]
    meta_html = "".join(element("div", escape(f"{k}: {v}"), class_="meta") for k, v in meta.items())
    swatch = lambda value, text: element("span", text, class_="swatch", style=f"background:{_colour(value, 1)}")  # noqa: E731
    saturation = ", ".join(f"|{KINDS[kind][1]}| ≥ {scales[kind]:.4f}" for kind in shown or ["rhat"])
    legend = element("div", f"colour: {swatch(1, 'positive')}{swatch(-1, 'negative')} · full colour at "
                     f"{saturation} · hover a token for its value", class_="legend")
    overview = (element("section", element("h2", "r̂ over the whole dataset") + element(
        "p", escape(summary_line(distribution))) + histogram_svg(distribution), class_="distribution")
                if distribution else "")
    sections = "".join(_pair_html(view, scales) for view in views)
    return page(title, _CSS, meta_html + overview + legend + sections)
