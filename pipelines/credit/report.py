"""The credit benchmark's tables and plot, from each seed's results.

Every figure is a mean over seeds with the half-width of its 95% Student-t interval; a paired
difference (say DPO + T-REG − DPO) is taken per seed first, on the same pairs and held-out
prompts, and its interval is that of the per-seed differences.
"""

from __future__ import annotations

import math

import numpy as np

LABELS = {
    "dpo": "DPO",
    "dpo_reg": "DPO + T-REG",
    "simpo": "SimPO",
    "simpo_reg": "SimPO + T-REG",
    "wpo": "WPO",
    "wpo_reg": "WPO + T-REG",
    "dporeward_reg": "DPO + DPO-reward reg.",
    "dpo_reg_static": "DPO + T-REG, static weight (w = 1)",
    "sft_chosen": "DPO + SFT on chosen",
    "d2po": "D²PO",
    "confpo": "ConfPO",
    "tgdpo": "TGDPO",
    "tis_dpo": "TIS-DPO (T-REG's prompts)",
    "tis_dpo_models": "TIS-DPO (DPO / reverse-DPO models)",
    "sepo": "SePO",
    "tdpo2": "TDPO2 (reference in memory)",
    "otpo": "OTPO",
    "cdpo": "cDPO (DPO / reverse-DPO models as positive / negative)",
}
# (regularized, its base): the differences the benchmark is about.
PAIRED = (("dpo_reg", "dpo"), ("simpo_reg", "simpo"), ("wpo_reg", "wpo"), ("dporeward_reg", "dpo"))
METRICS = (("implicit_hard_auroc", "hard-token AUROC"), ("implicit_auroc", "all-token AUROC"),
           ("sampled_success", "sampled success"), ("greedy_success", "greedy success"))
PRIMARY = "implicit_hard_auroc"  # the α grid goes where DPO + T-REG − DPO is largest on this
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for a single seed)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), T_975.get(len(values) - 1, 1.96) * float(values.std(ddof=1)) / math.sqrt(len(values))


def mean_pm(values: list[float]) -> str:
    mean, half = interval(values)
    return f"{mean:.3f} ± {half:.3f}"


def difference(values: list[float]) -> str:
    mean, half = interval(values)
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


def metric(per_seed: dict, key: str, name: str) -> list[float]:
    return [per_seed[s][key][name] for s in sorted(per_seed) if key in per_seed[s]]


def paired(per_seed: dict, regime: str, better: str, base: str, name: str) -> list[float]:
    """Per-seed differences, over the seeds that have both."""
    return [per_seed[s][f"{regime}/{better}"][name] - per_seed[s][f"{regime}/{base}"][name] for s in sorted(per_seed)
            if f"{regime}/{better}" in per_seed[s] and f"{regime}/{base}" in per_seed[s]]


def largest_difference_regime(per_seed: dict, regimes: dict) -> str:
    """The regime where |DPO + T-REG − DPO| on the primary metric is largest, on average over seeds
    (the first in order among equals)."""
    return max(regimes, key=lambda r: abs(np.mean(paired(per_seed, r, "dpo_reg", "dpo", PRIMARY) or [0.0])))


def reference_key(lengths: tuple[int, ...]) -> str:
    return f"reference/{lengths[0]}-{lengths[-1]}"


def comparisons(settings, methods: list[str]) -> list[tuple[str, str]]:
    """The paired differences a study reports: every method against DPO, or each regularized method against its
    base."""
    if settings.against_dpo:
        return [(method, "dpo") for method in methods if method != "dpo" and "dpo" in methods]
    return [(better, base) for better, base in PAIRED if better in methods and base in methods]


def tables(per_seed: dict, settings, methods: list[str]) -> str:
    seeds = sorted(per_seed)
    lines = [f"world '{settings.world}'; seeds {', '.join(map(str, seeds))}; mean ± half-width of the 95% t-interval "
             "over seeds", "",
             "stage one: how well a per-token score separates bad tokens from good ones (AUROC, 0.5 = chance; "
             "hard = the steps where a misconception of the starting policy applies)", "",
             "| pool | pairs | swapped | judge, best / worst answer | r̂ AUROC | r̂ hard AUROC | log π_ref AUROC "
             "| log π_ref hard AUROC |", "|---|---|---|---|---|---|---|---|"]
    for name, pool in settings.pools.items():
        key = f"stage_one/{name}"
        lines.append(f"| {name} ({pool.lengths[0]}-{pool.lengths[-1]} numbers) | {pool.pairs} | "
                     f"{np.mean(metric(per_seed, key, 'swapped')):.0f} | "
                     f"{np.mean(metric(per_seed, key, 'judge_chosen')):.2f} / "
                     f"{np.mean(metric(per_seed, key, 'judge_rejected')):.2f} | "
                     + " | ".join(mean_pm(metric(per_seed, key, m)) for m in
                                  ("rhat_auroc", "rhat_hard_auroc", "ref_logp_auroc", "ref_logp_hard_auroc")) + " |")
    header = " | ".join(label for _, label in METRICS)
    lines += ["", "after training, on held-out prompts", "", f"| regime | method | {header} |",
              "|---|---|" + "---|" * len(METRICS)]
    for regime_name, regime in settings.regimes.items():
        reference = reference_key(settings.pools[regime.pool].lengths)
        successes = [mean_pm(metric(per_seed, reference, m)) for m in ("sampled_success", "greedy_success")]
        lines.append(f"| {regime_name} | starting policy | — | — | {' | '.join(successes)} |")
        for method in methods:
            key = f"{regime_name}/{method}"
            lines.append(f"| {regime_name} | {LABELS[method]} | "
                         + " | ".join(mean_pm(metric(per_seed, key, m)) for m, _ in METRICS) + " |")
    lines += ["", "paired differences, per seed on the same pairs and prompts: mean [95% interval]", "",
              f"| regime | difference | {header} |", "|---|---|" + "---|" * len(METRICS)]
    for regime_name in settings.regimes:
        for better, base in comparisons(settings, methods):
            lines.append(f"| {regime_name} | {LABELS[better]} − {LABELS[base]} | " + " | ".join(
                difference(paired(per_seed, regime_name, better, base, m)) for m, _ in METRICS) + " |")
    lines += alpha_table(per_seed, settings)
    return "\n".join(lines)


def alpha_table(per_seed: dict, settings) -> list[str]:
    graded = {key.split("/")[0] for s in per_seed for key in per_seed[s] if "@" in key}
    lines = []
    for regime in [name for name in settings.regimes if name in graded]:
        alphas = sorted({float(k.split("@")[1]) for s in per_seed for k in per_seed[s] if k.startswith(f"{regime}/")
                         and "@" in k})
        rows = [(0.0, "dpo"), (0.25, "dpo_reg")] + [(a, f"dpo_reg@{a}") for a in alphas]
        shifts = ("implicit_auroc", "sampled_success")
        lines += ["", f"α grid, DPO + T-REG in {regime} (α = 0 is DPO; 0.25 is the default)", "",
                  "| α | " + " | ".join(label for _, label in METRICS)
                  + "".join(f" | Δ {dict(METRICS)[m]} vs DPO" for m in shifts) + " |",
                  "|---|" + "---|" * (len(METRICS) + len(shifts))]
        for alpha, method in sorted(rows):
            key = f"{regime}/{method}"
            lines.append(f"| {alpha:g} | " + " | ".join(mean_pm(metric(per_seed, key, m)) for m, _ in METRICS)
                         + "".join(f" | {difference(paired(per_seed, regime, method, 'dpo', m))}" for m in shifts)
                         + " |")
    return lines


def plot(per_seed: dict, settings, methods: list[str], path) -> None:
    """Learning curves over the number of pairs (the short pool's regimes), with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = sorted((regime.pairs, name) for name, regime in settings.regimes.items() if regime.pool == "short")
    sizes = [n for n, _ in curve]
    figure, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4.2), constrained_layout=True)
    for ax, (name, label) in zip(axes, METRICS):
        for method in methods:
            stats = [interval(metric(per_seed, f"{regime}/{method}", name)) for _, regime in curve]
            means, halves = np.array([m for m, _ in stats]), np.nan_to_num([h for _, h in stats])
            style = "-" if method.endswith("_reg") else "--"
            line, = ax.plot(sizes, means, style, marker="o", markersize=3, label=LABELS[method])
            ax.fill_between(sizes, means - halves, means + halves, color=line.get_color(), alpha=0.12)
        if name.endswith("success"):
            reference = np.mean(metric(per_seed, reference_key(settings.pools["short"].lengths), name))
            ax.axhline(reference, color="grey", linestyle=":", label="starting policy")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("preference pairs (one epoch)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"credit benchmark, short answers: mean and 95% interval over {len(per_seed)} seed(s)")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def forest(studies: dict, path) -> None:
    """Every method's paired difference from DPO with its 95% interval, one panel per metric, one row per method
    and a marker per regime of every study ({name: (per_seed, settings, methods)})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [(name, regime) for name, (_, settings, _) in studies.items() for regime in settings.regimes]
    methods = list(dict.fromkeys(m for _, _, ms in studies.values() for m in ms if m != "dpo"))
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.6 * len(METRICS), 0.5 * len(methods) + 1.6),
                                sharey=True, constrained_layout=True)
    offsets = np.linspace(-0.25, 0.25, len(regimes)) if len(regimes) > 1 else [0.0]
    for ax, (name, label) in zip(axes, METRICS):
        for offset, (study, regime) in zip(offsets, regimes):
            per_seed = studies[study][0]
            stats = [interval(paired(per_seed, regime, method, "dpo", name) or [math.nan]) for method in methods]
            means, halves = np.array([m for m, _ in stats]), np.nan_to_num([h for _, h in stats])
            ax.errorbar(means, np.arange(len(methods)) + offset, xerr=halves, fmt="o", markersize=4, capsize=2,
                        label=f"{study} {regime}")
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_title(f"{label}: method − DPO")
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(methods)), [LABELS[m] for m in methods])
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=7, loc="lower right")
    seeds = len(next(iter(studies.values()))[0])
    figure.suptitle(f"token-level methods against DPO: paired difference, mean and 95% interval over {seeds} seeds")
    figure.savefig(path, dpi=110)
    plt.close(figure)
