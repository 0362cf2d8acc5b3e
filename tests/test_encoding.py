import pytest
from helpers import make_pairs

from treg_core.contract import tokenizer_fingerprint
from treg_core.errors import BadRow, UserError
from treg_data.encoding import CONTEXTS, PairEncoder, fold_system
from treg_data.lengths import LengthLimits
from treg_data.pairs import Columns, PreferencePair, parse_pair
from treg_data.revision_prompts import DEFAULT_REVISION_PROMPTS, SHIPPED, fill, load_revision_prompts, transcript

LIMITS = LengthLimits(max_length=256, max_prompt_length=128, max_model_len=640)


@pytest.fixture
def encoder(tokenizer):
    return PairEncoder(tokenizer, DEFAULT_REVISION_PROMPTS, LIMITS)


def _render(tokenizer, messages, generation_prompt):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("index", [1, 2, 3], ids=["system+user", "multi-turn", "unicode-whitespace"])
def test_response_ids_identical_in_all_three_contexts(tokenizer, encoder, index):
    pair = parse_pair(make_pairs(4)[index], Columns())
    encoded = encoder.encode(pair)
    for answer, response in ((pair.chosen, encoded.chosen), (pair.rejected, encoded.rejected)):
        # The ids are those of the answer inside the policy's own rendering, end-of-turn included...
        full = _render(tokenizer, pair.prompt + [answer], generation_prompt=False)
        assert tokenizer.decode(encoded.prompt_ids + response.ids) == full
        assert tokenizer.decode(response.ids) == answer["content"] + "<|eot|>"
        assert response.ids[-1] == tokenizer.convert_tokens_to_ids("<|eot|>")
        # ...and every scored sequence ends with exactly those ids after its own prefix.
        assert response.prefixes["ref"] == encoded.prompt_ids
        for context in CONTEXTS:
            sequence = response.prefixes[context] + response.ids
            assert sequence[len(response.prefixes[context]):] == response.ids
        # The revision prompts quote the answer text and the conversation.
        better = tokenizer.decode(response.prefixes["better"])
        assert answer["content"] in better and pair.prompt[-1]["content"] in better
        assert "more helpful" in better and "less helpful" in tokenizer.decode(response.prefixes["worse"])


def test_whitespace_at_the_boundaries_survives(tokenizer, encoder):
    pair = parse_pair(make_pairs(4)[3], Columns())
    assert pair.chosen["content"].startswith(" \t") and pair.chosen["content"].endswith(" \n\n")
    encoded = encoder.encode(pair)
    assert tokenizer.decode(encoded.chosen.ids).startswith(" \t")


def _pair(prompt, chosen, rejected="No."):
    return parse_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected}, Columns())


def test_length_policy_skips_and_never_truncates(tokenizer):
    limits = LengthLimits(max_length=60, max_prompt_length=20, max_model_len=400)
    encoder = PairEncoder(tokenizer, DEFAULT_REVISION_PROMPTS, limits)
    with pytest.raises(BadRow, match="prompt_too_long"):
        encoder.encode(_pair("word " * 30, "Yes."))
    with pytest.raises(BadRow, match="too_long"):
        encoder.encode(_pair("Hi", "word " * 60))
    tight = PairEncoder(tokenizer, DEFAULT_REVISION_PROMPTS, LengthLimits(60, 20, 90))
    with pytest.raises(BadRow, match="revision_too_long"):
        tight.encode(_pair("Hi", "word " * 20))
    encoded = encoder.encode(_pair("Hi", "word " * 20))
    assert len(encoded.prompt_ids) + len(encoded.chosen.ids) <= 60
    assert all(len(p) + len(encoded.chosen.ids) <= 400 for p in encoded.chosen.prefixes.values())


def test_revision_template_from_file(tmp_path):
    path = tmp_path / "revise.yaml"
    path.write_text("better: 'Improve {response} for {prompt} {not a placeholder}'\n"
                    "worse: 'Spoil {response} ({prompt})'\n")
    prompts = load_revision_prompts(path)
    assert prompts.better.startswith("Improve")
    conversation = [{"role": "user", "content": "say {response}"}]
    assert fill(prompts.better, conversation, "R") == "Improve R for say {response} {not a placeholder}"


@pytest.mark.parametrize("text, message", [
    ("better: 'only {response}'\nworse: '{prompt} {response}'\n", "lacks {prompt}"),  # the question is lost
    ("better: 'a {prompt}'\nworse: 'b'\nrole: system\n", "has {prompt}"),  # the conversation follows anyway
    ("better: 'a {prompt}'\nworse: 'b {prompt}'\nrole: assistant\n", "role must be"),
    ("better: 'a {prompt}'\nworse: 'b {prompt}'\nbest: 'c'\n", "unknown key"),
    ("- a list\n", "must map"), ("better: 1\n", "must map")])
def test_bad_revision_templates_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_revision_prompts(path)


def test_shipped_sets_by_name_and_an_unknown_name():
    assert load_revision_prompts(None) is SHIPPED["revision"]
    assert {name: load_revision_prompts(name).name for name in SHIPPED} == {name: name for name in SHIPPED}
    unquoted = [p for p in SHIPPED.values() if "{response}" not in p.better + p.worse]  # contrastive instructions
    assert len(unquoted) >= 2 and any(p.role == "system" for p in unquoted)
    with pytest.raises(UserError, match="neither a shipped set"):
        load_revision_prompts("truthfull")


def test_a_template_without_response_does_not_quote_the_answer(tokenizer):
    """Contrastive instructions: the answer is scored after the prompt set's text, never quoted inside it."""
    encoder = PairEncoder(tokenizer, SHIPPED["instruct"], LIMITS)
    encoded = encoder.encode(_pair("Add 2 and 3.", "The sum is 5."))
    better = tokenizer.decode(encoded.chosen.prefixes["better"])
    assert "Add 2 and 3." in better and "Answer correctly" in better and "The sum is 5." not in better


def test_a_system_role_set_precedes_the_conversation_and_keeps_its_system_text(tokenizer):
    encoder = PairEncoder(tokenizer, SHIPPED["truthful"], LIMITS)
    pair = PreferencePair(id="s", prompt=[{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Capital of France?"}],
                          chosen={"role": "assistant", "content": "Paris."},
                          rejected={"role": "assistant", "content": "Rome."})
    encoded = encoder.encode(pair)
    worse = tokenizer.decode(encoded.rejected.prefixes["worse"])
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": SHIPPED["truthful"].worse + "\n\nBe brief."}, pair.prompt[1]],
        tokenize=False, add_generation_prompt=True)
    assert worse == expected
    assert encoded.rejected.prefixes["ref"] == encoded.prompt_ids  # the policy prompt is untouched


def test_fold_system_moves_the_text_into_the_first_user_turn():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    assert fold_system(messages) == [{"role": "user", "content": "S\n\nU"}, *messages[2:]]
    assert fold_system(messages[1:]) == messages[1:]


def test_transcript_of_multi_turn_names_roles():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Sum?"}]
    assert transcript(messages) == "User: Hi\n\nAssistant: Hello\n\nUser: Sum?"
    assert transcript(messages[:1]) == "Hi"


def test_tokenizer_fingerprint_tracks_the_chat_template(tokenizer):
    before = tokenizer_fingerprint(tokenizer)
    assert before == tokenizer_fingerprint(tokenizer)
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = original + " "
        assert tokenizer_fingerprint(tokenizer) != before
    finally:
        tokenizer.chat_template = original


def test_tokenizer_without_chat_template_is_refused(tokenizer):
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        with pytest.raises(UserError, match="--chat-template"):
            PairEncoder(tokenizer, DEFAULT_REVISION_PROMPTS, LIMITS)
    finally:
        tokenizer.chat_template = original
