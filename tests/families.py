"""Tiny models of the families users bring: each with its architecture's own features and a
tokenizer trained here that carries the family's special tokens and its real chat template
(the `chat_templates/*.jinja` files are the templates these models ship, verbatim)."""

from __future__ import annotations

from pathlib import Path

from tiny_model import TokenizerSpec, build_tiny_model

TEMPLATES = Path(__file__).parent / "chat_templates"


def _template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


# family -> (architecture, tokenizer, config fields of the real model that change the computation)
FAMILIES = {
    "llama3": ("llama", TokenizerSpec(
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"),
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, chat_template=_template("llama3"), adds_bos=True,
    ), dict(num_key_value_heads=1, rope_theta=500000.0, max_position_embeddings=131072,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192})),
    "gemma2": ("gemma2", TokenizerSpec(
        special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", chat_template=_template("gemma2"), adds_bos=True,
    ), dict(num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64, sliding_window=32,
            final_logit_softcapping=30.0, attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True, max_position_embeddings=8192)),
    "qwen2_5": ("qwen2", TokenizerSpec(
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"),
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", chat_template=_template("qwen2_5"),
    ), dict(num_key_value_heads=1, rope_theta=1000000.0, max_position_embeddings=32768)),
    "mistral": ("mistral", TokenizerSpec(
        special_tokens=("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                        "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
        bos="<s>", eos="</s>", pad=None, unk="<unk>", chat_template=_template("mistral"), adds_bos=True,
    ), dict(num_key_value_heads=1, sliding_window=None, rope_theta=1000000.0, max_position_embeddings=32768)),
}


def build_family_model(family: str, out_dir: str | Path) -> str:
    arch, spec, overrides = FAMILIES[family]
    # Qwen2.5's embedding table is larger than its tokenizer (512 tokens here); the others match.
    model_vocab_size = 576 if family == "qwen2_5" else None
    return str(build_tiny_model(out_dir, arch=arch, tokenizer_spec=spec, config_overrides=overrides,
                                model_vocab_size=model_vocab_size))
