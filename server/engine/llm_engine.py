"""The engine core: requests in, one scheduled model step at a time, outputs out."""
from __future__ import annotations

import atexit
import dataclasses
import gc
import itertools
import logging
import secrets
import time

import torch

from server.config import EngineArgs, EngineConfig, SchedulerConfig
from server.engine.block_manager import BlockManager
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.guidance import Guidance
from server.engine.output_deltas import OutputDelta, OutputEncoder, SentCompletion, tail
from server.engine.scheduler import Scheduler
from server.engine.sequence import Request, Sequence, SequenceStatus
from server.engine.draft_model import DraftModelProposer, check_same_vocabulary
from server.engine.speculation import MedusaProposer, NgramProposer, speculation_depth
from server.engine.stop import check_text_stop, check_token_stop, stable_text_len
from server.engine.tokenizer import Tokenizer
from server.models.medusa import check_medusa, medusa_speculator
from server.outputs import CompletionOutput, RequestMetrics, RequestOutput
from server.runtime.model_runner import SequenceChunk
from server.runtime.random import row_key
from server.runtime.sampler import SamplingOptions
from server.runtime.setup import DRAFT_WITHOUT_TENSOR_PARALLELISM, launched_rank, leave_group, start_runner
from server.runtime.workers import Workers, free_port
from server.sampling_params import LoRARequest, SamplingParams


TO_BE_SET = SamplingOptions()  # marks a chunk that samples, until its options are made

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, args: EngineArgs):
        if args.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be positive, got {args.tensor_parallel_size}")
        if not 0 < args.cuda_memory_fraction <= 1:
            raise ValueError(f"cuda_memory_fraction must be in (0, 1], got {args.cuda_memory_fraction}")
        if (args.block_size is not None and args.block_size < 1) or args.max_batch_prefill_tokens < 1 \
                or args.max_num_seqs < 1:
            raise ValueError("block_size, max_batch_prefill_tokens and max_num_seqs must be positive")
        if args.speculative_model and args.speculate < 1:
            raise ValueError("a draft model (speculative_model) needs a number of tokens to propose a step "
                             "(speculate, num_speculative_tokens) of 1 or more")
        if args.speculative_model and args.tensor_parallel_size > 1:
            raise ValueError(DRAFT_WITHOUT_TENSOR_PARALLELISM)  # before the other ranks start
        if args.tensor_parallel_size > 1 and medusa_speculator(args.model, args.revision, args.download_dir):
            check_medusa(args, args.tensor_parallel_size)  # before the other ranks start
        self.workers = None
        port = 0
        if args.tensor_parallel_size > 1 and launched_rank() is None:
            port = free_port()
            self.workers = Workers(args, port)
        started = start_runner(args, 0, port)
        self.runner = started.runner
        self.source = started.source  # the model's files (a Medusa speculator's: its base model's)
        self.tokenizer = Tokenizer.load(started.source.path, started.source.gguf_file)
        model, num_blocks, max_model_len = started.model, started.cache.num_blocks, started.max_model_len
        self.config = EngineConfig(
            model=model, cache=started.cache,
            scheduler=SchedulerConfig(args.max_batch_prefill_tokens, args.max_num_seqs, max_model_len,
                                      args.waiting_served_ratio, args.max_waiting_tokens),
            dtype=started.dtype, device=started.device, model_id=started.source.model_id)
        if args.tensor_parallel_size > 1:
            self.runner.sends_steps = True
            atexit.register(self.shutdown)
        self.block_manager = BlockManager(num_blocks, started.cache.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.config.scheduler, self.block_manager)
        self.eos_token_ids = set(model.eos_token_ids) | self.tokenizer.eos_token_ids
        self.guidance = Guidance(self.tokenizer, model.vocab_size, self.eos_token_ids,
                                 on_gpu=started.device.startswith("cuda"))
        self.lora_adapters = {name: slot for slot, name in enumerate(started.lora_adapters)}
        # Speculative decoding: up to `speculate` tokens proposed a step, by Medusa heads, a draft
        # model or else n-gram lookup, checked in one forward pass; fewer or none in large batches.
        self.speculate = started.speculate
        self.speculate_max_batch_size = args.speculate_max_batch_size
        self.proposer = self._proposer(args, started) if self.speculate else None
        self.num_speculated = self.num_accepted = 0  # proposed tokens, and those the model kept
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._unfinished_outputs: list[Sequence] = []  # sampled last step, text not yet made
        self.stream_outputs = True  # False: an output only when a request finishes (offline use)
        # Set (by the engine's own process): steps return each request's OutputDelta, made
        # from its sequences, instead of a cumulative RequestOutput that copies every list
        self.delta_encoder: OutputEncoder | None = None
        self.async_scheduling = args.async_scheduling  # queue each step before reading the last one back
        self._in_flight = None  # (batch, launched step) queued and not yet read back
        self._stepping: list = []  # the batches the step under way touches (for failures)
        self._suspects: list[Request] = []  # in a failed step with others: each runs alone next
        # The model, its cache and the tokenizer live as long as the engine: keep them out of
        # the garbage collector's scans, which otherwise grow with every step's small objects.
        # What an earlier engine froze is unfrozen first, so that one dropped since (in a
        # reference cycle, with its cache on the GPU) is collected now rather than never.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    # -- requests -----------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None, lora_request: LoRARequest | None = None) -> str:
        """Validate and queue one request; raises ValueError for bad input."""
        request_id = str(next(self._request_ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        text, token_ids = self._encode(prompt)
        vocab = self.config.model.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids below the vocabulary size {vocab}")
        grammar = self.guidance.grammar(params)
        request = Request(request_id, text, token_ids, params)
        if lora_request is not None:
            request.lora_slot = self.lora_slot(lora_request)
            request.cache_salt = b"lora:" + lora_request.lora_name.encode()
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        request.seed = seed
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        for index in range(params.best_of):
            seq_seed = (seed + index * 0x9E3779B97F4A7C15) % 2**64
            seq = Sequence(next(self._seq_ids), request, index, seq_seed)
            if grammar is not None:
                seq.matcher = self.guidance.matcher(grammar)
            request.sequences.append(seq)
            self.detokenizers[seq.seq_id] = IncrementalDetokenizer(
                self.tokenizer, token_ids, skip_special_tokens=params.skip_special_tokens)
            self.scheduler.add(seq)
        self.requests[request_id] = request
        return request_id

    def lora_slot(self, lora: LoRARequest) -> int:
        slot = self.lora_adapters.get(lora.lora_name)
        if slot is None:
            loaded = ", ".join(self.lora_adapters) or "none"
            raise ValueError(f"LoRA adapter {lora.lora_name!r} is not loaded (loaded: {loaded})")
        return slot

    def _encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
            vocab = self.config.model.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
                raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if not token_ids:
            raise ValueError("prompt must not be empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; the model's context is "
                             f"{self.max_model_len} tokens, so it must be shorter than that")
        return text, token_ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its KV blocks are freed at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.aborted = True
        for seq in request.sequences:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                seq.status = SequenceStatus.FINISHED
                self.scheduler.remove(seq)
            self.detokenizers.pop(seq.seq_id, None)
        return self._output(request)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do with one rank)."""
        if self.runner.sends_steps:
            self.runner.stop_serving()
            if self.workers is not None:
                self.workers.stop()
                self.workers = None
            self.runner.drop_graphs()
            leave_group()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_work(self) -> bool:
        """Whether a step would do anything: run a batch or hand out pending outputs."""
        return self.scheduler.has_work() or bool(self._unfinished_outputs) or self._in_flight is not None

    # -- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch and return the outputs of the requests that advanced.

        With async scheduling, a step is queued before the one before it has been
        read back: the next batch is scheduled as if every sampled token were already known,
        its forward pass queued with those tokens read on the device, and only then is the
        previous step waited for and its tokens accepted; the new step's sampling, whose
        options and grammar masks depend on them, is queued after that. The device so never
        waits for the host's scheduling and input preparation. A sequence that the previous
        token ended is still computed once more; that result is dropped.

        The host work that scheduling does not need (detokenizing, stop strings, building
        outputs) is done after the device has work queued: a call returns the outputs of the
        step read back during it. A stop string so found ends its sequence a step late; the
        extra token is dropped.

        A step that fails is contained (`_contain`): the request that caused it ends with the
        error in its output (`RequestOutput.error`), and the others go on with the tokens
        they would have had alone.
        """
        try:
            return self._step()
        except Exception as error:
            if self.runner.sends_steps:
                raise  # the other ranks wait for this step's messages: nothing to redo it over
            return self._contain(error)

    def _step(self) -> list[RequestOutput]:
        if self.speculate:
            self._propose()
        batch = self.scheduler.schedule()
        self._stepping = [batch] + ([self._in_flight[0]] if self._in_flight is not None else [])
        forward = self._launch_forward(batch) if batch else None
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            self._complete(*in_flight)
        if forward is not None:
            launched = self._launch_sampling(batch, forward)
            if launched is not None:
                self._in_flight = (batch, launched)
        outputs = self._finish_outputs()
        # While suspects run alone, each step is read back before the next one is scheduled,
        # so that a failure has one request in it; with speculation, so that proposals follow
        # the tokens the last step accepted (a batch too large to speculate keeps its steps queued).
        if self._in_flight is not None and (not self.async_scheduling or self._suspects or self._speculation_depth()):
            in_flight, self._in_flight = self._in_flight, None
            self._complete(*in_flight)
        self._stepping = []
        self._isolate_next()
        return outputs

    def _contain(self, error: Exception) -> list[RequestOutput]:
        """After a failed step: every running sequence goes back to the queue, to be
        recomputed from the tokens accepted so far (sampling is keyed by seed and position, so
        it picks the same tokens again). With one request in the step, that request caused it
        and ends with the error; with several, each runs alone until it has sampled a token
        (the others wait), so that the one that fails again is found and ended, and only it."""
        requests = list({seq.request.request_id: seq.request for batch in self._stepping
                         for seq in batch.seqs if seq.request.request_id in self.requests}.values())
        self._stepping, self._in_flight = [], None
        for seq in self.scheduler.running:
            seq.num_pending, seq.pending_is_last = 0, False
        self.scheduler.requeue_running()
        if not requests:
            raise error
        if len(requests) == 1:
            logger.warning("request %s failed during generation: %r", requests[0].request_id, error)
            outputs = [self._failed(requests[0], error)]
        else:
            logger.warning("a step of %d requests failed (%r): running each alone to find the cause",
                           len(requests), error)
            self._suspects = requests + [r for r in self._suspects if r not in requests]
            outputs = []
        self._isolate_next()
        return outputs

    def _failed(self, request: Request, error: Exception) -> RequestOutput:
        """End a request whose own work failed; its output says why."""
        output = self.abort(request.request_id)
        output.error = str(error) or type(error).__name__
        return output

    def _isolate_next(self) -> None:
        """Point the scheduler at the first suspect still running (none: everyone runs). The
        requests that ran before it go back to the queue, so that their blocks cannot keep it
        from being admitted."""
        self._suspects = [r for r in self._suspects if not r.aborted and not r.is_finished]
        isolated = self._suspects[0] if self._suspects else None
        if isolated is not None and isolated is not self.scheduler.isolated:
            self.scheduler.requeue_running()
        self.scheduler.isolated = isolated

    def _launch_forward(self, batch):
        """Queue the batch's forward pass and count its tokens as computed; None if the device
        ran out of memory (the batch's newest half then waits)."""
        previous = self._in_flight[1] if self._in_flight is not None else None
        chunks = [self._chunk(seq, n) for seq, n in zip(batch.seqs, batch.num_new_tokens)]
        forward = self._within_memory(batch, lambda: self.runner.forward(chunks, previous))
        if forward is None:
            return None
        now = time.monotonic()
        for seq, num_tokens in zip(batch.seqs, batch.num_new_tokens):
            seq.request.first_scheduled_time = seq.request.first_scheduled_time or now
            seq.num_computed_tokens += num_tokens
            self.block_manager.commit(seq)  # readers of these blocks are queued after this step
        return forward

    def _launch_sampling(self, batch, forward):
        """Queue the sampling of the batch's rows, with options (and grammar masks) made from
        every token accepted so far; None if the device ran out of memory."""
        chunks = forward.chunks
        rows = 0
        for seq, chunk in zip(batch.seqs, chunks):
            if chunk.sampling is not None:
                chunk.sampling = self._sampling_options(seq)
                if chunk.draft_sampling:  # each proposed place samples as it would in its own step
                    chunk.draft_sampling, chunk.sampling = self._speculated_options(seq, chunk.sampling,
                                                                                    len(chunk.draft_sampling))
                rows += len(chunk.draft_sampling)
                if not seq.is_finished and seq.status == SequenceStatus.RUNNING:
                    seq.num_pending, seq.pending_row = 1, rows
                    seq.pending_is_last = self._length_ends(seq)
                rows += 1
        allowed = self._allowed_tokens(batch.seqs, chunks)
        launched = self._within_memory(batch, lambda: self.runner.sample(forward, allowed))
        if launched is None:
            for seq, num_tokens in zip(batch.seqs, batch.num_new_tokens):
                seq.num_pending, seq.pending_is_last = 0, False
                if seq.status == SequenceStatus.RUNNING:
                    seq.num_computed_tokens -= num_tokens  # nothing of this step counts
        return launched

    def _proposer(self, args: EngineArgs, started) -> NgramProposer | DraftModelProposer | MedusaProposer:
        if started.medusa:
            logger.info("speculative decoding: up to %d tokens a step proposed by the Medusa heads of %s",
                        self.speculate, args.model)
            return MedusaProposer()
        if started.draft is None:
            return NgramProposer(args.speculate_ngram_max, args.speculate_ngram_min)
        draft = started.draft
        check_same_vocabulary(self.tokenizer, Tokenizer.load(draft.source.path, draft.source.gguf_file),
                              self.config.model.vocab_size, draft.runner.model_config.vocab_size,
                              args.speculative_model)
        cache = self.config.cache
        return DraftModelProposer(draft.runner, cache.num_blocks, cache.block_size, args.max_batch_prefill_tokens,
                                  draft.max_model_len)

    def _speculation_depth(self) -> int:
        """Tokens a sequence may have proposed in the next step, with the batch as it is."""
        return speculation_depth(self.speculate, len(self.scheduler.running), self.speculate_max_batch_size)

    def _propose(self) -> None:
        """Each running sequence's proposals for this step (none where it cannot speculate)."""
        depth = self._speculation_depth()
        seqs, counts = [], []  # those that speculate, and how many tokens each may take
        for seq in self.scheduler.running:
            seq.drafts = []
            params = seq.params
            if not depth or seq.num_pending or seq.num_computed_tokens != len(seq.token_ids) - 1 \
                    or not self._may_speculate(seq):
                continue
            room = self.max_model_len - len(seq.token_ids) - 1
            if params.max_tokens is not None:
                room = min(room, params.max_tokens - seq.num_output_tokens - 1)
            if room > 0:
                seqs.append(seq)
                counts.append(min(depth, room))
        if seqs:
            for seq, drafts in zip(seqs, self.proposer.propose(seqs, counts)):
                seq.drafts = drafts

    @staticmethod
    def _may_speculate(seq: Sequence) -> bool:
        """Whether checking proposals gives the tokens of steps run one at a time: the settings
        of each place must not depend on the tokens before it (penalties, a grammar, the
        watermark and min_tokens do)."""
        params = seq.params
        return (seq.matcher is None and not params.watermark and not params.min_tokens and params.repetition_penalty == 1.0
                and not params.frequency_penalty and not params.presence_penalty)

    def _speculated_options(self, seq: Sequence, options: SamplingOptions, k: int):
        """The settings of a speculating chunk's k + 1 rows: the same but each place's random key."""
        def at(offset: int) -> SamplingOptions:
            key = row_key(seq.seed, seq.num_output_tokens + offset) if options.temperature > 0 else 0
            return dataclasses.replace(options, key=key)

        return [at(j) for j in range(k)], at(k)

    def _length_ends(self, seq: Sequence) -> bool:
        """Whether one more token reaches the sequence's length limit."""
        max_tokens = seq.params.max_tokens
        return (max_tokens is not None and seq.num_output_tokens + 1 >= max_tokens) or \
            len(seq.token_ids) + 1 >= self.max_model_len

    def _complete(self, batch, launched) -> None:
        """Wait for a launched step and accept its tokens."""
        results = self._within_memory(batch, lambda: self.runner.collect(launched))
        if results is not None:
            self.scheduler.step_succeeded()
            self._advance(batch, launched.chunks, results)

    def _allowed_tokens(self, seqs: list[Sequence], chunks: list[SequenceChunk]):
        """For the runner, the grammar masks of the guided sequences that sample this step
        (rows numbered among the sampling chunks); None when there are none."""
        guided, row = [], 0
        for seq, chunk in zip(seqs, chunks):
            if chunk.sampling is None:
                continue
            row += len(chunk.draft_sampling)  # a speculating chunk's rows come before its last
            if seq.matcher is not None and not seq.is_finished:
                guided.append((row, seq.matcher))
            row += 1
        if not guided:
            return None
        rows, matchers = (list(column) for column in zip(*guided))
        return lambda: self.guidance.allowed_tokens(rows, matchers)

    def _within_memory(self, batch, work):
        """`work()`, or None after making room if the device ran out of memory doing it."""
        try:
            return work()
        except torch.cuda.OutOfMemoryError:
            if len(batch.seqs) == 1:
                raise  # nothing left to make room with: this request fails, the server stays
            # The newest half goes back to the queue, to be recomputed later; nothing of this
            # step was committed.
            self.scheduler.preempt_newest(len(batch.seqs) // 2)
            torch.cuda.empty_cache()
            return None

    def _advance(self, batch, chunks: list[SequenceChunk], results) -> None:
        """Accept a step's tokens: what the next schedule needs, and the stops that depend on
        token ids alone."""
        now = time.monotonic()
        for seq, chunk, result in zip(batch.seqs, chunks, results):
            if seq.is_finished:  # ended (stop string, abort, or its last token) after this step was queued
                continue
            request = seq.request
            if result.prompt_logprobs:
                scored = request.prompt_logprobs
                first = len(scored) - 1 - chunk.start_pos  # entries recomputed after preemption are skipped
                scored.extend(result.prompt_logprobs[max(first, 0):])
            if result.sampled is not None:
                if self._suspects and request is self._suspects[0]:
                    self._suspects.pop(0)  # it sampled alone without failing: not the cause
                request.first_token_time = request.first_token_time or now
                seq.num_pending, seq.pending_is_last = 0, False
                accepted = self._accepted(seq, chunk, result)
                # Medusa's proposals for the next step: the heads' picks at the last accepted place
                seq.medusa = result.medusa[len(accepted) - 1] if result.medusa else []
                seq.step_logprobs = []
                for token in accepted:
                    self._append(seq, token)
                    if seq.is_finished:
                        break
                self.block_manager.commit(seq)  # the tokens may complete computed blocks
                self._unfinished_outputs.append(seq)
            elif seq.params.max_tokens == 0 and chunk.start_pos + len(chunk.token_ids) == seq.num_prompt_tokens:
                seq.finish_reason, seq.status = "length", SequenceStatus.FINISHED  # the prompt alone was asked for
                self.scheduler.remove(seq)
                self._unfinished_outputs.append(seq)

    def _accepted(self, seq: Sequence, chunk: SequenceChunk, result) -> list:
        """The tokens a step gives a sequence: its pick; for a speculating chunk, the picks at
        the proposed places up to the first that differs from its proposal, then that pick (or
        the last row's, when all agree). Only their places' K/V stay computed."""
        if not chunk.draft_sampling:
            return [result.sampled]
        drafts = chunk.token_ids[1:]
        accepted = []
        for draft, pick in zip(drafts, result.draft_samples):
            accepted.append(pick)
            if pick.token_id != draft:
                break
        else:
            accepted.append(result.sampled)
        seq.num_computed_tokens = chunk.start_pos + len(accepted)
        self.num_speculated += len(drafts)
        self.num_accepted += len(accepted) - 1
        return accepted

    def _append(self, seq: Sequence, sampled) -> None:
        seq.token_ids.append(sampled.token_id)
        seq.step_logprobs.append(sampled.logprob)
        if seq.matcher is not None:
            seq.matcher.consume_token(sampled.token_id)  # its mask allowed it, so it is accepted
        seq.cumulative_logprob += sampled.logprob
        if seq.params.logprobs is not None:
            seq.output_logprobs.append({sampled.token_id: sampled.logprob, **sampled.top_logprobs})
        check_token_stop(seq, sampled.token_id, self.eos_token_ids, self.max_model_len)
        if seq.finish_reason is not None:
            seq.status = SequenceStatus.FINISHED
            self.scheduler.remove(seq)

    def _finish_outputs(self) -> list[RequestOutput]:
        """The rest of the previous step: text, stop strings, and the outputs. This work is
        each sequence's own, so a failure in it ends that sequence's request alone."""
        seqs, self._unfinished_outputs = self._unfinished_outputs, []
        touched: dict[str, Request] = {}
        failed: dict[str, tuple[Request, Exception]] = {}
        for seq in seqs:
            detokenizer = self.detokenizers.get(seq.seq_id)
            if detokenizer is None or seq.request.request_id in failed:  # aborted meanwhile
                continue
            try:
                self._finish_text(seq, detokenizer)
            except Exception as error:
                failed[seq.request.request_id] = (seq.request, error)
                continue
            touched[seq.request.request_id] = seq.request
        outputs = []
        for request in touched.values():
            if request.request_id in failed:
                continue
            finished = request.is_finished
            if finished or self.stream_outputs:
                outputs.append(self._output(request) if self.delta_encoder is None else self._delta(request))
            if finished:
                self.requests.pop(request.request_id, None)
        for request, error in failed.values():
            logger.warning("request %s failed making its text: %r", request.request_id, error)
            outputs.append(self._failed(request, error))
        return outputs

    def _finish_text(self, seq: Sequence, detokenizer: IncrementalDetokenizer) -> None:
        """The new tokens' texts, whatever a stop string later cuts from `seq.text`. A stop
        string found in a token ends the sequence there: tokens a speculating step accepted
        after it are dropped."""
        while len(seq.token_texts) < seq.num_output_tokens:
            delta = detokenizer.add(seq.token_ids[seq.num_prompt_tokens + len(seq.token_texts)])
            seq.token_texts.append(delta)
            seq.text += delta
            if seq.finish_reason != "stop" and check_text_stop(seq, len(delta)):
                self._drop_after_stop(seq)
                if not seq.is_finished:
                    seq.status = SequenceStatus.FINISHED
                    self.scheduler.remove(seq)
                break
        if seq.finish_reason is not None:
            if seq.num_output_tokens and not isinstance(seq.stop_reason, str):
                rest = detokenizer.flush()  # the bytes of a character the output ended inside
                seq.text += rest
                seq.token_texts[-1] += rest
            del self.detokenizers[seq.seq_id]

    def _drop_after_stop(self, seq: Sequence) -> None:
        """Forget the tokens after the one whose text matched a stop string (all from the last
        step: texts are made the step after their tokens are accepted)."""
        extra = seq.num_output_tokens - len(seq.token_texts)
        if extra <= 0:
            return
        del seq.token_ids[-extra:]
        if seq.params.logprobs is not None:
            del seq.output_logprobs[-extra:]
        seq.cumulative_logprob -= sum(seq.step_logprobs[-extra:])

    def _sampling_options(self, seq: Sequence) -> SamplingOptions:
        """The sequence's sampling settings for its next token (made once, updated per step)."""
        params = seq.params
        options = seq.sampling_options
        if options is None:
            options = seq.sampling_options = SamplingOptions(
                # a top_k past the vocabulary keeps every token (and fits the kernels' int32)
                temperature=params.temperature, top_k=min(params.top_k, self.config.model.vocab_size),
                top_p=params.top_p,
                typical_p=params.typical_p, min_p=params.min_p,
                repetition_penalty=params.repetition_penalty,
                frequency_penalty=params.frequency_penalty,
                presence_penalty=params.presence_penalty,
                num_logprobs=params.logprobs or 0, logit_bias=params.logit_bias,
                watermark=(params.watermark_gamma, params.watermark_delta) if params.watermark else None)
        options.key = row_key(seq.seed, seq.num_output_tokens) if params.temperature > 0 else 0
        options.previous_token = seq.token_ids[-1]
        if params.repetition_penalty != 1.0:
            options.all_token_ids = seq.token_ids
        if params.frequency_penalty or params.presence_penalty:
            options.output_token_ids = seq.output_token_ids
        if params.min_tokens:
            options.banned_token_ids = sorted(self.eos_token_ids | set(params.stop_token_ids)) \
                if seq.num_output_tokens < params.min_tokens else []
        return options

    def _chunk(self, seq: Sequence, num_tokens: int) -> SequenceChunk:
        start = seq.num_computed_tokens
        if seq.drafts and num_tokens == 1 + len(seq.drafts):  # its last token, then its proposals
            chunk = SequenceChunk([seq.token_ids[start], *seq.drafts], start, seq.block_table,
                                  lora_slot=seq.request.lora_slot)
            chunk.sampling, chunk.draft_sampling = TO_BE_SET, [TO_BE_SET] * len(seq.drafts)
            return chunk
        end = start + num_tokens
        chunk = SequenceChunk(seq.token_ids[start:end], start, seq.block_table, lora_slot=seq.request.lora_slot)
        params = seq.params
        if params.prompt_logprobs is not None and seq.index == 0 and start < seq.num_prompt_tokens - 1:
            chunk.prompt_targets = seq.token_ids[start + 1:min(end + 1, seq.num_prompt_tokens)]
            chunk.prompt_top_n = params.prompt_logprobs
        if end > len(seq.token_ids):  # the last token is pending: sampled by the step before
            chunk.token_ids.append(0)
            chunk.pending_row = seq.pending_row
        if end == len(seq) and params.max_tokens != 0:
            chunk.sampling = TO_BE_SET  # made when the step's sampling is queued
        return chunk

    def _delta(self, request: Request) -> OutputDelta:
        """What `delta_encoder.encode(self._output(request))` gives, without the output: each
        list's new tail read from the sequence, and the text's new part (the text before it
        never changes: `stable_text_len` holds back what a stop string could cut)."""
        params = request.params
        if params.best_of > params.n:  # completions ranked at the end: rare, the long way
            return self.delta_encoder.encode(self._output(request))
        sent, first = self.delta_encoder.sent(request.request_id)
        finished = request.is_finished
        completions = []
        for seq in request.sequences:
            state = sent.completions.get(seq.index)
            if state is None:
                state = sent.completions[seq.index] = SentCompletion()
            start, end = seq.emitted_text_len, stable_text_len(seq)
            delta = seq.text[start:end]
            seq.emitted_text_len = end
            num_output = seq.num_output_tokens
            num_texts = min(num_output, len(seq.token_texts))  # texts are made the step after their tokens
            token_ids, token_texts, logprobs = state.tails(
                seq.token_ids, num_output, seq.token_texts, num_texts,
                seq.output_logprobs if params.logprobs is not None else None, offset=seq.num_prompt_tokens)
            completions.append((seq.index, (start, delta), token_ids, token_texts, logprobs, seq.cumulative_logprob,
                                seq.finish_reason, seq.stop_reason, delta, seq.seed))
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = tail(sent.prompt_logprobs, request.prompt_logprobs, len(request.prompt_logprobs))
            sent.prompt_logprobs = len(request.prompt_logprobs)
        if finished:
            self.delta_encoder.forget(request.request_id)
        seqs = request.sequences
        return (request.request_id, (request.prompt, request.prompt_token_ids) if first else None, prompt_logprobs,
                completions, finished, request.seed, seqs[0].num_cached_tokens if seqs else 0,
                (request.arrival_time, request.first_scheduled_time, request.first_token_time,
                 time.monotonic() if finished else None), None)

    def _output(self, request: Request) -> RequestOutput:
        params = request.params
        seqs = request.sequences
        finished = request.is_finished
        if params.best_of > params.n:
            if not finished:
                seqs = []
            else:
                seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:params.n]
        completions = []
        for rank, seq in enumerate(seqs):
            end = stable_text_len(seq)
            delta = seq.text[seq.emitted_text_len:end]
            seq.emitted_text_len = end
            completions.append(CompletionOutput(
                index=rank if params.best_of > params.n else seq.index,
                text=seq.text[:end], token_ids=seq.output_token_ids,  # a fresh slice
                token_texts=seq.token_texts[:len(seq.token_ids) - seq.num_prompt_tokens],
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.output_logprobs) if params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, delta=delta,
                seed=seq.seed))
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=list(request.prompt_logprobs) if params.prompt_logprobs is not None else None,
            outputs=completions, finished=finished, seed=request.seed,
            num_cached_tokens=seqs[0].num_cached_tokens if seqs else 0,
            metrics=RequestMetrics(request.arrival_time, request.first_scheduled_time,
                                   request.first_token_time, time.monotonic() if finished else None))
