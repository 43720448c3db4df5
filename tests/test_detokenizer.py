"""IncrementalDetokenizer: streamed deltas add up to the decoded text, and never take anything back."""

import random

import pytest

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.tokenizer import Tokenizer

TEXTS = [
    "Hello world 😀 and 👩‍👩‍👧",
    " leading space\n\ntwo new lines\nand  double  spaces\t\ttabs",
    "naïve façade — “quotes” — Ærøskøbing, ὕβρις",
    "東京は日本の首都です。中文文本！한국어 텍스트",
    "Digits: 3.14159, 1,000,000 and 2024-11-25 ends with an emoji 🇫🇷",
]


def stream(tokenizer: Tokenizer, prompt: list[int], output: list[int], skip_special_tokens: bool = True):
    """Feed output ids one by one; return the deltas and what flush gave at the end."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
    deltas = [detokenizer.add(token_id) for token_id in output]
    flushed = detokenizer.flush()
    assert detokenizer.text == "".join(deltas) + flushed
    return deltas, flushed


def text_after(tokenizer: Tokenizer, prompt: list[int], output: list[int],
               skip_special_tokens: bool = True) -> str:
    """What the output adds to the decoded prompt: the detokenizer's whole text, by definition."""
    prompt_text = tokenizer.decode(prompt, skip_special_tokens)
    full_text = tokenizer.decode(prompt + output, skip_special_tokens)
    assert full_text.startswith(prompt_text)
    return full_text[len(prompt_text) :]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_decoded_text_and_never_hold_half_a_character(any_tokenizer, text):
    ids = any_tokenizer.encode(text, add_special_tokens=False)
    deltas, flushed = stream(any_tokenizer, [], ids)
    assert "".join(deltas) + flushed == any_tokenizer.decode(ids)
    assert not any("\ufffd" in delta for delta in deltas)


def test_first_token_after_the_prompt_keeps_its_leading_space(any_tokenizer):
    prompt = any_tokenizer.encode("The capital of France is")
    full = any_tokenizer.encode("The capital of France is Paris.")
    assert full[: len(prompt)] == prompt
    deltas, flushed = stream(any_tokenizer, prompt, full[len(prompt) :])
    assert deltas[0] == " Paris"
    assert "".join(deltas) + flushed == " Paris."


def test_text_is_given_out_as_soon_as_it_is_final(smollm2):
    ids = smollm2.encode(" one two three", add_special_tokens=False)
    deltas, flushed = stream(smollm2, [], ids)
    assert deltas == [" one", " two", " three"] and flushed == ""


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_are_skipped_or_shown_as_decode_does(any_tokenizer, skip_special_tokens):
    eos = next(iter(any_tokenizer.eos_token_ids))
    hello = any_tokenizer.encode("Hello", add_special_tokens=False)
    there = any_tokenizer.encode(" there", add_special_tokens=False)
    ids = hello + [eos, eos] + there + [eos]
    prompt = [any_tokenizer.bos_token_id]
    deltas, flushed = stream(any_tokenizer, prompt, ids, skip_special_tokens)
    assert "".join(deltas) + flushed == text_after(any_tokenizer, prompt, ids, skip_special_tokens)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_decode_to_the_same_garbage_once_flushed(any_tokenizer, skip_special_tokens):
    # Half the ids come from the low ids, where byte-fallback and special tokens live, so that
    # runs of invalid bytes (which some decoders rewrite as a whole) occur in every sample.
    rng = random.Random(0)
    for _ in range(10):
        ids = [rng.randrange(any_tokenizer.vocab_size) if rng.random() < 0.5 else rng.randrange(1300)
               for _ in range(60)]
        deltas, flushed = stream(any_tokenizer, [], ids, skip_special_tokens)
        assert "".join(deltas) + flushed == any_tokenizer.decode(ids, skip_special_tokens)


class RecordingTokenizer:
    """Passes calls through to a tokenizer and notes the longest list it was asked to decode."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.longest_decode = 0
        self.decodes = 0

    def decode(self, token_ids, skip_special_tokens=True):
        self.decodes += 1
        self.longest_decode = max(self.longest_decode, len(token_ids))
        return self._tokenizer.decode(token_ids, skip_special_tokens)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_each_step_decodes_a_short_window_not_the_whole_output(hf_v1):
    recording = RecordingTokenizer(hf_v1)
    prompt = hf_v1.encode("A long story: ")
    output = hf_v1.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    deltas, flushed = stream(recording, prompt, output)
    assert "".join(deltas) + flushed == text_after(hf_v1, prompt, output)
    assert recording.longest_decode < 20


def test_whole_word_tokens_after_final_text_need_no_decoding(any_tokenizer):
    recording = RecordingTokenizer(any_tokenizer)
    prompt = any_tokenizer.encode("Once upon a time")
    output = any_tokenizer.encode(" there was a king who lived in a castle", add_special_tokens=False)
    deltas, flushed = stream(recording, prompt, output)
    assert "".join(deltas) + flushed == text_after(any_tokenizer, prompt, output)
    # Each token's own text is looked up once per tokenizer (not through the detokenizer), so
    # the stream itself decodes nothing but the final flush's window.
    assert recording.decodes <= 2
