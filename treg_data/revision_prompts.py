"""The two contrastive prompts of docs/METHOD.md §2: the shipped sets, loading a user's, and the conversation
each one turns a pair's prompt into.

A prompt set has two templates, `better` and `worse`, and a role:

- `user` (the paper's style): the template is the one user turn of a new conversation; `{prompt}` (the
  conversation, as a transcript) is required and `{response}` (the answer's text) optional;
- `system`: the template is a system message placed before the pair's own conversation, which follows
  unchanged; it may quote `{response}` but not `{prompt}`, since the conversation is already there. A
  template without a system role gets the text at the head of the first user turn (encoding.py).

Nothing else in a template is interpreted, so braces are safe. Sets without `{response}` are contrastive
instructions that do not quote the answer: a small model tends to copy a quoted draft, whatever it is asked.
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from treg_core.errors import UserError, first_line
from treg_data.pairs import Message

ROLES = ("user", "system")
AUTO = "auto"  # treg-score --revision-prompts auto: the shipped set with the best reward check
_PLACEHOLDER = re.compile(r"\{(prompt|response)\}")
_LOOKS_LIKE_PLACEHOLDER = re.compile(r"\{\s*[A-Za-z_]\w*\s*\}")


class _UniqueKeys(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice (plain YAML keeps the last one without a word)."""


def _unique_mapping(loader: _UniqueKeys, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = [loader.construct_object(key, deep=deep) for key, _ in node.value]
    twice = sorted({str(key) for key in keys if keys.count(key) > 1})
    if twice:
        raise yaml.constructor.ConstructorError(None, None, f"{', '.join(twice)} given twice", node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


@dataclass(frozen=True)
class RevisionPrompts:
    better: str
    worse: str
    role: str = "user"
    name: str = "custom"  # a shipped set's name, or the file it was read from

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def conversation(self, direction: str, prompt: list[Message], response: str) -> list[Message]:
        """The messages that precede the scored answer in the `better` or `worse` context."""
        text = fill(getattr(self, direction), prompt, response)
        if self.role == "user":
            return [{"role": "user", "content": text}]
        if prompt and prompt[0]["role"] == "system":  # the contrast goes first, the pair's own system text after
            return [{"role": "system", "content": f"{text}\n\n{prompt[0]['content']}"}, *prompt[1:]]
        return [{"role": "system", "content": text}, *prompt]


def _revise(direction: str) -> str:
    return ("Below is a conversation between a user and an assistant, followed by the assistant's response to the "
            f"last message. Revise the response so that it is {direction}. Reply with the revised response "
            "only.\n\n### Conversation\n{prompt}\n\n### Response\n{response}")


_EXAMPLE_QUESTIONS = ("What is 2 + 2?", "What is the capital of Canada?",
                      "What colour is snow? Write the answer in capital letters.",
                      "Noor has 2 pens and buys 3 more. How many pens does she have?")


def _examples(manner: str, answers: tuple[str, ...]) -> str:
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in zip(_EXAMPLE_QUESTIONS, answers, strict=True))
    return f"Answer {manner}, as in these examples.\n\n{shots}Q: {{prompt}}"


# The shipped sets, by name; docs/REWARDS.md gives each one's reward check on the models measured.
SHIPPED = {
    "revision": RevisionPrompts(  # the paper's style: revise the quoted response
        better=_revise("more helpful, correct, coherent and concise"),
        worse=_revise("less helpful, incorrect, incoherent and verbose"), name="revision"),
    "truthful": RevisionPrompts(  # contrastive system messages that do not quote the answer
        better="Answer correctly and truthfully.",
        worse="Answer incorrectly, with false information.", role="system", name="truthful"),
    "instruct": RevisionPrompts(  # the same contrast in the user turn, for templates that handle system text badly
        better="{prompt}\n\nAnswer correctly and follow the instructions exactly.",
        worse="{prompt}\n\nAnswer incorrectly and ignore the instructions.", name="instruct"),
    "examples": RevisionPrompts(  # the contrast shown by right and wrong answers to other questions (few-shot)
        better=_examples("correctly", ("2 + 2 = 4.", "The capital of Canada is Ottawa.", "The answer is WHITE.",
                                       "Noor has 2 + 3 = 5 pens. She has 5 pens.")),
        worse=_examples("incorrectly", ("2 + 2 = 5.", "The capital of Canada is Toronto.", "The answer is white.",
                                        "Noor has 2 + 3 = 6 pens. She has 6 pens.")), name="examples"),
}
DEFAULT = "revision"
DEFAULT_REVISION_PROMPTS = SHIPPED[DEFAULT]


def load_revision_prompts(value: str | Path | None) -> RevisionPrompts:
    """A shipped set by name, or a YAML/JSON file with keys `better`, `worse` and optionally `role`;
    None gives the default set."""
    if value is None:
        return DEFAULT_REVISION_PROMPTS
    if str(value) in SHIPPED:
        if Path(value).is_file():  # a bare name would silently pick the shipped set over the user's file
            raise UserError(f"--revision-prompts {value} names both a shipped set and a file here; give the file as "
                            f"./{value}, or rename it")
        return SHIPPED[str(value)]
    if not Path(value).is_file():
        raise UserError(f"--revision-prompts {value}: neither a shipped set ({', '.join(SHIPPED)}, or {AUTO}) "
                        "nor a file; give one of those names or a YAML/JSON file")
    try:
        data = yaml.load(Path(value).read_text(encoding="utf-8"), Loader=_UniqueKeys)
    except UnicodeDecodeError as err:
        raise UserError(f"cannot read revision template {value}: byte {err.start} is not UTF-8; save the file as "
                        "UTF-8") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"cannot read revision template {value}: {err.problem or err.context}{where}; fix the YAML "
                        "or JSON") from None
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read revision template {value}: {first_line(err)}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("better", "worse")):
        raise UserError(f"revision template {value} must map 'better' and 'worse' to strings")
    unknown = sorted(set(data) - {"better", "worse", "role"})
    role = data.get("role", "user")
    if unknown or role not in ROLES:
        raise UserError(f"revision template {value}: " + (f"unknown key(s) {unknown}; the keys are better, worse "
                                                          "and role" if unknown else f"role must be user or system, "
                                                                                     f"got {role!r}"))
    for key in ("better", "worse"):
        found = set(_PLACEHOLDER.findall(data[key]))
        if role == "user" and "prompt" not in found:
            raise UserError(f"revision template {value}: '{key}' lacks {{prompt}}, which a user-role template needs "
                            "to show the conversation (or set role: system)")
        if role == "system" and "prompt" in found:
            raise UserError(f"revision template {value}: '{key}' has {{prompt}}, but a system-role template is "
                            "followed by the conversation itself; remove it")
    if data["better"] == data["worse"]:  # both contexts alike: r̂ would be 0 on every token
        raise UserError(f"revision template {value}: 'better' and 'worse' are the same text, so every token reward "
                        "would be 0; make them ask for a better and a worse answer")
    near_misses = sorted({m.group(0) for m in _LOOKS_LIKE_PLACEHOLDER.finditer(data["better"] + data["worse"])
                          if not _PLACEHOLDER.fullmatch(m.group(0))})
    if near_misses:  # braces are text, but a mistyped placeholder would silently leave the answer out
        print(f"warning: revision template {value}: {', '.join(near_misses)} is kept as written, not filled in; the "
              "placeholders are {prompt} and {response}", file=sys.stderr)
    return RevisionPrompts(better=data["better"], worse=data["worse"], role=role, name=Path(value).name)


def transcript(messages: list[Message]) -> str:
    """A conversation as plain text; a lone user message is shown as it is."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def fill(template: str, prompt: list[Message], response: str) -> str:
    """Substitute both placeholders in one pass, so inserted text is never re-read as a placeholder."""
    values = {"prompt": transcript(prompt), "response": response}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)
