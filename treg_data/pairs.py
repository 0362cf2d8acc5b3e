"""Turn one input row (conversational or plain strings) into a validated preference pair.

Accepted shapes, as in TRL's preference datasets:
- plain: `prompt`, `chosen`, `rejected` are strings;
- conversational: `chosen` / `rejected` are message lists whose last message is the assistant's
  answer, and the prompt is either a `prompt` column (string or message list) or, when there
  is none, the turns that `chosen` and `rejected` share before their answers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from treg_core.errors import BadRow

Message = dict[str, str]


@dataclass(frozen=True)
class Columns:
    prompt: str | None = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    id: str | None = "id"


@dataclass(frozen=True)
class PreferencePair:
    id: str
    prompt: list[Message]  # the conversation up to the answer
    chosen: Message  # the assistant's answer
    rejected: Message


def row_id(row: dict[str, Any], columns: Columns) -> str:
    """The row's own id when it has one, else a stable hash of its content."""
    if columns.id and row.get(columns.id) is not None:
        return str(row[columns.id])
    fields = {key: row.get(key) for key in (columns.prompt, columns.chosen, columns.rejected) if key}
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_pair(row: dict[str, Any], columns: Columns) -> PreferencePair:
    """Validate and normalise a row; raises BadRow with a reason code when it cannot be used."""
    rid = row_id(row, columns)
    chosen_turns = _conversation(row, columns.chosen, default_role="assistant")
    rejected_turns = _conversation(row, columns.rejected, default_role="assistant")
    chosen, rejected = _answer(chosen_turns, columns.chosen), _answer(rejected_turns, columns.rejected)

    if columns.prompt and columns.prompt in row:
        prompt = _conversation(row, columns.prompt, default_role="user")
    else:
        prompt = chosen_turns[:-1]
        if prompt != rejected_turns[:-1]:
            raise BadRow("prompt_mismatch", "chosen and rejected do not share the same earlier turns")
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise BadRow("empty_prompt", "the prompt has no content")
    if chosen["content"] == rejected["content"]:
        raise BadRow("identical_responses", "chosen and rejected are the same text")
    return PreferencePair(id=rid, prompt=prompt, chosen=chosen, rejected=rejected)


def _conversation(row: dict[str, Any], column: str, default_role: str) -> list[Message]:
    value = row.get(column)
    if value is None:
        raise BadRow("missing_field", f"{column!r} is missing or null")
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise BadRow("malformed_field",
                     f"{column!r} must be a string or a list of messages, got {type(value).__name__}")
    return [_message(item, column) for item in value]


def _message(item: Any, column: str) -> Message:
    if not isinstance(item, dict) or "role" not in item or "content" not in item:
        raise BadRow("malformed_message", f"{column!r} holds a message without 'role' and 'content'")
    role, content = item["role"], item["content"]
    if not isinstance(role, str):
        raise BadRow("malformed_message", f"{column!r} holds a message whose role is not a string")
    if not isinstance(content, str):
        raise BadRow("non_string_content", f"{column!r} holds {type(content).__name__} content, expected a string")
    return {"role": role, "content": content}


def _answer(turns: list[Message], column: str) -> Message:
    if not turns:
        raise BadRow("empty_response", f"{column!r} is an empty conversation")
    answer = turns[-1]
    if answer["role"] != "assistant":
        raise BadRow("last_turn_not_assistant", f"the last turn of {column!r} is {answer['role']!r}, not 'assistant'")
    if not answer["content"].strip():
        raise BadRow("empty_response", f"{column!r} has an empty answer")
    return answer
