"""Lossless self-speculative decoding: greedy output equal to dense, sampled output that follows
dense's distribution, batching with non-speculating requests, stops and max_tokens inside an
accepted run, and KV blocks that all come back after rejections, preemption and abort."""
import json

import pytest
import torch

from trident.bench.datasets import default_data_dir, load_alpaca
from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from trident.engine.llm import LLM
from trident.engine.pruning.length import RequestPruning
from trident.engine.pruning.plan import PruningPlan
from trident.engine.sampling_params import SamplingParams
from trident.engine.speculative import Draft, accept_greedy, accept_sampled, draft_skip_layers

# Instructions cut to 120 characters: the tiny model's byte-level tokenizer spends a token on few of them.
INSTRUCTIONS = [task.instruction[:120] for task in load_alpaca(default_data_dir() / "alpaca-seed-tasks.jsonl")[:20]]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)


def make_llm(model, speculative=None, num_blocks=64, **scheduler):
    return LLM(EngineConfig(model=str(model), dtype="float32", cache=CacheConfig(num_blocks=num_blocks),
                            scheduler=SchedulerConfig(max_model_len=256, **scheduler), speculative=speculative))


@pytest.fixture(scope="module")
def dense(tiny_model_dir):
    return make_llm(tiny_model_dir)


@pytest.fixture(scope="module")
def speculative(tiny_model_dir):
    return make_llm(tiny_model_dir, SpeculativeConfig("1,2", num_draft_tokens=3))


def tokens(outputs):
    return [out.outputs[0].token_ids for out in outputs]


def spec_totals(outputs):
    drafted = sum(o.pruning["speculative"]["draft_tokens"] for o in outputs)
    return drafted, sum(o.pruning["speculative"]["accepted_tokens"] for o in outputs)


def chi_square_p(counts_a: dict, counts_b: dict) -> float:
    """p-value of a two-sample chi-square test that two count tables share one distribution."""
    keys = sorted(set(counts_a) | set(counts_b))
    a = torch.tensor([counts_a.get(k, 0) for k in keys], dtype=torch.float64)
    b = torch.tensor([counts_b.get(k, 0) for k in keys], dtype=torch.float64)
    ka, kb = (b.sum() / a.sum()).sqrt(), (a.sum() / b.sum()).sqrt()
    stat = ((ka * a - kb * b) ** 2 / (a + b)).sum()
    return float(torch.special.gammaincc(torch.tensor((len(keys) - 1) / 2, dtype=torch.float64), stat / 2))


def test_greedy_equals_dense_on_20_instructions(dense, speculative):
    want = dense.generate(INSTRUCTIONS, GREEDY)
    got = speculative.generate(INSTRUCTIONS, GREEDY)
    assert tokens(got) == tokens(want)
    for g, w in zip(got, want):      # logprobs come from the verify pass: the same values as dense's
        assert [lp[t] for lp, t in zip(g.outputs[0].logprobs, g.outputs[0].token_ids)] == pytest.approx(
            [lp[t] for lp, t in zip(w.outputs[0].logprobs, w.outputs[0].token_ids)], abs=1e-4)
    drafted, accepted = spec_totals(got)
    assert drafted > 0 and 0 < accepted < drafted        # the draft skips two of four layers: a partial match


def test_a_draft_that_always_matches_emits_several_tokens_per_step(dense, speculative):
    """With every layer in the draft, each draft is the model's own token: all are accepted, and
    each step emits num_draft_tokens + 1 tokens, bounded by max_tokens."""
    runner = speculative.engine.runner
    partial, runner.draft_layers = runner.draft_layers, list(range(len(runner.model.layers)))
    try:
        for max_tokens in (1, 2, 5, 24):
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            got = speculative.generate(INSTRUCTIONS[:4], params)
            assert tokens(got) == tokens(dense.generate(INSTRUCTIONS[:4], params))
            assert all(len(t) == max_tokens for t in tokens(got))
            drafted, accepted = spec_totals(got)
            rest = max_tokens - 1                            # tokens after the prefill's, at most 4 per step
            assert accepted == drafted == 4 * (rest - -(-rest // 4))
    finally:
        runner.draft_layers = partial


def test_stop_strings_inside_an_accepted_run_never_leak(dense, speculative):
    runner = speculative.engine.runner
    partial, runner.draft_layers = runner.draft_layers, list(range(len(runner.model.layers)))
    try:
        free = dense.generate(INSTRUCTIONS[:1], GREEDY)[0].outputs[0].text
        stop = free[len(free) // 2:len(free) // 2 + 3]
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
        want, got = dense.generate(INSTRUCTIONS[:1], params)[0], speculative.generate(INSTRUCTIONS[:1], params)[0]
        assert got.outputs[0].text == want.outputs[0].text and stop not in got.outputs[0].text
        assert got.outputs[0].finish_reason == "stop" and got.outputs[0].stop_reason == stop
    finally:
        runner.draft_layers = partial


def test_a_batch_mixes_draft_lengths_and_plain_decodes(dense, speculative):
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, pruning=pruning) for pruning in
              (RequestPruning(num_draft_tokens=1), RequestPruning(num_draft_tokens=5), RequestPruning(speculative=False),
               None, RequestPruning(profile="dense"))]
    got = speculative.generate(INSTRUCTIONS[:5], params)
    assert tokens(got) == tokens(dense.generate(INSTRUCTIONS[:5], params[3]))
    drafted = [o.pruning.get("speculative", {}).get("draft_tokens", 0) for o in got]
    assert drafted[0] > 0 and drafted[1] > drafted[0] and drafted[2] == 0 and drafted[4] == 0


def test_blocks_come_back_after_rejections_preemption_and_abort(tiny_model_dir, dense):
    llm = make_llm(tiny_model_dir, SpeculativeConfig("1,2", num_draft_tokens=4), num_blocks=16)
    engine = llm.engine
    start = engine.block_manager.num_free_blocks
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    got = llm.generate(INSTRUCTIONS[:8], params)
    assert engine.scheduler.num_preemptions > 0, "16 blocks of 16 tokens should not hold 8 sequences of ~80 tokens"
    assert tokens(got) == tokens(dense.generate(INSTRUCTIONS[:8], params))
    assert engine.block_manager.num_free_blocks == start
    engine.add_request("gone", llm.tokenizer.encode(INSTRUCTIONS[0]), params)
    for _ in range(4):
        engine.step()
    assert engine.block_manager.num_free_blocks < start
    engine.abort_request("gone")
    assert engine.block_manager.num_free_blocks == start


def test_speculative_sampling_follows_the_target_distribution():
    """The emitted first token is distributed as p whatever the draft distribution q."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.2, 0.1])
    counts: dict[int, int] = {}
    trials = 20000
    for _ in range(trials):
        x = int(torch.multinomial(q, 1, generator=g))
        first = accept_sampled(Draft([x], [q]), torch.stack([p, p]), g)[0]
        counts[first] = counts.get(first, 0) + 1
    assert counts.get(5, 0) == 0                              # p(5) = 0: never emitted, though q drafts it
    expected = {i: float(p[i]) * trials for i in range(5)}
    stat = sum((counts.get(i, 0) - e) ** 2 / e for i, e in expected.items())
    assert float(torch.special.gammaincc(torch.tensor(2.0, dtype=torch.float64), torch.tensor(stat / 2))) > 1e-3
    assert accept_greedy([3, 4], torch.eye(6)[[3, 1, 2]]) == [3, 1]
    assert accept_greedy([3, 1], torch.eye(6)[[3, 1, 2]]) == [3, 1, 2]


def test_sampled_tokens_follow_dense_in_a_chi_square_test(dense, speculative):
    """Third generated token of 600 seeded samples, with and without speculation (temperature 1,
    top-k 4 keeps the table small): one distribution by a two-sample chi-square test."""
    prompt = INSTRUCTIONS[:1] * 600
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=4, ignore_eos=True, seed=i) for i in range(600)]
    counts = []
    for llm in (dense, speculative):
        outs = llm.generate(prompt, params)
        table: dict[int, int] = {}
        for out in outs:
            table[out.outputs[0].token_ids[2]] = table.get(out.outputs[0].token_ids[2], 0) + 1
        counts.append(table)
    drafted, accepted = spec_totals(outs)
    assert 0 < accepted < drafted
    assert chi_square_p(*counts) > 1e-3, counts


def test_the_lossless_profile_speculates_and_refuses_lossy_pruning(dense, speculative):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, pruning=RequestPruning(profile="lossless"))
    got = speculative.generate(INSTRUCTIONS[:2], params)
    assert tokens(got) == [t[:12] for t in tokens(dense.generate(INSTRUCTIONS[:2], GREEDY))]
    for out, instruction in zip(got, INSTRUCTIONS[:2]):
        # Layers per token: the prompt through 4 layers; each verify pass 4 layers per row, each draft
        # pass the 2 draft layers; a decode without drafts (the last token) 4.
        # Prompt tokens the prefix cache already held were not fed again.
        spec, fed = out.pruning["speculative"], out.pruning["tokens"] - 11
        assert spec["draft_tokens"] > 0 and 1 <= fed <= len(speculative.tokenizer.encode(instruction))
        plain = 11 - spec["accepted_tokens"] - spec["verify_steps"]
        assert out.pruning["layer_tokens"] == 4 * fed + 4 * plain + 4 * (spec["verify_steps"] + spec["draft_tokens"]) \
            + 2 * spec["draft_tokens"]
    for pruning, message in ((RequestPruning(profile="lossless", kv_budget=64), "no lossy pruning"),
                             (RequestPruning(profile="lossless", speculative=False), "cannot turn speculative off")):
        with pytest.raises(ValueError, match=message):
            speculative.generate(["hi"], SamplingParams(max_tokens=2, pruning=pruning))
    with pytest.raises(ValueError, match="not served here"):
        dense.generate(["hi"], SamplingParams(max_tokens=2, pruning=RequestPruning(profile="lossless")))


@pytest.mark.parametrize("pruning, sampling, message", [
    (RequestPruning(speculative=False, num_draft_tokens=2), {}, "turns off"),
    (RequestPruning(num_draft_tokens=0), {}, r"num_draft_tokens must be in \[1, 16\]"),
    (RequestPruning(num_draft_tokens=17), {}, r"num_draft_tokens must be in \[1, 16\]"),
    (RequestPruning(speculative=True), {"presence_penalty": 0.5}, "penalties"),
    (RequestPruning(speculative=True), {"min_tokens": 2}, "min_tokens"),
    (RequestPruning(num_draft_tokens=2, kv_budget=64), {}, "length pruning"),
])
def test_speculation_that_cannot_run_is_refused(speculative, pruning, sampling, message):
    with pytest.raises(ValueError, match=message):
        speculative.generate(["hi"], SamplingParams(max_tokens=4, pruning=pruning, **sampling))


def test_the_server_default_steps_aside_and_an_unserved_draft_is_refused(dense, speculative):
    # Penalties are honoured; the served default speculation does not run for that request.
    out = speculative.generate(["hi"], SamplingParams(max_tokens=6, presence_penalty=0.5, ignore_eos=True))[0]
    assert out.pruning == {} and len(out.outputs[0].token_ids) == 6
    with pytest.raises(ValueError, match="not served here"):
        dense.generate(["hi"], SamplingParams(max_tokens=4, pruning=RequestPruning(speculative=True)))


def test_draft_layers_from_a_list_or_a_depth_plan(tiny_model_dir, tmp_path, dense):
    config = dense.engine.model_config
    assert draft_skip_layers("2, 1", config, "tiny") == [1, 2]
    plan = PruningPlan.dense(config)
    plan.layers[3].keep = False
    path = tmp_path / "depth-1.json"
    path.write_text(plan.to_json())
    assert draft_skip_layers(str(path), config, "tiny") == [3]
    for draft, message in (("9", r"must be in \[0, 4\)"), ("0,1,2,3", "skips every layer"),
                           ("depth-7", "neither comma-separated layer indices nor a depth plan")):
        with pytest.raises(ValueError, match=message):
            draft_skip_layers(draft, config, "tiny")
    path.write_text(json.dumps({**json.loads(plan.to_json()), "layers": json.loads(plan.to_json())["layers"][:2]}))
    with pytest.raises(ValueError):
        draft_skip_layers(str(path), config, "tiny")


def test_drafts_never_cost_another_sequence_its_decode(tiny_model_dir):
    """Drafts come from what the running sequences' own steps leave: with a 40-token budget and
    16 drafts each, every one of 8 decoding sequences is still scheduled every step."""
    llm = make_llm(tiny_model_dir, SpeculativeConfig("1,2", num_draft_tokens=16), max_num_batched_tokens=40)
    engine, runner = llm.engine, llm.engine.runner
    execute, steps = runner.execute, []

    def observed(sched):
        steps.append((len(engine.scheduler.running), [s for s in sched.scheduled if s.num_new_tokens == 1]))
        return execute(sched)
    runner.execute = observed
    try:
        llm.generate([p[:20] for p in INSTRUCTIONS[:8]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    finally:
        runner.execute = execute
    decode_steps = [(running, decodes) for running, decodes in steps if len(decodes) == running == 8]
    assert decode_steps, "no step decoded all 8 sequences"
    assert any(s.draft_slots for _, decodes in decode_steps for s in decodes)
    assert all(sum(1 + len(s.draft_slots) for s in decodes) <= 40 for _, decodes in decode_steps)
