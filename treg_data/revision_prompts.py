"""The two revision prompts of docs/METHOD.md §2: default wording and loading a replacement.

A template is plain text with two placeholders, `{prompt}` (the conversation, as a transcript)
and `{response}` (the response's text). Nothing else in it is interpreted, so braces are safe.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from treg_core.errors import UserError
from treg_data.pairs import Message

_INSTRUCTION = (
    "Below is a conversation between a user and an assistant, followed by the assistant's "
    "response to the last message. Revise the response so that it is {direction}. Reply with "
    "the revised response only.\n\n"
    "### Conversation\n{{prompt}}\n\n### Response\n{{response}}"
)
_PLACEHOLDER = re.compile(r"\{(prompt|response)\}")


@dataclass(frozen=True)
class RevisionPrompts:
    better: str
    worse: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


DEFAULT_REVISION_PROMPTS = RevisionPrompts(
    better=_INSTRUCTION.format(direction="more helpful, correct, coherent and concise"),
    worse=_INSTRUCTION.format(direction="less helpful, incorrect, incoherent and verbose"),
)


def load_revision_prompts(path: str | Path | None) -> RevisionPrompts:
    """Read a YAML or JSON file with keys `better` and `worse`; None gives the defaults."""
    if path is None:
        return DEFAULT_REVISION_PROMPTS
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read revision template {path}: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("better", "worse")):
        raise UserError(f"revision template {path} must map 'better' and 'worse' to strings")
    for key in ("better", "worse"):
        missing = {"prompt", "response"} - set(_PLACEHOLDER.findall(data[key]))
        if missing:
            raise UserError(f"revision template {path}: '{key}' lacks the placeholder(s) {sorted(missing)}")
    return RevisionPrompts(better=data["better"], worse=data["worse"])


def transcript(messages: list[Message]) -> str:
    """A conversation as plain text; a lone user message is shown as it is."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def fill(template: str, prompt: list[Message], response: str) -> str:
    """Substitute both placeholders in one pass, so inserted text is never re-read as a placeholder."""
    values = {"prompt": transcript(prompt), "response": response}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)
