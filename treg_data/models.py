"""What treg-score reads of a model before any engine starts: its tokenizer (with the chat
template that renders the prompts), its config, and its context length."""

from __future__ import annotations

from pathlib import Path

from treg_data.errors import UserError, first_line


def load_tokenizer(name: str, revision: str | None, chat_template: str | None):
    from transformers import AutoTokenizer

    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise UserError(f"model folder {name} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except Exception as err:  # OSError, ValueError, HTTP errors...: one line for the user
        raise UserError(f"cannot load the tokenizer of {name!r}: {first_line(err)}") from None
    if chat_template:
        try:
            tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot read --chat-template {chat_template}: {err}") from None
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer of {name!r} has no chat template; pass one with --chat-template FILE")
    return tokenizer


def check_same_vocabulary(policy_tokenizer, scorer_tokenizer, scorer_name: str, flag: str = "--scorer-model") -> None:
    """Token rewards compare log-probs of the very same token ids, so every model that scores
    them (`flag` names which) must share --model's vocabulary."""
    if policy_tokenizer.get_vocab() != scorer_tokenizer.get_vocab():
        raise UserError(
            f"{flag} {scorer_name} has a different vocabulary from --model; token rewards need "
            "identical token ids, so use a model from the same model family and tokenizer"
        )


def load_model_config(name: str, revision: str | None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=revision)
    except Exception as err:
        raise UserError(f"cannot load the model config of {name!r}: {first_line(err)}") from None


def model_context(model_config) -> int | None:
    text = model_config.get_text_config()
    return getattr(text, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
