"""Tokenizer: both backends, chat templates, and the sandbox that renders them."""

import os
import shutil
from pathlib import Path

import pytest

from conftest import MISTRAL_DATA, SMOLLM2_DIR, SMOLLM2_GGUF, save_sentencepiece_as_hf
from server.engine.chat_template import render_template
from server.engine.tokenizer import HuggingFaceTokenizer, MistralCommonTokenizer, Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan?"},
]


def test_mistral_tokenizer_file_wins_over_tokenizer_json(hf_v1_dir, tmp_path):
    shutil.copytree(hf_v1_dir, tmp_path, dirs_exist_ok=True)
    shutil.copy(MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3", tmp_path / "tokenizer.model.v3")
    assert isinstance(Tokenizer.load(str(tmp_path)), MistralCommonTokenizer)


def test_sentencepiece_hf_tokenizer_loads_its_full_vocabulary(hf_v1):
    assert isinstance(hf_v1, HuggingFaceTokenizer)
    assert (hf_v1.vocab_size, hf_v1.bos_token_id, hf_v1.eos_token_ids) == (32000, 1, {2})


def test_gguf_tokenizer_reads_vocabulary_and_eos_from_metadata(smollm2):
    assert smollm2.vocab_size == 49152
    assert smollm2.eos_token_ids == {2}  # <|im_end|>, which ends an assistant turn
    assert smollm2.has_chat_template


@pytest.mark.parametrize(
    "name, adds_bos", [("hf_v1", True), ("mistral_v3", True), ("tekken", True), ("smollm2", False)]
)
def test_encode_adds_bos_only_when_asked_and_the_model_uses_one(request, name, adds_bos):
    tokenizer = request.getfixturevalue(name)
    without = tokenizer.encode("Hello world", add_special_tokens=False)
    assert tokenizer.encode("Hello world") == [tokenizer.bos_token_id] * adds_bos + without
    assert tokenizer.decode(without) == "Hello world"


def test_special_tokens_are_exactly_those_decode_skips(any_tokenizer):
    for token_id in list(any_tokenizer.eos_token_ids) + [any_tokenizer.bos_token_id]:
        assert any_tokenizer.is_special(token_id)
    for token_id in range(2000):
        skipped = any_tokenizer.decode([token_id]) == "" and any_tokenizer.decode([token_id], False) != ""
        assert any_tokenizer.is_special(token_id) == skipped, token_id


def test_token_text_keeps_the_leading_space_of_a_word(any_tokenizer):
    paris = any_tokenizer.encode("The capital is Paris", add_special_tokens=False)[-1]
    assert any_tokenizer.token_text(paris) == " Paris"


def test_token_text_shows_special_tokens(mistral_v3, smollm2):
    assert mistral_v3.token_text(2) == "</s>"
    assert smollm2.token_text(2) == "<|im_end|>"


def test_mistral_v3_chat_matches_mistral_commons_own_encoding(mistral_v3):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    reference = MistralTokenizer.from_file(str(MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3"))
    request = ChatCompletionRequest(messages=[
        SystemMessage(content="You answer in one word."),
        UserMessage(content="What is the capital of France?"),
        AssistantMessage(content="Paris."),
        UserMessage(content="And of Japan?"),
    ])
    assert mistral_v3.apply_chat_template(CONVERSATION) == reference.encode_chat_completion(request).tokens


def test_mistral_chat_renders_as_readable_text(mistral_v3):
    text = mistral_v3.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert text == "<s>[INST] What is the capital of France?[/INST]"


def test_mistral_chat_that_breaks_its_rules_is_a_template_error(mistral_v3):
    with pytest.raises(ValueError, match="^Template error: "):
        mistral_v3.apply_chat_template([{"role": "assistant", "content": "I speak first."}])


def test_content_parts_read_as_one_string(any_tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    plain = [{"role": "user", "content": "What is the capital of France?"}]
    assert any_tokenizer.apply_chat_template(parts) == any_tokenizer.apply_chat_template(plain)


def test_smollm2_question_gets_the_ids_transformers_gives(smollm2, smollm2_transformers):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = smollm2_transformers.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False)
    assert smollm2.apply_chat_template(messages) == expected


def test_a_gguf_tokenizer_is_made_once_and_read_back_alike(smollm2_transformers, tmp_path, monkeypatch):
    """The first load makes the tokenizer from the GGUF file and saves it (over a damaged copy
    here); the next reads it back without the file, and encodes, decodes and templates as
    transformers' own does."""
    import server.engine.tokenizer as module

    monkeypatch.setattr(module, "GGUF_TOKENIZERS", tmp_path)
    folder = module.gguf_tokenizer_folder(Path(SMOLLM2_DIR) / SMOLLM2_GGUF)
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{not json")
    loads, auto = [], module.AutoTokenizer

    class Recording:
        @staticmethod
        def from_pretrained(path, **kwargs):
            loads.append((path, kwargs.get("gguf_file")))
            return auto.from_pretrained(path, **kwargs)

    monkeypatch.setattr(module, "AutoTokenizer", Recording)
    made = HuggingFaceTokenizer(SMOLLM2_DIR, SMOLLM2_GGUF)
    read = HuggingFaceTokenizer(SMOLLM2_DIR, SMOLLM2_GGUF)
    assert loads == [(str(folder), None), (SMOLLM2_DIR, SMOLLM2_GGUF), (str(folder), None)]
    for text in ("Hello world", "  two spaces\n\ttab", "é ü 中文 🙂", "<|im_start|>user\nhi<|im_end|>"):
        ids = smollm2_transformers.encode(text)
        assert made.encode(text) == read.encode(text) == ids
        assert made.decode(ids) == read.decode(ids) == smollm2_transformers.decode(ids, skip_special_tokens=True)
    for tokenizer in (made, read):
        assert (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_ids) == (49152, 1, {2})
        assert tokenizer.apply_chat_template(CONVERSATION) == smollm2_transformers.apply_chat_template(
            CONVERSATION, add_generation_prompt=True, return_dict=False)


def test_a_gguf_tokenizer_folder_is_named_by_the_file_it_came_from(tmp_path, monkeypatch):
    import server.engine.tokenizer as module
    from server.engine.tokenizer import gguf_tokenizer_folder

    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(8))
    named = gguf_tokenizer_folder(path)
    assert gguf_tokenizer_folder(path) == named
    os.utime(path, ns=(0, 10**18))
    touched = gguf_tokenizer_folder(path)
    assert touched != named  # the file rewritten in place
    monkeypatch.setattr(module.transformers, "__version__", "0.0.1")  # the module it reads, whatever sys.modules holds
    assert gguf_tokenizer_folder(path) not in (named, touched)  # made by another transformers


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_conversation_renders_as_transformers_does(
        smollm2, smollm2_transformers, add_generation_prompt):
    expected = smollm2_transformers.apply_chat_template(
        CONVERSATION, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert smollm2.apply_chat_template(CONVERSATION, add_generation_prompt) == expected


def test_template_from_a_saved_tokenizer_writes_bos_once(hf_v1):
    messages = [{"role": "user", "content": "Hi"}]
    assert hf_v1.render_chat(messages) == "<s>[INST] Hi [/INST]"
    ids = hf_v1.apply_chat_template(messages)
    assert ids[0] == 1 and ids.count(1) == 1


def test_tokenizer_without_template_says_template_not_found(tmp_path):
    save_sentencepiece_as_hf(MISTRAL_DATA / "tokenizer.model.v1", tmp_path, chat_template=None)
    tokenizer = Tokenizer.load(str(tmp_path))
    assert not tokenizer.has_chat_template
    with pytest.raises(ValueError, match="^Template error: template not found$"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_raise_exception_in_a_template_is_a_template_error():
    template = (
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('Conversations start with a user') }}"
        "{% endif %}"
    )
    with pytest.raises(ValueError, match="^Template error: Conversations start with a user$"):
        render_template(template, messages=[{"role": "assistant", "content": "Hi"}])


def test_template_syntax_error_is_a_template_error():
    with pytest.raises(ValueError, match="^Template error: "):
        render_template("{{ messages[0]['content'] ", messages=[])


def test_template_cannot_mutate_or_reach_outside_its_values():
    with pytest.raises(ValueError, match="unsafe"):
        render_template("{{ messages.append(1) }}", messages=[])
    with pytest.raises(ValueError, match="unsafe"):
        render_template("{{ messages.__class__.__mro__ }}", messages=[])


def test_template_output_is_bounded():
    with pytest.raises(ValueError, match="^Template error: output exceeds"):
        render_template("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}")


def test_template_helpers_work_as_in_transformers():
    assert render_template("{{ strftime_now('%Y') | length }}") == "4"
    assert render_template("{{ tools | tojson }}", tools=[{"name": "météo<"}]) == '[{"name": "météo<"}]'
    loop_with_break = "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    assert render_template(loop_with_break) == "01"


def test_token_bytes_spell_the_text_each_token_stands_for(any_tokenizer):
    text = 'Hello {"a": [1, 2.5e3]} héllo 梦 🦊\n\ttab'
    spelled_by = any_tokenizer.token_bytes()
    spelled = b"".join(spelled_by[t] for t in any_tokenizer.encode(text, add_special_tokens=False)).decode()
    assert spelled in (text, " " + text)  # SentencePiece's leading space
    assert all(spelled_by[t] is None for t in any_tokenizer.eos_token_ids)
    assert len(spelled_by) == any_tokenizer.vocab_size
