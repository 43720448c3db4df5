"""Stop conditions of one sequence, checked after every appended token."""
from __future__ import annotations

from server.engine.sequence import Sequence


def find_stop_string(text: str, new_len: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends within the last `new_len` characters of `text`."""
    best = None
    for stop in stops:
        start = max(0, len(text) - new_len - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def check_token_stop(seq: Sequence, token_id: int, eos_token_ids: set[int], max_model_len: int) -> None:
    """Set `seq.finish_reason` if the token just appended ends it: EOS, a stop token id, or
    the length limits."""
    params = seq.params
    num_out = seq.num_output_tokens
    if num_out >= params.min_tokens:
        if token_id in eos_token_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
            return
        if token_id in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token_id
            return
    if (params.max_tokens is not None and num_out >= params.max_tokens) or len(seq) >= max_model_len:
        seq.finish_reason = "length"


def check_text_stop(seq: Sequence, new_text_len: int) -> bool:
    """Whether a stop string ends within the last `new_text_len` characters of `seq.text`; if
    so, cut the text there and finish the sequence (this outranks a length limit reached at
    the same token)."""
    params = seq.params
    if not params.stop_strings or seq.num_output_tokens < params.min_tokens:
        return False
    match = find_stop_string(seq.text, new_text_len, params.stop_strings)
    if match is None:
        return False
    index, stop = match
    seq.text = seq.text[:index + len(stop) if params.include_stop_str_in_output else index]
    seq.finish_reason, seq.stop_reason = "stop", stop
    return True


def stable_text_len(seq: Sequence) -> int:
    """How much of `seq.text` can be streamed: text a stop string could still cut is held back."""
    if seq.finish_reason is not None or not seq.params.stop_strings:
        return len(seq.text)
    hold = max(len(s) for s in seq.params.stop_strings) - 1
    return max(seq.emitted_text_len, len(seq.text) - hold)
