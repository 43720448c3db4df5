"""One generated sequence and the request that owns one or more of them."""
from __future__ import annotations

import enum
import time
from array import array
from dataclasses import dataclass, field

from server.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids of one sequence (prompt + output) and its place in the KV cache.

    `num_computed_tokens` counts tokens whose K/V are in the cache or queued to be written
    there; the engine advances it in chunks as it queues steps, and preemption resets it to 0
    (the tokens are recomputed later). A token sampled by a step that is queued but not yet
    read back is pending: it counts in the length, and the next step may already compute it.
    """

    def __init__(self, seq_id: int, request: "Request", index: int, seed: int):
        self.seq_id = seq_id
        self.request = request
        self.index = index  # position among the request's best_of samples
        self.seed = seed
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.num_pending = 0  # 1 while a sampled token is still on the device
        self.pending_row = -1  # its row among that step's picks
        self.pending_is_last = False  # it ends the sequence whatever it is (a length limit)
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at admission
        self.block_table = array("q")  # block ids (an array: the runner copies it out as bytes)
        self.block_hashes: list[bytes] = []  # prefix-cache keys of the full blocks, in order
        self.num_committed_blocks = 0  # leading blocks already published to the prefix cache
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.output_logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0
        self.text = ""  # detokenized output, stop strings already cut
        self.token_texts: list[str] = []  # the text each output token added, none cut
        self.emitted_text_len = 0  # how much of `text` has been streamed
        self.sampling_options = None  # the runtime's SamplingOptions, made at the first sample
        self.matcher = None  # a guided sequence's grammar matcher, advanced with every token
        self.drafts: list[int] = []  # tokens proposed to check in this step (speculative decoding)
        self.ngrams = None  # the proposer's index of its n-grams, once it speculates
        self.draft_cache = None  # its place in a draft model's KV cache (DraftCache), once it speculates
        self.medusa: list[int] = []  # Medusa heads' picks after its last token, the next proposals
        self.step_logprobs: list[float] = []  # the logprobs of the tokens the last step accepted

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __len__(self) -> int:
        return len(self.token_ids) + self.num_pending

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, len={len(self)}, computed={self.num_computed_tokens}, "
                f"status={self.status.value})")


@dataclass
class Request:
    """What a caller asked for: a prompt, its sampling settings, and the sequences sampled."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    sequences: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    seed: int | None = None  # the request's seed, drawn at random when none was given
    aborted: bool = False
    lora_slot: int = -1  # the adapter its tokens go through (-1: the base model)
    cache_salt: bytes = b""  # roots its prefix-cache keys: K/V computed through an adapter is its own

    @property
    def is_finished(self) -> bool:
        for seq in self.sequences:
            if seq.status != SequenceStatus.FINISHED:
                return False
        return True
