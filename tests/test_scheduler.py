"""Block manager and scheduler on CPU without a model: fake runner steps append tokens."""
from trident.engine.block_manager import BlockManager
from trident.engine.config import SchedulerConfig
from trident.engine.model_runner import RunnerOutput
from trident.engine.sampling_params import SamplingParams
from trident.engine.scheduler import Scheduler
from trident.engine.sequence import Sequence, SequenceStatus

_ids = iter(range(10**6))


def make_seq(prompt_len: int, max_tokens: int = 100, first_token: int = 0, **params) -> Sequence:
    prompt = list(range(first_token, first_token + prompt_len))
    return Sequence(next(_ids), f"r{prompt_len}", 0, prompt, SamplingParams(**params), max_tokens)


def fake_step(sched: Scheduler) -> list:
    """One engine step with a model that always emits token 7."""
    out = sched.schedule()
    sched.update_after_step(out, RunnerOutput())
    for s in out.scheduled:
        if s.sample:
            s.seq.token_ids.append(7)
    return out


def test_block_manager_allocate_free_and_refcounts():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a, b = make_seq(5), make_seq(3)
    assert bm.allocate(a, 5) and a.block_table == [0, 1]
    assert bm.allocate(b, 8) and len(b.block_table) == 2 and bm.num_free_blocks == 0
    assert not bm.allocate(a, 9) and a.block_table == [0, 1]      # no partial allocation
    bm.free_sequence(a)
    assert bm.num_free_blocks == 2 and a.block_table == []


def test_prefix_cache_shares_full_blocks_and_keeps_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(10)
    assert bm.match_prefix(a) == 0
    bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.register_full_blocks(a)
    b = make_seq(10)                      # same 10 tokens: two full blocks shared
    assert bm.match_prefix(b) == 8 and b.block_table == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2
    c = make_seq(8)                       # exactly two blocks: the last one must be recomputed
    assert bm.match_prefix(c) == 4
    bm.free_sequence(a)
    bm.free_sequence(b)
    bm.free_sequence(c)
    assert bm.num_free_blocks == 8
    d = make_seq(10)                      # freed blocks keep their contents until reused
    assert bm.match_prefix(d) == 8
    e = make_seq(10, prompt_logprobs=0)   # prompt logprobs need every position computed
    assert bm.match_prefix(e) == 0


def test_chunked_prefill_respects_token_budget_and_mixes_decodes():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8), BlockManager(64, 4))
    short, long = make_seq(3), make_seq(20, first_token=100)
    sched.add(short)
    sched.add(long)
    out = fake_step(sched)
    assert [(s.seq, s.num_new_tokens, s.sample) for s in out.scheduled] == [(short, 3, True), (long, 5, False)]
    out = fake_step(sched)                # short decodes one token; long gets the remaining budget
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(short, 1), (long, 7)]
    out = fake_step(sched)
    assert [(s.seq, s.num_new_tokens, s.sample) for s in out.scheduled] == [(short, 1, True), (long, 7, False)]
    out = fake_step(sched)
    assert [(s.seq, s.num_new_tokens, s.sample) for s in out.scheduled] == [(short, 1, True), (long, 1, True)]
    assert long.num_computed_tokens == 20 and long.num_output_tokens == 1


def test_max_num_seqs_caps_running():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), BlockManager(64, 4))
    seqs = [make_seq(2, first_token=10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = fake_step(sched)
    assert [s.seq for s in out.scheduled] == seqs[:2] and list(sched.waiting) == [seqs[2]]


def test_preemption_frees_blocks_and_requeues_newest_first():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64),
                      BlockManager(3, 4, enable_prefix_caching=False))
    a, b = make_seq(4), make_seq(4, first_token=50)
    sched.add(a)
    sched.add(b)
    fake_step(sched)                      # prefills: 2 blocks used, each sequence now has 5 tokens
    out = fake_step(sched)                # a needs a 2nd block (ok), b then needs one: none left
    assert out.preempted == [b] and b.status is SequenceStatus.WAITING and b.block_table == []
    assert b.num_computed_tokens == 0 and sched.waiting[0] is b
    assert [s.seq for s in out.scheduled] == [a]
    sched.finish(a, "length")
    out = fake_step(sched)                # b is recomputed: prompt and its generated token together
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(b, 5)]


def test_finish_releases_everything():
    bm = BlockManager(8, 4)
    sched = Scheduler(SchedulerConfig(), bm)
    a = make_seq(9)
    sched.add(a)
    fake_step(sched)
    sched.finish(a, "abort")
    assert a.is_finished and a.finish_reason == "abort" and bm.num_free_blocks == 8
    assert not sched.has_unfinished()


def test_waiting_sequence_that_cannot_start_pins_no_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), bm)
    a = make_seq(9)
    sched.add(a)
    fake_step(sched)                      # a: 3 blocks; its first two full blocks are now cached
    b = make_seq(16)                      # same first 8 tokens as a: matches 2 cached blocks
    sched.add(b)
    out = fake_step(sched)                # b needs 2 more blocks, 1 is free: it waits holding nothing
    assert [s.seq for s in out.scheduled] == [a]
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert [bm.ref_counts[i] for i in a.block_table] == [1, 1, 1]
