"""Generated token ids -> text deltas that never change once given out.

The text of a token depends on its neighbours: SentencePiece drops the leading space of the
first word of a string, and a character may be spread over several byte tokens. So each step
decodes a short window twice, with and without the newest tokens, and gives out the difference,
once that difference is final: it must not end in U+FFFD (a character still missing bytes) nor
in a byte run that the decoder could still rewrite. Most tokens skip the decoding: a whole-word
token after final text adds the text it adds anywhere (`Tokenizer.plain_text`).
"""

from server.engine.tokenizer import Tokenizer

# Prompt tokens decoded before the first output token, so that it keeps its leading space.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The window: ids[:read_offset] is text already given out, kept as context for the rest.
        self._ids = [t for t in prompt_token_ids if not self._skipped(t)][-PROMPT_CONTEXT_TOKENS:]
        self._read_offset = len(self._ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Take the next generated token; return the text that became final with it."""
        if self._skipped(token_id):
            return ""
        if self._read_offset == len(self._ids) > 0:  # nothing held back: usually one lookup
            text = self._tokenizer.plain_text(token_id)
            if text is not None:
                self._ids = [token_id]
                self._read_offset = 1
                return self._give_out(text)
        self._ids.append(token_id)
        if self._tokenizer.extends_byte_run(token_id):
            return ""
        context_text, window_text = self._decode_window()
        if len(window_text) <= len(context_text) or window_text.endswith("\ufffd"):
            return ""
        # What was new becomes the context of the next step; older tokens no longer matter.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        return self._give_out(window_text[len(context_text) :])

    def flush(self) -> str:
        """At the end of generation, give out what was held back, complete or not."""
        context_text, window_text = self._decode_window()
        self._read_offset = len(self._ids)
        return self._give_out(window_text[len(context_text) :])

    def _decode_window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        skip = self._skip_special_tokens
        return decode(self._ids[: self._read_offset], skip), decode(self._ids, skip)

    def _give_out(self, delta: str) -> str:
        self.text += delta
        return delta

    def _skipped(self, token_id: int) -> bool:
        # Dropped before decoding, so that a run of special tokens doesn't grow the window.
        return self._skip_special_tokens and self._tokenizer.is_special(token_id)
