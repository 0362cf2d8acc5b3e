"""The training objectives as data. Each `--loss` is a row of METHODS: the parts its loss is built from, the
defaults its authors train with, and what it needs; each token weighting is a row of WEIGHTINGS, with the shard
columns it reads. treg_train/losses.py holds the math each part names; the settings (config.py), the checks
before a run (preflight.py), the step (step.py) and `treg-train --help` read these tables, so a new method is a
row here plus its math there (docs/METHOD.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A loss's family: the margin of the summed log-ratios to the reference (DPO), or of the policy's mean log-prob
# over the tokens, which needs no reference (SimPO).
REFERENCE, REFERENCE_FREE = "reference-based", "reference-free"


@dataclass(frozen=True)
class Method:
    """One `--loss`."""

    name: str
    summary: str  # what it is, for --help
    family: str  # REFERENCE or REFERENCE_FREE
    beta: float  # default β
    gamma: float | None = 0.0  # default target margin γ; None: 0.3 β (SimPO's γ/β)
    pair_weight: str = "none"  # "wpo": WPO's likelihood weight of each pair
    regularizer: str = "none"  # "treg": T-REG's token-reward likelihood term; "sft": the chosen answer's NLL
    weighting: str = "none"  # its own token weighting (WEIGHTINGS); "none": --token-weighting may add one
    # TDPO's sequential KL, Σ_t KL(π_ref ‖ π_θ) at each response position, in the margin: "tdpo1" (both sides with a
    # gradient), "tdpo2" (scaled by α, the chosen side's detached). It needs the reference's distribution at each
    # position: a model in memory (--ref-model), or the top-K the shards store (treg-score --ref-topk).
    sequential_kl: str = "none"
    # cDPO's loss as its authors' code computes it: a sigmoid per response position, the chosen answer's j-th token
    # against the rejected answer's j-th, averaged over the pair's label positions (prompt included), not one sigmoid
    # of the two answers' sums.
    per_position: bool = False

    @property
    def needs_reference_distribution(self) -> bool:
        return self.sequential_kl != "none"

    def default_gamma(self, beta: float) -> float:
        return 0.3 * beta if self.gamma is None else self.gamma


@dataclass(frozen=True)
class Weighting:
    """One token weighting a_t of the margin."""

    name: str
    summary: str
    # The token signal s_t = first − second of two shard columns it reads (or one column's value), by the value of the
    # setting `choice` ("" when it has none); empty: it reads no column.
    signals: dict = field(default_factory=dict)
    choice: str | None = None
    nonnegative: bool = True  # its weights are never negative, so a reference-free mean over them is defined
    reads_hidden_states: bool = False  # from the policy's forward, detached


METHODS = {m.name: m for m in (
    Method("dpo", "DPO", REFERENCE, 0.01),
    Method("dpo_reg", "T-REG: DPO with token-level reward regularization", REFERENCE, 0.01, regularizer="treg"),
    Method("simpo", "SimPO", REFERENCE_FREE, 10.0, gamma=None),
    Method("simpo_reg", "SimPO with T-REG's regularizer", REFERENCE_FREE, 10.0, gamma=None, regularizer="treg"),
    Method("wpo", "WPO: DPO with each pair weighted by its likelihood", REFERENCE, 0.01, pair_weight="wpo"),
    Method("wpo_reg", "WPO with T-REG's regularizer", REFERENCE, 0.01, pair_weight="wpo", regularizer="treg"),
    Method("sft_chosen", "DPO plus the chosen answer's likelihood", REFERENCE, 0.01, regularizer="sft"),
    Method("d2po", "D²PO: DPO with earlier tokens weighted more", REFERENCE, 0.1, weighting="d2po"),
    Method("confpo", "ConfPO: SimPO over the policy's low-confidence tokens", REFERENCE_FREE, 1.5, gamma=1.6,
           weighting="confpo"),
    Method("tgdpo", "TGDPO: DPO weighted by a DPO model's token rewards", REFERENCE, 0.1, weighting="tgdpo"),
    Method("tis_dpo", "TIS-DPO: DPO weighted by ranked contrastive token scores", REFERENCE, 0.1,
           weighting="tis_dpo"),
    Method("sepo", "SePO: SimPO over the tokens a DPO model rewards most in chosen, least in rejected",
           REFERENCE_FREE, 1.0, gamma=0.0, weighting="sepo"),
    Method("cdpo", "cDPO: DPO per position with the rejected answer's critical tokens weighted by a positive and a "
           "negative model's contrastive estimate", REFERENCE, 0.1, weighting="cdpo", per_position=True),
    Method("otpo", "OTPO: DPO weighted by an optimal transport between the answers' hidden states", REFERENCE, 0.01,
           weighting="otpo"),
    Method("tdpo1", "TDPO1: DPO with the sequential KL to the reference in the margin", REFERENCE, 0.1,
           sequential_kl="tdpo1"),
    Method("tdpo2", "TDPO2: TDPO1 with the KL scaled by --tdpo-alpha and the chosen answer's detached", REFERENCE,
           0.1, sequential_kl="tdpo2"),
)}

WEIGHTINGS = {w.name: w for w in (
    Weighting("none", "every token 1"),
    Weighting("d2po", "γ^t: earlier tokens weigh more"),
    Weighting("confpo", "1 on the tokens the policy finds less likely than its mean, 0 elsewhere"),
    Weighting("tgdpo", "1 ± αβ·s_t, s = log π_dpo − log π_ref", {"": ("dpo_logps", "ref_logps")}, nonnegative=False),
    Weighting("tis_dpo", "ranked s_t mapped to [0.7, 1.3]", {"prompts": ("better_logps", "worse_logps"),
                                                            "models": ("dpo_logps", "rev_dpo_logps")},
              choice="tis_dpo_weights"),
    Weighting("sepo", "1 on the tokens of largest ±s_t, s = log π_dpo − log π_ref", {"": ("dpo_logps", "ref_logps")}),
    Weighting("cdpo", "1 on the chosen answer; 1 − p_ce(y_t) on the rejected one's tokens, 1 on its last",
              {"": ("ce_logps",)}),
    Weighting("otpo", "each token's share of an optimal transport between the two answers' hidden states",
              reads_hidden_states=True),
)}

TOKEN_METHODS = tuple(name for name, m in METHODS.items() if m.weighting != "none")  # a weighting of its own


def method(name: str) -> Method:
    """The row of `--loss name`; an unknown name is a programming error here (treg-train's flags are checked first)."""
    if name not in METHODS:
        raise ValueError(f"unknown loss type {name!r}; expected one of {tuple(METHODS)}")
    return METHODS[name]


def reference_free(loss: str) -> bool:
    return method(loss).family == REFERENCE_FREE


def signal_columns(weighting: str, choices: dict) -> tuple[str, ...] | None:
    """The two shard columns whose difference the weighting reads (or the one whose value), given the settings
    `choices` (by name); None if it reads none."""
    row = WEIGHTINGS[weighting]
    return row.signals.get(choices[row.choice] if row.choice else "") if row.signals else None


def loss_help() -> str:
    """--loss's help: every method, by its summary."""
    return ", ".join(f"{name} ({m.summary})" for name, m in METHODS.items()) + "."


def _grouped(values: dict[str, str]) -> str:
    """"a for x, y; b for z": the methods grouped by their value, in METHODS' order."""
    groups: dict[str, list[str]] = {}
    for name, value in values.items():
        groups.setdefault(value, []).append(name)
    return "; ".join(f"{value} for {', '.join(names)}" for value, names in groups.items())


def beta_help() -> str:
    """--beta's help: each method's default β."""
    return f"β (default {_grouped({name: f'{m.beta:g}' for name, m in METHODS.items()})})."


def gamma_help() -> str:
    """--gamma's help: the reference-free methods' default target margins."""
    margins = {name: "0.3 x beta" if m.gamma is None else f"{m.gamma:g}" for name, m in METHODS.items()
               if m.family == REFERENCE_FREE}
    return f"Target margin γ of the reference-free methods (default {_grouped(margins)}); 0 for the others."
