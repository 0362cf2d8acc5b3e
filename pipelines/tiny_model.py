"""Build a tiny causal LM and tokenizer locally, for tests, demos and benchmarks (no downloads).

The tokenizer is a byte-level BPE trained on text generated here, so it can encode any
unicode; the model is a randomly initialised Llama (or Qwen2 / GPT-2) small enough for a CPU.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

# A chat template in the style of Llama 3: each turn is a header, the content verbatim, and an
# end-of-turn token. Content is not trimmed, so whitespace at the edges survives rendering.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start|>' + message['role'] + '<|sep|>\n' + message['content'] + '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant<|sep|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|bos|>", "<|eot|>", "<|start|>", "<|sep|>", "<|pad|>"]


@dataclass(frozen=True)
class TokenizerSpec:
    """A model family's special tokens and chat template, for a tokenizer trained here."""

    special_tokens: tuple[str, ...] = tuple(SPECIAL_TOKENS)
    bos: str | None = "<|bos|>"
    eos: str = "<|eot|>"
    pad: str | None = "<|pad|>"
    unk: str | None = None
    chat_template: str = CHAT_TEMPLATE
    adds_bos: bool = False  # the tokenizer itself prepends BOS when asked for special tokens

_WORDS = (
    "the a an of to and in is it that for on with as was be by this are or from at which but "
    "not have has had were can all their there one more will would been if do what about when "
    "answer question response revise helpful correct coherent concise verbose incorrect "
    "number sum two three four five six seven eight nine ten dog cat list sort copy word text "
    "please write explain why how make good bad better worse first last test capital letter "
    "hello world python code function value result because therefore however example"
).split()


def corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English lines with digits and punctuation to train the BPE on."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice([".", "?", "!", ":", ","]))
    return lines


def build_tokenizer(vocab_size: int = 512, spec: TokenizerSpec = TokenizerSpec()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if spec.adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, tok.token_to_id(spec.bos))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad, unk_token=spec.unk,
    )
    fast.chat_template = spec.chat_template
    return fast


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    model_vocab_size: int | None = None,
    tokenizer_spec: TokenizerSpec = TokenizerSpec(),
    config_overrides: dict | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> Path:
    """Write a randomly initialised model + tokenizer folder that transformers and vLLM load.

    vLLM's CPU attention needs head_dim >= 64, hence hidden_size / num_heads = 64 by default.
    `model_vocab_size` widens the embeddings beyond the tokenizer (ids past it are never used),
    to give benchmarks the output-layer cost of a real vocabulary. `config_overrides` sets a
    family's own architecture fields (soft-capping, sliding window, rope scaling, ...). A large
    model is drawn fastest on a GPU (`device="cuda"`) and saved smallest in bf16 (`dtype`).
    """
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size, tokenizer_spec)
    common = dict(
        vocab_size=max(len(tokenizer), model_vocab_size or 0),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "gpt2":
        config = GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
            n_positions=max_position_embeddings, **common,
        )
    else:
        config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma2": Gemma2Config,
                        "mistral": MistralConfig}[arch]
        common.update(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_heads, intermediate_size=intermediate_size,
                      max_position_embeddings=max_position_embeddings)
        config = config_class(**{**common, **(config_overrides or {})})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def answer_batch(rows: list[tuple[list[int], list[int]]], pad: int):
    """(prefix ids, answer ids) rows as right-padded input ids, labels on the answers only, and the attention
    mask."""
    import torch

    width = max(len(prefix) + len(answer) for prefix, answer in rows)
    input_ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prefix, answer) in enumerate(rows):
        input_ids[i, : len(prefix) + len(answer)] = torch.tensor(prefix + answer)
        labels[i, len(prefix): len(prefix) + len(answer)] = torch.tensor(answer)
        attention[i, : len(prefix) + len(answer)] = 1
    return input_ids, labels, attention


def train_from_scratch(model, loss_at, steps: int, lr: float, weight_decay: float = 0.0, floor: float = 0.0,
                       seed: int = 0) -> None:
    """Train `model` on `loss_at(step)`, the loss of step 1 to `steps`: AdamW, the gradient clipped at 1, the
    learning rate warmed up over the first 5 % of the steps, then down a cosine to `floor` times `lr`. A progress
    bar shows the time left and the loss."""
    import math
    import sys

    import torch
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, steps)
                                                                                           / steps))))
    torch.manual_seed(seed)
    model.train()
    bar = tqdm(total=steps, desc="building", unit="step", dynamic_ncols=True, file=sys.stderr)
    for step in range(1, steps + 1):
        loss = loss_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if step % 10 == 0 or step == steps:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()


def build_trained(folder, train, seed: int = 0, **shape):
    """A tiny model of `shape` in `folder`, built once: trained from scratch by `train(model, tokenizer)`, written
    aside, then renamed (never half there). Returns the folder."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from treg_core.atomic import publish

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build_tiny_model(partial, seed=seed, **shape)
    model = AutoModelForCausalLM.from_pretrained(partial, dtype=torch.float32)
    train(model, AutoTokenizer.from_pretrained(partial))
    model.save_pretrained(partial)
    publish(partial, folder)
    return folder
