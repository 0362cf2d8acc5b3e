"""Where a model or a dataset comes from, decided the same way everywhere: a local path, or a Hub id
(ORG/NAME); and a model's tokenizer, loaded with one clear line when it cannot be."""

from __future__ import annotations

from pathlib import Path

from treg_core.errors import UserError, first_line


def looks_local(name: str) -> bool:
    """A name the user meant as a path: it exists, it starts like one, or it has more slashes than ORG/NAME."""
    return (Path(name).expanduser().exists() or name.startswith((".", "/", "~"))
            or (name.count("/") > 1 and "://" not in name))


def is_hub_id(name: str) -> bool:
    """ORG/NAME, and not a local path."""
    return not looks_local(name) and name.count("/") == 1


def load_model_config(name: str, what: str = ""):
    """The config of a model folder or Hub id, or one line saying why it cannot be read; `what` names the model in
    messages ("--model")."""
    from transformers import AutoConfig

    label = f"{what} {name!r}" if what else repr(name)
    path = Path(name).expanduser()
    if looks_local(name) and not path.exists():
        missing = f"model folder {name} does not exist"
        raise UserError(f"cannot load the config of {what}: {missing}" if what else missing)
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"cannot load the config of {label}: the folder has no config.json; give a Hugging Face "
                        "model folder or a Hub id")
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as err:  # OSError, ValueError, HTTP errors...: one line for the user
        raise UserError(f"cannot load the config of {label}: {first_line(err)}") from None


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
        if not has_tokenizer_files(name):  # transformers would advise installing sentencepiece
            raise UserError(f"cannot load the tokenizer of {label}: the folder has no tokenizer files (tokenizer.json, "
                            "tokenizer.model, vocab.json, ...); copy them in from the model it was made from "
                            f"(tokenizer.save_pretrained('{name}') writes them)") from None
        raise UserError(f"cannot load the tokenizer of {label}: {first_line(err)}") from None
    if chat_template:
        try:
            tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot read --chat-template {chat_template}: {err}") from None
    if needs_chat_template and not tokenizer.chat_template:
        raise UserError(f"the tokenizer of {label} has no chat template; pass one with --chat-template FILE")
    return tokenizer


def has_tokenizer_files(name: str) -> bool:
    """False for a local folder holding no file a tokenizer's vocabulary is read from; True otherwise (a Hub id)."""
    folder = Path(name).expanduser()
    return not folder.is_dir() or any(f.name.startswith(("tokenizer.", "vocab.", "spiece.")) or
                                      f.suffix in (".model", ".tiktoken") for f in folder.iterdir())


def check_same_vocabulary(policy_tokenizer, scorer_tokenizer, scorer_name: str, flag: str = "--scorer-model") -> None:
    """Token rewards compare log-probs of the very same token ids, so every model that scores
    them (`flag` names which) must share --model's vocabulary."""
    if policy_tokenizer.get_vocab() != scorer_tokenizer.get_vocab():
        raise UserError(
            f"{flag} {scorer_name} has a different vocabulary from --model; token rewards need "
            "identical token ids, so use a model from the same model family and tokenizer"
        )
