import pytest
from helpers import BAD_REASONS, bad_rows, make_pairs

from treg_core.errors import BadRow
from treg_data.pairs import Columns, parse_pair, row_id


def test_plain_strings_become_one_message_each():
    pair = parse_pair({"id": 7, "prompt": "Q?", "chosen": "A.", "rejected": "B."}, Columns())
    assert pair.id == "7"
    assert pair.prompt == [{"role": "user", "content": "Q?"}]
    assert pair.chosen == {"role": "assistant", "content": "A."}
    assert pair.rejected == {"role": "assistant", "content": "B."}


def test_implicit_prompt_is_the_shared_history():
    row = make_pairs(3)[2]
    pair = parse_pair(row, Columns())
    assert pair.prompt == row["chosen"][:-1]
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert pair.chosen == row["chosen"][-1]


def test_explicit_prompt_column_wins_over_history_in_chosen():
    history = [{"role": "user", "content": "Q?"}]
    row = {"prompt": "Q?", "chosen": history + [{"role": "assistant", "content": "A"}],
           "rejected": history + [{"role": "assistant", "content": "B"}]}
    pair = parse_pair(row, Columns())
    assert pair.prompt == history and pair.chosen["content"] == "A"


def test_column_mapping():
    row = {"uid": "x1", "question": "Q?", "good": "A.", "bad": "B."}
    pair = parse_pair(row, Columns(prompt="question", chosen="good", rejected="bad", id="uid"))
    assert (pair.id, pair.chosen["content"], pair.rejected["content"]) == ("x1", "A.", "B.")


def test_content_hash_id_is_stable_and_content_sensitive():
    row = {"prompt": "Q?", "chosen": "A.", "rejected": "B."}
    assert row_id(row, Columns()) == row_id(dict(row), Columns())
    assert row_id(row, Columns()) != row_id({**row, "chosen": "C."}, Columns())
    assert len(row_id(row, Columns())) == 16


@pytest.mark.parametrize("row", [r for r in bad_rows() if BAD_REASONS[r["id"]] != "too_long"], ids=lambda r: r["id"])
def test_each_bad_row_kind_has_its_reason(row):
    with pytest.raises(BadRow) as caught:
        parse_pair(row, Columns())
    assert caught.value.reason == BAD_REASONS[row["id"]]
    assert caught.value.detail


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "Q", "chosen": 5, "rejected": "B"}, "malformed_field"),
        ({"prompt": "Q", "chosen": [{"content": "A"}], "rejected": "B"}, "malformed_message"),
        ({"prompt": "", "chosen": "A", "rejected": "B"}, "empty_prompt"),
        ({"chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]},
         "empty_prompt"),
        ({"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A"}],
          "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]}, "prompt_mismatch"),
        ({"prompt": "Q", "chosen": [], "rejected": "B"}, "empty_response"),
    ],
)
def test_more_malformed_shapes(row, reason):
    with pytest.raises(BadRow) as caught:
        parse_pair(row, Columns())
    assert caught.value.reason == reason
