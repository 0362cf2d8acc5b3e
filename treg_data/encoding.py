"""Token ids for the six scored sequences of a pair, and the one length policy.

docs/METHOD.md §2: the response ids are tokenized once, inside the policy's chat template, and the
same ids are appended after the policy prompt and after each revision prompt. Nothing is ever
truncated: a pair whose sequences do not all fit is skipped with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from treg_core.contract import CONTEXTS
from treg_core.errors import BadRow, UserError
from treg_data.edits import not_near_edit
from treg_data.lengths import LengthLimits
from treg_data.pairs import Message, PreferencePair
from treg_data.revision_prompts import RevisionPrompts


@dataclass(frozen=True)
class EncodedResponse:
    ids: list[int]
    prefixes: dict[str, list[int]]  # context name -> ids that precede `ids` in that context


@dataclass(frozen=True)
class EncodedPair:
    pair: PreferencePair
    prompt_ids: list[int]
    chosen: EncodedResponse
    rejected: EncodedResponse

    @property
    def num_tokens(self) -> int:
        """Tokens the scorer processes for this pair (all six sequences)."""
        return sum(len(p) + len(r.ids) for r in (self.chosen, self.rejected) for p in r.prefixes.values())

    @property
    def contexts(self) -> tuple[str, ...]:
        """The contexts each answer is scored after: CONTEXTS, or only "ref" without revision prompts."""
        return tuple(c for c in CONTEXTS if c in self.chosen.prefixes)

    def requests(self, contexts: tuple[str, ...] | None = None) -> list[tuple[list[int], list[int]]]:
        """(prefix ids, response ids) of each side after each context, chosen's first, contexts in order."""
        return [(response.prefixes[context], response.ids) for response in (self.chosen, self.rejected)
                for context in contexts or self.contexts]


class PairEncoder:
    """Encodes a pair for scoring. Without revision prompts (treg-score --token-rewards edit-diff) only the policy
    prompt precedes each answer, and with `max_edit_tokens` a pair that is not a near edit is skipped."""

    def __init__(self, tokenizer, revision_prompts: RevisionPrompts | None, limits: LengthLimits,
                 max_edit_tokens: int | None = None):
        if not tokenizer.chat_template:
            raise UserError("the tokenizer has no chat template; pass one with --chat-template FILE")
        self.tokenizer = tokenizer
        self.revision_prompts = revision_prompts
        self.limits = limits
        self.max_edit_tokens = max_edit_tokens
        self.keeps_system = revision_prompts is not None and revision_prompts.role == "system" and keeps_system(
            tokenizer)

    def encode(self, pair: PreferencePair) -> EncodedPair:
        prompt_ids = prompt_token_ids(self.tokenizer, pair.prompt)
        limits = self.limits
        if len(prompt_ids) > limits.max_prompt_length:
            raise BadRow("prompt_too_long",
                         f"prompt has {len(prompt_ids)} tokens > max_prompt_length {limits.max_prompt_length}")
        chosen = self._encode_response(pair, pair.chosen, prompt_ids)
        rejected = self._encode_response(pair, pair.rejected, prompt_ids)
        if chosen.ids == rejected.ids:  # the texts differ (pairs.py), but only where the chat template trims
            raise BadRow("identical_responses", "the two answers have the same tokens once the chat template renders "
                                                "them (they differ only in text it drops, such as edge whitespace)")
        if self.max_edit_tokens is not None:
            reason = not_near_edit(chosen.ids, rejected.ids, self.max_edit_tokens)
            if reason:
                raise BadRow("not_near_edit", reason)
        return EncodedPair(pair=pair, prompt_ids=prompt_ids, chosen=chosen, rejected=rejected)

    def _encode_response(self, pair: PreferencePair, answer: Message, prompt_ids: list[int]) -> EncodedResponse:
        ids = answer_token_ids(self.tokenizer, pair.prompt, answer)
        if len(prompt_ids) + len(ids) > self.limits.max_length:
            raise BadRow("too_long", f"prompt + response is {len(prompt_ids) + len(ids)} tokens "
                                     f"> max_length {self.limits.max_length}")
        prefixes = {"ref": prompt_ids}
        for name in ("better", "worse") if self.revision_prompts else ():
            messages = self.revision_prompts.conversation(name, pair.prompt, answer["content"])
            prefix = prompt_token_ids(self.tokenizer, messages if self.keeps_system else fold_system(messages))
            if len(prefix) + len(ids) > self.limits.max_model_len:
                raise BadRow("revision_too_long", f"revision sequence is {len(prefix) + len(ids)} tokens "
                                                  f"> max_model_len {self.limits.max_model_len}")
            prefixes[name] = prefix
        return EncodedResponse(ids=ids, prefixes=prefixes)


def prompt_token_ids(tokenizer, prompt: list[Message]) -> list[int]:
    """The prompt through the chat template, generation prompt included: what precedes an answer."""
    return token_ids(tokenizer, render(tokenizer, prompt, generation_prompt=True))


def answer_token_ids(tokenizer, prompt: list[Message], answer: Message) -> list[int]:
    """The answer's ids, end of turn included, tokenized inside the chat template: the template's
    text of prompt + answer, less the text of the prompt. The model sees prompt ids + these."""
    prompt_text = render(tokenizer, prompt, generation_prompt=True)
    full_text = render(tokenizer, prompt + [answer], generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise BadRow("template_not_prefix",
                     "the chat template does not render the prompt as a prefix of prompt + answer")
    return token_ids(tokenizer, full_text[len(prompt_text):])


def render(tokenizer, messages: list[Message], generation_prompt: bool) -> str:
    """The chat template's text. A template that refuses a conversation (Gemma's and Mistral's
    raise on a system turn or on roles that do not alternate) makes the row a skip, not a crash."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as err:
        raise BadRow("template_error", f"the chat template refuses this conversation: {err}") from None


def token_ids(tokenizer, text: str) -> list[int]:
    # The chat template writes its own special tokens (BOS included) into the text.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def keeps_system(tokenizer) -> bool:
    """Whether the chat template writes a system message's text before a question (Gemma-2's refuses one)."""
    from jinja2 import TemplateError

    marker = "treg system marker"
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": marker}, {"role": "user", "content": "x"}],
                                             tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return False
    return marker in text


def fold_system(messages: list[Message]) -> list[Message]:
    """A leading system message moved to the head of the first user turn, for templates without a system role."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], list(messages[1:])
    first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first_user is None:
        return [{"role": "user", "content": system}, *rest]
    rest[first_user] = {"role": "user", "content": f"{system}\n\n{rest[first_user]['content']}"}
    return rest


def revision_overhead(tokenizer, revision_prompts: RevisionPrompts | None) -> int:
    """Tokens a revision sequence adds beyond twice the response and the prompt's own text; one line when the chat
    template refuses even a one-question conversation, for then no pair could be scored."""
    if revision_prompts is None:
        return 0
    empty, system = [{"role": "user", "content": ""}], revision_prompts.role == "system" and keeps_system(tokenizer)
    conversations = [revision_prompts.conversation(name, empty, "") for name in ("better", "worse")]
    try:
        return max(len(prompt_token_ids(tokenizer, c if system else fold_system(c))) for c in conversations)
    except BadRow as bad:
        raise UserError(f"{bad.detail}; fix the template or give another with --chat-template FILE") from None
