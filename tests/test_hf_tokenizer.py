"""benchmarks/hf_tokenizer.py: the tokenizer.json it builds for `transformers` reads text as
sentencepiece does."""
import random
import string

import pytest
import sentencepiece

from benchmarks.hf_tokenizer import build
from conftest import MISTRAL_DATA

WORDS = "the river flows past a naïve café near 東京 and 🤖 robots , ; ( ) 42 3.14 def return".split()


def sample_texts(count: int) -> list[str]:
    """Words with runs of spaces, tabs and new lines between them, and strings of random
    characters: where a merge list and sentencepiece's own search could disagree."""
    rng = random.Random(0)
    gaps = [" ", " ", " ", "  ", " " * 7, "\n", "\n\n    ", "\t"]
    characters = string.ascii_letters + string.digits + string.punctuation + " " * 12 + "\n\téü東🤖"
    texts = [" leading space", "  two leading spaces", "trailing spaces   ", "x" + " " * 23 + "y"]
    for _ in range(count):
        texts.append("".join(rng.choice(WORDS) + rng.choice(gaps) for _ in range(rng.randrange(1, 40))))
        texts.append("".join(rng.choice(characters) for _ in range(rng.randrange(1, 80))))
    return texts


@pytest.mark.parametrize("model_file", ["mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v1"])
def test_tokenizer_json_encodes_and_decodes_as_sentencepiece(model_file):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(MISTRAL_DATA / model_file))
    tokenizer = build(MISTRAL_DATA / model_file)
    for text in sample_texts(300):
        ids = sp.encode(text)
        assert tokenizer.encode(text, add_special_tokens=False).ids == ids, repr(text)
        assert tokenizer.decode(ids) == sp.decode(ids), repr(text)
    assert tokenizer.encode("hello").ids == [sp.bos_id(), *sp.encode("hello")]


def test_control_pieces_are_special_tokens():
    sp = sentencepiece.SentencePieceProcessor(model_file=str(MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3"))
    tokenizer = build(MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3")
    assert tokenizer.encode("[INST]", add_special_tokens=False).ids == [sp.piece_to_id("[INST]")]
    assert tokenizer.decode([sp.bos_id(), sp.piece_to_id("[INST]")], skip_special_tokens=True) == ""
