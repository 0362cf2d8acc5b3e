"""The two tables a method and a column are rows of: every row is used where the code reads it, and documented."""

import re
from pathlib import Path

import pytest
import torch

from treg_core.contract import COLUMNS, ID_KINDS, SIGNALS, shard_schema
from treg_train.config import TrainConfig
from treg_train.losses import LossSettings, SideTokens, margin_weights, preference_loss
from treg_train.objectives import METHODS, WEIGHTINGS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _side(seed: int, pairs: int = 3, tokens: int = 12) -> SideTokens:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(tokens)[None] < torch.tensor([tokens, tokens - 3, 7])[:pairs, None]
    logps = -torch.rand(pairs, tokens, generator=g, dtype=torch.float64) * 3
    return SideTokens(logps, logps - 0.1 * torch.randn(pairs, tokens, generator=g, dtype=torch.float64),
                      torch.rand(pairs, tokens, generator=g, dtype=torch.float64) - 0.5, mask,
                      log_sum_sq_probs=-torch.rand(pairs, tokens, generator=g, dtype=torch.float64),
                      signal=torch.randn(pairs, tokens, generator=g, dtype=torch.float64),
                      kl=torch.rand(pairs, tokens, generator=g, dtype=torch.float64),
                      hidden=torch.randn(pairs, tokens, 4, generator=g, dtype=torch.float64),
                      prompt_length=torch.tensor([5, 2, 3])[:pairs])


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_is_offered_and_documented(name):
    row = METHODS[name]
    settings = TrainConfig(model="m", data="d", output="o", loss=name).loss_settings()
    assert (settings.beta, settings.gamma) == (row.beta, row.default_gamma(row.beta))
    losses, _ = preference_loss(_side(1), _side(2), settings)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    assert re.search(rf"\b{name} \(", TrainConfig.__dataclass_fields__["loss"].metadata["help"]), \
        f"--help does not name --loss {name}"
    assert f"--loss {name}" in (DOCS / "METHOD.md").read_text(encoding="utf-8"), f"docs/METHOD.md lacks {name}"


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_every_weighting_weighs_reads_known_columns_and_is_documented(name):
    row = WEIGHTINGS[name]
    weights, _ = margin_weights(_side(3), _side(4), LossSettings("dpo", weighting=name))
    assert (weights is None) == (name == "none")
    for columns in row.signals.values():  # a difference of two columns is a SIGNAL; one column is read as it is
        assert all(c in COLUMNS for c in columns) and (len(columns) == 1 or columns in SIGNALS)
    if name != "none":
        assert f"--token-weighting {name}" in (DOCS / "METHOD.md").read_text(encoding="utf-8") or \
            f"--loss {name}" in (DOCS / "METHOD.md").read_text(encoding="utf-8")


def test_every_signal_is_read_by_a_weighting():
    read = {columns for row in WEIGHTINGS.values() for columns in row.signals.values() if len(columns) == 2}
    assert set(SIGNALS) == read


@pytest.mark.parametrize("name", COLUMNS)
def test_every_column_is_written_ranged_and_documented(name):
    row = COLUMNS[name]
    schema = shard_schema(dpo=True, reverse_dpo=True, topk=True, ce=True)
    assert {f"chosen_{name}", f"rejected_{name}"} <= set(schema.names)
    assert (row.range is None) == (row.kind in ID_KINDS)
    rows = [line for line in (DOCS / "DESIGN.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| `{side}_") and f"`{{side}}_{name}`" in line]
    assert rows, f"docs/DESIGN.md's column table lacks {name}"
    if row.written_with and not row.written_with.startswith("--token-rewards"):
        assert f"`{row.written_with}`" in rows[0], f"docs/DESIGN.md does not say {row.written_with} writes {name}"


def test_a_run_records_the_beta_and_gamma_its_loss_resolved_and_resumes_an_older_record():
    from treg_train.config import changed_on_resume

    config = TrainConfig(model="m", data="d", output="o", loss="simpo")
    assert (config.record()["beta"], config.record()["gamma"]) == (10.0, 3.0)
    older = {**config.as_dict(), "beta": None, "gamma": None}  # written before runs resolved them
    assert changed_on_resume(older, config) == []
    assert changed_on_resume(older, TrainConfig(model="m", data="d", output="o", loss="simpo", beta=2.0)) != []


def test_treg_inspect_takes_beta_and_the_method_from_the_run_of_its_checkpoint(tmp_path, capsys):
    import yaml

    from treg_data.inspect_cli import checkpoint_beta

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(TrainConfig(model="m", data="d", output="o", loss="sepo").record()))
    assert checkpoint_beta(str(run / "final"), None) == (1.0, "sepo, ")
    assert checkpoint_beta(str(run / "final"), 0.5) == (0.5, "sepo, ")  # --beta wins
    (tmp_path / "model").mkdir()
    assert checkpoint_beta(str(tmp_path / "model"), None) == (0.01, "")
    assert "give --beta" in capsys.readouterr().err


@pytest.mark.parametrize("record", ["loss: simpo\nbeta: null\n", "beta: [unclosed\n", "loss: dpo\nbeta: true\n", None])
def test_treg_inspect_refuses_a_run_whose_record_gives_no_beta(tmp_path, record):
    """A treg-train run's model whose config.yaml gives no usable β (an older run's null, a broken or missing file):
    DPO's 0.01 would be a guess shown as the run's (a SimPO run trains with β = 10), so --beta is asked for."""
    from treg_core.errors import UserError
    from treg_data.inspect_cli import checkpoint_beta

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / ".treg").write_text("treg-train\n")
    if record is not None:
        (run / "config.yaml").write_text(record)
    with pytest.raises(UserError, match="give --beta"):
        checkpoint_beta(str(run / "final"), None)
    assert checkpoint_beta(str(run / "final"), 0.5)[0] == 0.5  # --beta wins
