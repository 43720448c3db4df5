"""Text <-> token ids for one model, and the model's chat format.

Two backends answer the same questions. Mistral's own tokenizer (mistral-common) is preferred
when the model directory ships one (`tekken.json`, `tokenizer.model.v*`), even beside a
tokenizer.json: Mistral's chat format is defined by that library's code, not by a template.
Everything else goes through a Hugging Face tokenizer, whose chat template we render ourselves
in a sandbox, since the template is code that came with the weights.
"""

import hashlib
import json
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from functools import cached_property
from itertools import groupby
from pathlib import Path

import transformers
from huggingface_hub.constants import HF_HOME
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from server.engine.chat_template import (flatten_content, mistral_call_ids, pick_template, render_template,
                                         template_variables, tool_calls_as_text)


class Tokenizer(ABC):
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: set[int]
    has_chat_template: bool
    takes_tools: bool  # whether the chat format shows the model the `tools` it is given

    @classmethod
    def load(cls, path: str, gguf_file: str | None = None) -> "Tokenizer":
        directory = Path(path)
        if gguf_file is None:
            mistral_files = [*directory.glob("tekken.json"), *sorted(directory.glob("tokenizer.model.v*"))]
            if mistral_files:
                return MistralCommonTokenizer(str(mistral_files[0]))
        return HuggingFaceTokenizer(path, gguf_file)

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @abstractmethod
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Whether decode(..., skip_special_tokens=True) drops this token."""

    def encode_with_offsets(self, text: str) -> list[tuple[int, int, int]]:
        """(token id, start, stop) character offsets of each token of `encode(text)`.

        This fallback measures how much text each token adds, decoding a short window before
        it so that SentencePiece's dropped leading space and multi-byte runs come out right.
        """
        token_ids = self.encode(text)
        out, position = [], 0
        for i, token_id in enumerate(token_ids):
            if self.is_special(token_id):
                out.append((token_id, position, position))
                continue
            window = token_ids[max(0, i - 6):i]
            added = len(self.decode(window + [token_id])) - len(self.decode(window))
            stop = min(len(text), position + max(0, added))
            out.append((token_id, position, stop))
            position = stop
        return out

    @abstractmethod
    def token_bytes(self) -> list[bytes | None]:
        """The bytes each token id adds inside a text, by id (what grammars are matched
        against); None for a special token, which no text spells."""

    def extends_byte_run(self, token_id: int) -> bool:
        """Whether decode joins this token with its neighbouring byte tokens into one run
        whose text can still change when the next byte arrives (so text ending here is not final)."""
        return False

    @abstractmethod
    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]: ...

    @abstractmethod
    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str: ...

    def token_text(self, token_id: int) -> str:
        # Decoded after a plain anchor token, so a SentencePiece word keeps its leading space
        # (" Paris", as it reads inside generated text) instead of losing it at the string start.
        anchor, anchor_text = self._anchor
        return self.decode(anchor + [token_id], skip_special_tokens=False)[len(anchor_text) :]

    def plain_text(self, token_id: int) -> str | None:
        """The text this token adds after any complete, non-empty text, or None where that
        depends on its neighbours (special and byte tokens, pieces of a character).
        Remembered per token: the detokenizer asks for every generated token."""
        texts = self._plain_texts
        if token_id not in texts:
            text = None
            if not self.is_special(token_id) and not self.extends_byte_run(token_id):
                text = self.token_text(token_id)
                if not text or "\ufffd" in text:
                    text = None
            texts[token_id] = text
        return texts[token_id]

    @cached_property
    def _plain_texts(self) -> dict[int, str | None]:
        return {}

    @cached_property
    def _anchor(self) -> tuple[list[int], str]:
        anchor = self.encode("a", add_special_tokens=False)[-1:]
        return anchor, self.decode(anchor, skip_special_tokens=False)


# Tokenizers that transformers made from GGUF files, one folder each (see `gguf_tokenizer`).
GGUF_TOKENIZERS = Path(HF_HOME) / "tgi-py" / "gguf-tokenizers"


def gguf_tokenizer_folder(gguf_path: Path) -> Path:
    """Where the tokenizer made from this GGUF file is kept: named by the file (its path, size
    and modification time) and by transformers' version, which made it."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{transformers.__version__}"
    return GGUF_TOKENIZERS / hashlib.sha256(key.encode()).hexdigest()[:32]


def gguf_tokenizer(path: str, gguf_file: str):
    """A GGUF file's tokenizer. transformers builds it from the file's vocabulary and merges in
    5-10 s (SmolLM2's 49,152 tokens, 2 CPU cores), on every load; so the first load saves what
    it built (`save_pretrained`) in `gguf_tokenizer_folder`, and later loads read that back in a
    fraction of a second. A copy that cannot be read is made again; a cache folder that cannot
    be written costs only the time."""
    folder = gguf_tokenizer_folder(Path(path) / gguf_file)
    if (folder / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception:  # a damaged copy (bad JSON, a missing file, tokenizers' own errors): make it anew
            shutil.rmtree(folder, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    staging = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=folder.parent)
        tokenizer.save_pretrained(staging)
        Path(staging).rename(folder)  # whole or not at all; a process that got there first wrote the same
    except OSError:
        pass
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, path: str, gguf_file: str | None = None):
        self._tok = gguf_tokenizer(path, gguf_file) if gguf_file else AutoTokenizer.from_pretrained(path)
        self.vocab_size = len(self._tok)
        # transformers 5 builds some slow-format tokenizers with an empty vocabulary instead of failing.
        if self.vocab_size == 0:
            raise ValueError(f"tokenizer at {path} loaded with an empty vocabulary")
        self.bos_token_id = self._tok.bos_token_id
        self.eos_token_ids = {self._tok.eos_token_id} if self._tok.eos_token_id is not None else set()
        added = self._tok.backend_tokenizer.get_added_tokens_decoder()
        self._special_ids = {i for i, t in added.items() if t.special}
        self._byte_run_ids = self._byte_fallback_ids()
        self._template = pick_template(self._tok.chat_template)
        self.has_chat_template = self._template is not None
        self.takes_tools = self.has_chat_template and "tools" in template_variables(self._template)

    def _byte_fallback_ids(self) -> set[int]:
        # Hugging Face's ByteFallback decoder turns a whole run of <0xNN> tokens into U+FFFD
        # as soon as one byte in it is invalid, rewriting text that looked complete before.
        if not getattr(self._tok.backend_tokenizer.model, "byte_fallback", False):
            return set()
        byte_token = re.compile(r"<0x[0-9A-Fa-f]{2}>")
        return {i for t, i in self._tok.get_vocab().items() if byte_token.fullmatch(t)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def encode_with_offsets(self, text: str) -> list[tuple[int, int, int]]:
        encoding = self._tok(text, return_offsets_mapping=True)
        return [(i, start, stop) for i, (start, stop)
                in zip(encoding["input_ids"], encoding["offset_mapping"])]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        # Clean-up of tokenization spaces would make the text of a prefix change as tokens follow it.
        return self._tok.decode(
            token_ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def extends_byte_run(self, token_id: int) -> bool:
        return token_id in self._byte_run_ids

    def token_bytes(self) -> list[bytes | None]:
        backend = self._tok.backend_tokenizer
        byte_level = "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("decoder"))
        piece_bytes = _byte_level_bytes if byte_level else _sentencepiece_bytes
        added = backend.get_added_tokens_decoder()
        out = []
        for token_id, piece in enumerate(self._tok.convert_ids_to_tokens(list(range(self.vocab_size)))):
            if token_id in self._special_ids or piece is None:
                out.append(None)
            else:  # added tokens are stored as their text, the others in the model's alphabet
                out.append(piece.encode() if token_id in added else piece_bytes(piece))
        return out

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, tools)
        # The template writes BOS itself.
        return self.encode(text, add_special_tokens=False)

    def render_chat(self, messages, add_generation_prompt=True, tools=None) -> str:
        if self._template is None:
            raise ValueError("Template error: template not found")
        messages = flatten_content(messages)
        if "tool_calls" not in self._template:
            messages = tool_calls_as_text(messages)
        return render_template(
            self._template,
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._tok.bos_token or "",
            eos_token=self._tok.eos_token or "",
        )


class MistralCommonTokenizer(Tokenizer):
    def __init__(self, file: str):
        self._mistral = MistralTokenizer.from_file(file)
        self._tok = self._mistral.instruct_tokenizer.tokenizer
        self.vocab_size = self._tok.n_words
        self.bos_token_id = self._tok.bos_id
        self.eos_token_ids = {self._tok.eos_id}
        self.has_chat_template = True
        self.takes_tools = True  # mistral-common writes them in the model's own format
        # Asked of every generated token: a set lookup rather than a call into mistral-common.
        self._special_ids = frozenset(i for i in range(self.vocab_size) if self._tok.is_special(i))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, bos=add_special_tokens, eos=False)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return self._tok.decode(token_ids, special_token_policy=SpecialTokenPolicy.IGNORE)
        # mistral-common's KEEP policy shows SentencePiece pieces ("▁Hello", "<0x0A>") rather than
        # text, so we decode the runs between special tokens ourselves.
        parts = []
        for special, run in groupby(token_ids, self._tok.is_special):
            run = list(run)
            if special:
                parts.extend(self._tok.id_to_piece(t) for t in run)
                continue
            text = self._tok.decode(run)
            # SentencePiece drops the space before the first word of a string; inside text it stays.
            if parts and self._tok.id_to_piece(run[0]).startswith("▁"):
                text = " " + text
            parts.append(text)
        return "".join(parts)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_bytes(self) -> list[bytes | None]:
        tok = self._tok
        if isinstance(tok, Tekkenizer):
            return [None if tok.is_special(i) else tok.id_to_byte_piece(i) for i in range(self.vocab_size)]
        return [None if tok.is_special(i) or i == tok.unk_id else _sentencepiece_bytes(tok.id_to_piece(i))
                for i in range(self.vocab_size)]

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None) -> list[int]:
        # Mistral's format has no generation prompt: a conversation ending in a user turn is
        # always ready for the assistant's answer.
        try:
            request = ChatCompletionRequest.from_openai(mistral_call_ids(flatten_content(messages)), tools=tools)
            return self._mistral.encode_chat_completion(request).tokens
        # mistral-common's own checks raise several kinds of errors (a message without content
        # is a TypeError deep inside it): any of them is the conversation's fault.
        except (MistralCommonException, ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"Template error: {e}") from e

    def render_chat(self, messages, add_generation_prompt=True, tools=None) -> str:
        ids = self.apply_chat_template(messages, add_generation_prompt, tools)
        return self.decode(ids, skip_special_tokens=False)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_BYTE_LEVEL = {char: byte for byte, char in bytes_to_unicode().items()}


def _sentencepiece_bytes(piece: str) -> bytes:
    """A SentencePiece piece: "▁" is a space, "<0xNN>" the byte it names (byte fallback)."""
    byte = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(byte.group(1), 16)]) if byte else piece.replace("▁", " ").encode()


def _byte_level_bytes(piece: str) -> bytes:
    """A byte-level BPE piece (GPT-2's alphabet: one printable character per byte)."""
    return bytes(_BYTE_LEVEL[char] for char in piece)
