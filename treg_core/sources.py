"""Where a model or a dataset comes from, decided the same way everywhere: a local path, or a Hub id
(ORG/NAME); and a model's tokenizer, loaded with one clear line when it cannot be."""

from __future__ import annotations

from pathlib import Path

from treg_core.errors import UserError, first_line


def looks_local(name: str) -> bool:
    """A name the user meant as a path: it exists, or it starts like one."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~"))


def is_hub_id(name: str) -> bool:
    """ORG/NAME, and not a local path."""
    return not looks_local(name) and name.count("/") == 1


def load_tokenizer(name: str, revision: str | None = None, chat_template: str | None = None,
                   what: str = "", needs_chat_template: bool = False):
    """The tokenizer of a model folder or Hub id, with `chat_template` (a Jinja file) in place of its own.
    `what` names the model in messages ("--model"); `needs_chat_template` refuses a tokenizer without one."""
    from transformers import AutoTokenizer

    label = f"{what} {name!r}" if what else repr(name)
    if looks_local(name) and not Path(name).expanduser().exists():
        missing = f"model folder {name} does not exist"
        raise UserError(f"cannot load the tokenizer of {what}: {missing}" if what else missing)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except Exception as err:  # OSError, ValueError, HTTP errors...: one line for the user
        raise UserError(f"cannot load the tokenizer of {label}: {first_line(err)}") from None
    if chat_template:
        try:
            tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot read --chat-template {chat_template}: {err}") from None
    if needs_chat_template and not tokenizer.chat_template:
        raise UserError(f"the tokenizer of {label} has no chat template; pass one with --chat-template FILE")
    return tokenizer


def check_same_vocabulary(policy_tokenizer, scorer_tokenizer, scorer_name: str, flag: str = "--scorer-model") -> None:
    """Token rewards compare log-probs of the very same token ids, so every model that scores
    them (`flag` names which) must share --model's vocabulary."""
    if policy_tokenizer.get_vocab() != scorer_tokenizer.get_vocab():
        raise UserError(
            f"{flag} {scorer_name} has a different vocabulary from --model; token rewards need "
            "identical token ids, so use a model from the same model family and tokenizer"
        )
