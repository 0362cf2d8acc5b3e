"""What treg-score reads of a model before any engine starts, beside its tokenizer
(treg_core.sources): whether another model shares its vocabulary, its config, and its context length."""

from __future__ import annotations

from treg_core.errors import UserError, first_line


def load_model_config(name: str, revision: str | None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=revision)
    except Exception as err:
        raise UserError(f"cannot load the model config of {name!r}: {first_line(err)}") from None


def model_context(model_config) -> int | None:
    text = model_config.get_text_config()
    return getattr(text, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
