"""The KV block manager and the scheduler, without a model."""
from __future__ import annotations

from server.config import SchedulerConfig
from server.engine.block_manager import BlockManager
from server.engine.scheduler import Scheduler
from server.engine.sequence import Request, Sequence
from server.sampling_params import SamplingParams


def make_seq(tokens, seq_id=0):
    request = Request(str(seq_id), None, list(tokens), SamplingParams())
    request.sequences.append(Sequence(seq_id, request, 0, seed=0))
    return request.sequences[0]


def admit(manager, seq):
    hits = manager.lookup_prefix(seq)
    assert manager.can_admit(hits, len(seq))
    manager.admit(seq, hits, len(seq))
    seq.num_computed_tokens = len(seq)
    manager.commit(seq)


def test_blocks_are_reference_counted_and_returned():
    manager = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(range(10), 0), make_seq(range(10), 1)
    admit(manager, a)
    admit(manager, b)
    assert b.block_table[:2] == a.block_table[:2]  # two full blocks shared
    assert b.num_cached_tokens == 8
    assert manager.num_free_blocks == 8 - 4
    manager.release(a)
    assert manager.num_free_blocks == 8 - 3  # a's tail block only; shared ones still held by b
    manager.release(b)
    assert manager.num_free_blocks == 8


def test_a_fully_cached_prompt_still_computes_its_last_token():
    manager = BlockManager(num_blocks=8, block_size=4)
    first = make_seq(range(8), 0)
    admit(manager, first)
    manager.release(first)
    again = make_seq(range(8), 1)
    assert len(manager.lookup_prefix(again)) == 1


def test_cached_blocks_are_evicted_least_recently_used_first():
    manager = BlockManager(num_blocks=4, block_size=2)
    old, new = make_seq([1, 2, 3, 4], 0), make_seq([5, 6, 7, 8], 1)
    admit(manager, old)
    manager.release(old)
    admit(manager, new)
    manager.release(new)
    filler = make_seq([9, 9], 2)  # takes one block: the least recently freed
    admit(manager, filler)
    assert manager.lookup_prefix(make_seq([5, 6, 7, 8, 0], 3)) != []
    assert len(manager.lookup_prefix(make_seq([1, 2, 3, 4, 0], 4))) == 1  # lost its tail block


def test_scheduler_admits_first_come_first_served_within_the_prefill_budget():
    manager = BlockManager(num_blocks=100, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=10, max_num_seqs=8), manager)
    seqs = [make_seq(range(100 * i, 100 * i + 6), i) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert [s.seq_id for s in batch.seqs] == [0, 1]
    assert batch.num_new_tokens == [6, 4]  # the second prompt is chunked to the budget


def test_scheduler_preempts_the_newest_sequence_when_blocks_run_out():
    manager = BlockManager(num_blocks=4, block_size=2)
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=100), manager)
    old, new = make_seq([1, 2, 3, 4], 0), make_seq([5, 6, 7, 8], 1)
    scheduler.add(old)
    scheduler.add(new)
    batch = scheduler.schedule()
    assert batch.seqs == [old, new]
    for seq in (old, new):
        seq.num_computed_tokens = len(seq)
        seq.token_ids.append(0)  # each needs a third block to decode
    batch = scheduler.schedule()
    assert batch.seqs == [old] and batch.preempted == [new]
    assert len(new.block_table) == 0 and new.num_computed_tokens == 0
    assert scheduler.waiting[0] is new


def decode_step(scheduler):
    """One step: every scheduled sequence computes its tokens and gets one more to decode."""
    batch = scheduler.schedule()
    for seq, count in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += count
        seq.token_ids.append(0)
    return batch


def test_with_a_waiting_served_ratio_prompts_join_a_decoding_batch_in_groups():
    """TGI's rule: four sequences decoding and a ratio of 0.5 take waiting prompts once two
    could join, or when three steps have gone by without one joining; 0 takes each at once."""
    def scheduler_with(ratio):
        scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=100, max_num_seqs=8,
                                              waiting_served_ratio=ratio, max_waiting_tokens=3),
                              BlockManager(num_blocks=200, block_size=4))
        for i in range(4):
            scheduler.add(make_seq([1000 + 10 * i + j for j in range(5)], i))
        assert len(decode_step(scheduler).seqs) == 4  # an idle batch takes them all
        return scheduler

    scheduler = scheduler_with(0.5)
    scheduler.add(make_seq([1, 2, 3], 10))
    steps = [[s.seq_id for s in decode_step(scheduler).seqs] for _ in range(4)]
    assert steps[:3] == [[0, 1, 2, 3]] * 3  # one waiting: fewer than 4 x 0.5
    assert steps[3] == [0, 1, 2, 3, 10]  # after three steps without one joining
    scheduler.add(make_seq([4, 5, 6], 11))
    assert [s.seq_id for s in decode_step(scheduler).seqs] == [0, 1, 2, 3, 10]
    scheduler.add(make_seq([7, 8, 9], 12))  # two waiting, 5 x 0.5 -> 2: both join
    assert [s.seq_id for s in decode_step(scheduler).seqs] == [0, 1, 2, 3, 10, 11, 12]

    eager = scheduler_with(0.0)
    eager.add(make_seq([1, 2, 3], 10))
    assert [s.seq_id for s in decode_step(eager).seqs] == [0, 1, 2, 3, 10]
