"""The length axis in the engine: prefill token dropping and KV-budget eviction, checked against a
dense reference that masks exactly the keys the engine kept, bit for bit where nothing is pruned,
per sequence in mixed batches, and for every block the cache hands out."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import trident.engine.model as model_module
from trident.bench.length_sweep import length_plan
from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from trident.engine.llm import LLM
from trident.engine.pruning.length import RequestPruning
from trident.engine.sampling_params import SamplingParams
from trident.kernels.rope import rope_write_kv_ref

PROMPT = ("Once upon a time there was a dragon who liked to read books in the library. The quick brown "
          "fox jumps over the lazy dog. Write a short poem about the sea.")


def make_llm(model, num_blocks=64, max_batched=512, block_size=4, prefix_caching=True, plan=None):
    return LLM(EngineConfig(model=str(model), dtype="float32", plan=plan,
                            cache=CacheConfig(num_blocks=num_blocks, block_size=block_size,
                                              enable_prefix_caching=prefix_caching),
                            scheduler=SchedulerConfig(max_model_len=256, max_num_batched_tokens=max_batched)))


def greedy(max_tokens=10, **pruning) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0,
                          pruning=RequestPruning(**pruning) if pruning else None)


def chosen_logprobs(out) -> list[float]:
    c = out.outputs[0]
    return [lp[t] for lp, t in zip(c.logprobs, c.token_ids)]


class VisibleKeys:
    """Records, per layer and query position, the key positions attention let it see (one sequence)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers, self.calls, self.seen = num_layers, 0, {}

    def wrap(self, attention):
        def recording(q, k_cache, v_cache, meta, scale, **kwargs):
            layer = self.calls % self.num_layers
            self.calls += 1
            keys = meta.key_positions[0]
            for pos in meta.query_positions.tolist():
                self.seen[layer, pos] = set(keys[(keys >= 0) & (keys <= pos)].tolist())
            return attention(q, k_cache, v_cache, meta, scale, **kwargs)
        return recording


def masked_reference(model, token_ids: list[int], visible: VisibleKeys) -> torch.Tensor:
    """log-softmax [T, vocab] of a plain full-sequence forward with contiguous K/V and, per layer,
    the recorded mask (a row the engine dropped at that layer attends causally; nothing reads it)."""
    num_tokens = len(token_ids)
    x = model.embed_tokens(torch.tensor(token_ids))
    angles = model.rotary.angles(torch.arange(num_tokens))
    for i, layer in enumerate(model.layers):
        mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
        for pos in range(num_tokens):
            if (i, pos) in visible.seen:
                mask[pos] = False
                mask[pos, sorted(visible.seen[i, pos])] = True
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q_size = attn.num_heads * attn.head_dim
        qkv = attn.qkv_proj(h).view(num_tokens, attn.num_heads + 2 * attn.num_kv_heads, attn.head_dim)
        k, v = (torch.empty(num_tokens, attn.num_kv_heads, attn.head_dim) for _ in range(2))  # contiguous K/V
        q = rope_write_kv_ref(qkv, attn.num_heads, *angles, k, v, torch.arange(num_tokens))
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                             scale=attn.scale, enable_gqa=True)
        x = x + attn.o_proj(out.transpose(0, 1).reshape(num_tokens, q_size))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.compute_logits(model.norm(x)).log_softmax(-1)


def run_recorded(llm, monkeypatch, params):
    visible = VisibleKeys(len(llm.engine.model.layers))
    monkeypatch.setattr(model_module, "paged_attention", visible.wrap(model_module.paged_attention))
    out = llm.generate([PROMPT], params)[0]
    monkeypatch.undo()
    return out, visible


@pytest.mark.parametrize("pruning, max_batched", [
    ({"prefill_keep": [[1, 0.5]]}, 512),
    ({"prefill_keep": [[0, 0.6], [2, 0.3]]}, 512),
    ({"kv_budget": 12}, 512),
    ({"kv_budget": 10, "prefill_keep": [[1, 0.5]]}, 16),      # chunked prefill: each chunk decides
])
def test_pruned_outputs_equal_a_dense_reference_masking_the_same_keys(tiny_model_dir, monkeypatch, pruning,
                                                                      max_batched):
    llm = make_llm(tiny_model_dir, max_batched=max_batched)
    out, visible = run_recorded(llm, monkeypatch, greedy(12, **pruning))
    prompt_len = len(out.prompt_token_ids)
    tokens = out.outputs[0].token_ids
    # The policy really pruned: some query saw fewer keys than its causal prefix.
    assert any(len(keys) < pos + 1 for (_, pos), keys in visible.seen.items())
    with torch.inference_mode():
        ref = masked_reference(llm.engine.model, out.prompt_token_ids + tokens[:-1], visible)
    rows = ref[prompt_len - 1:]
    assert rows.argmax(-1).tolist() == tokens
    torch.testing.assert_close(rows.gather(1, torch.tensor(tokens)[:, None]).squeeze(1),
                               torch.tensor(chosen_logprobs(out)), atol=2e-5, rtol=1e-5)
    summary = out.pruning["length"]
    if "prefill_keep" in pruning:
        assert summary["prompt_tokens_dropped"] > 0
    if "kv_budget" in pruning:
        assert summary["kv_slots_evicted"] > 0
    assert summary["kv_bytes_saved"] > 0


def test_a_budget_compresses_the_prompt_once_at_its_end_unless_the_plan_streams(tiny_model_dir, monkeypatch,
                                                                                 tmp_path):
    llm = make_llm(tiny_model_dir, max_batched=16)
    out, visible = run_recorded(llm, monkeypatch, greedy(6, kv_budget=10))
    prompt_len = len(out.prompt_token_ids)
    assert prompt_len > 32                               # three chunks or more
    # Every prompt query saw its whole causal prefix; decode queries at most the budget and themselves.
    assert all(keys == set(range(pos + 1)) for (_, pos), keys in visible.seen.items() if pos < prompt_len)
    assert all(len(keys) <= 11 for (_, pos), keys in visible.seen.items() if pos >= prompt_len)
    assert out.pruning["length"]["kv_slots_evicted"] > 0
    # A plan that evicts between chunks: later chunks see only the budget kept from earlier ones.
    streaming = make_llm(tiny_model_dir, max_batched=16, plan=length_plan(llm, tmp_path, evict_during_prefill=True))
    _, visible = run_recorded(streaming, monkeypatch, greedy(6, kv_budget=10))
    assert any(len(keys) < pos + 1 for (_, pos), keys in visible.seen.items() if 16 <= pos < prompt_len)


@pytest.mark.parametrize("pruning, last_chunk", [({}, 2), ({"kv_budget": 10}, 16)])
def test_a_budgets_last_prompt_chunk_holds_a_scoring_window(tiny_model_dir, monkeypatch, pruning, last_chunk):
    # The prompt compresses once, scored by its last step's last `window` (32) queries: with
    # 16-token steps, a prompt 2 tokens past a step boundary ends in a full step, not 2 tokens.
    llm = make_llm(tiny_model_dir, max_batched=16)
    engine = llm.engine
    prompt = engine.tokenizer.encode(PROMPT)
    prompt = prompt[:16 * (len(prompt) // 16 - 1) + 2]
    chunks, execute = [], engine.runner.execute

    def recording(sched):
        chunks.extend(s.num_new_tokens for s in sched.scheduled)
        return execute(sched)

    monkeypatch.setattr(engine.runner, "execute", recording)
    out = llm.generate([prompt], greedy(3, **pruning))[0]
    prefill = chunks[:-2]                                   # two decode steps follow the prompt
    assert sum(prefill) == len(prompt) and prefill[-1] == last_chunk and chunks[-2:] == [1, 1]
    assert len(out.outputs[0].token_ids) == 3


def test_prefill_dropping_keeps_the_plans_recent_prompt_tokens(tiny_model_dir, monkeypatch, tmp_path):
    llm = make_llm(tiny_model_dir, max_batched=16)
    llm = make_llm(tiny_model_dir, max_batched=16, plan=length_plan(llm, tmp_path, prefill_recent=12))
    out, visible = run_recorded(llm, monkeypatch, greedy(3, prefill_keep=[[1, 0.3]]))
    n = len(out.prompt_token_ids)
    # Below layer 2 the first decode query sees the whole prompt; deeper, a prompt missing its
    # dropped rows, never one of the last 12 (without the plan's prefill_recent some of them go).
    assert visible.seen[0, n] == set(range(n + 1))
    deeper = visible.seen[2, n]
    assert set(range(n - 12, n + 1)) <= deeper and len(deeper) < n
    assert out.pruning["length"]["prompt_tokens_dropped"] > 0


def test_keep_everything_equals_dense_bit_for_bit(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    dense = llm.generate([PROMPT], greedy(12))[0]
    for pruning in ({"prefill_keep": 1.0}, {"kv_budget": 200}, {"prefill_keep": [[0, 1.0]], "kv_budget": 120}):
        kept = llm.generate([PROMPT], greedy(12, **pruning))[0]
        assert kept.outputs[0].token_ids == dense.outputs[0].token_ids
        assert kept.outputs[0].logprobs == dense.outputs[0].logprobs, pruning     # exact
        assert kept.pruning["length"] == {"prompt_tokens_dropped": 0, "kv_slots_evicted": 0, "kv_bytes_saved": 0.0}


def test_a_mixed_batch_equals_each_sequence_alone(tiny_model_dir):
    policies = [{}, {"kv_budget": 10}, {"kv_budget": 16}, {"prefill_keep": 0.5}, {"prefill_keep": [[2, 0.3]], "kv_budget": 12}]
    prompts = [PROMPT[:60 + 13 * i] for i in range(len(policies))]
    llm = make_llm(tiny_model_dir, num_blocks=256)
    together = llm.generate(prompts, [greedy(10, **p) for p in policies])
    for prompt, policy, batched in zip(prompts, policies, together):
        alone = make_llm(tiny_model_dir, num_blocks=256).generate([prompt], greedy(10, **policy))[0]
        assert batched.outputs[0].token_ids == alone.outputs[0].token_ids, policy
        torch.testing.assert_close(torch.tensor(chosen_logprobs(batched)), torch.tensor(chosen_logprobs(alone)),
                                   atol=1e-5, rtol=1e-5)


def test_blocks_come_back_after_finish_abort_and_preemption(tiny_model_dir):
    llm = make_llm(tiny_model_dir, num_blocks=64, max_batched=24)
    engine, bm = llm.engine, llm.engine.block_manager
    start = bm.num_free_blocks
    # Finished: budgets free blocks as they go, and everything at the end.
    outs = llm.generate([PROMPT, PROMPT[:90], PROMPT[:70]], [greedy(40, kv_budget=8), greedy(30, prefill_keep=0.4),
                                                             greedy(20)])
    assert [len(o.outputs[0].token_ids) for o in outs] == [40, 30, 20]
    assert bm.num_free_blocks == start and sum(bm.live) == 0
    # Preempted and recomputed: a cache too small for all of them at once.
    prompts = [f"{i}. {PROMPT}" for i in range(4)]           # no shared prefix blocks
    outs = llm.generate(prompts, [greedy(100, kv_budget=8), greedy(100), greedy(100, kv_budget=12), greedy(100)])
    assert engine.scheduler.num_preemptions > 0
    assert all(len(o.outputs[0].token_ids) == 100 for o in outs)
    assert bm.num_free_blocks == start and sum(bm.live) == 0
    # Aborted mid-decode.
    engine.add_request("a", engine.tokenizer.encode(PROMPT), greedy(50, kv_budget=8))
    engine.add_request("b", engine.tokenizer.encode(PROMPT), greedy(50, prefill_keep=0.3))
    for _ in range(6):
        engine.step()
    assert bm.num_free_blocks < start
    engine.abort_request("a")
    engine.abort_request("b")
    assert bm.num_free_blocks == start and not engine.has_unfinished_requests()


def test_a_kv_budget_keeps_the_blocks_per_sequence_bounded(tiny_model_dir):
    llm = make_llm(tiny_model_dir, num_blocks=128)
    engine = llm.engine
    engine.add_request("r", engine.tokenizer.encode(PROMPT), greedy(120, kv_budget=12))
    seq, peak = engine.requests["r"].seqs[0], 0
    while engine.has_unfinished_requests():
        engine.step()
        if not seq.is_finished:
            assert len(seq.kv_slots) <= 12 and seq.kv_positions == sorted(seq.kv_positions)
            peak = max(peak, len(seq.block_table))
    # 12 keys need 3 blocks of 4; compaction keeps a sequence within a few more.
    assert peak <= 3 + max(2, 3 // 4) + 1
    # Over a long decode the attention the budget skips outweighs scoring every key.
    usage = engine.requests.get("r") or llm.generate([PROMPT], greedy(120, kv_budget=12))[0]
    assert usage.pruning["saved_flops"]["length"] > 0 and usage.pruning["length"]["kv_slots_evicted"] > 100


def test_a_pruned_request_never_corrupts_a_dense_one_sharing_its_prefix(tiny_model_dir):
    # Reference: a dense request served from the prefix cache of an identical earlier one.
    reference = make_llm(tiny_model_dir, num_blocks=128)
    reference.generate([PROMPT], greedy(12))
    cached = reference.generate([PROMPT], greedy(12))[0]
    # The same, with a pruned request on the same prompt in between.
    llm = make_llm(tiny_model_dir, num_blocks=128)
    llm.generate([PROMPT], greedy(12))
    pruned = llm.generate([PROMPT], greedy(12, kv_budget=8, prefill_keep=0.3))[0]
    assert pruned.pruning["length"]["kv_slots_evicted"] > 0 and pruned.pruning["length"]["prompt_tokens_dropped"] > 0
    again = llm.generate([PROMPT], greedy(12))[0]
    assert llm.engine.block_manager.cached                          # the dense blocks are still published
    assert again.outputs[0].token_ids == cached.outputs[0].token_ids
    assert again.outputs[0].logprobs == cached.outputs[0].logprobs


@pytest.mark.parametrize("pruning, message", [
    ({"kv_budget": 2}, "kv_budget must be at least"),
    ({"prefill_keep": 0.0}, "fraction in (0, 1]"),
    ({"prefill_keep": [[9, 0.5]]}, "needs a layer in [0, 4)"),
    ({"prefill_keep": [[2, 0.5], [1, 0.3]]}, "must increase"),
    ({"prefill_keep": [[1, 0.3], [2, 0.5]]}, "must not increase"),
    ({"profile": "balanced"}, "not served here"),
])
def test_bad_request_pruning_is_refused(tiny_model_dir, pruning, message):
    llm = make_llm(tiny_model_dir)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        llm.generate([PROMPT], greedy(4, **pruning))


def test_prompt_logprobs_with_prefill_dropping_are_refused(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    params = SamplingParams(max_tokens=2, prompt_logprobs=1, pruning=RequestPruning(prefill_keep=0.5))
    with pytest.raises(ValueError, match="prompt logprobs"):
        llm.generate([PROMPT], params)


def test_selection_rules():
    from trident.engine.pruning.length import budget_policy, select_evictions, select_rows
    from trident.engine.pruning.plan import LengthPolicy

    mass = torch.tensor([0.0, 5.0, 0.1, 4.0, 0.2, 3.0, 0.3])
    positions = torch.arange(10, 17)
    # keep 3: the two heaviest plus the last row, which always stays
    assert select_rows(mass, positions, 3, sinks=0).tolist() == [1, 3, 6]
    # positions from `recent_from` on stay too, within the same count
    assert select_rows(mass, positions, 3, sinks=0, recent_from=15).tolist() == [1, 5, 6]
    # positions below `sinks` stay too, even when that keeps more than asked
    assert select_rows(mass, torch.arange(7), 2, sinks=2).tolist() == [0, 1, 6]
    # max-pooled over 3 neighbours, the rows around the heaviest one (1) score as it does and
    # outrank row 5 (4.0), which plain scores keep
    pooled = torch.tensor([0.0, 5.0, 0.1, 0.0, 0.0, 4.0, 0.3, 0.0])
    assert select_rows(pooled, torch.arange(10, 18), 4, sinks=0).tolist() == [1, 5, 6, 7]
    assert select_rows(pooled, torch.arange(10, 18), 4, sinks=0, pool=3).tolist() == [0, 1, 2, 7]
    policy = LengthPolicy(decode_sinks=1, decode_recent=2, decode_heavy=2)
    # 7 keys, budget 5: key 0 (sink), keys 5-6 (recent), and the two heaviest of 1-4 (1 and 3) stay
    assert select_evictions(mass, policy).tolist() == [2, 4]
    assert select_evictions(mass[:5], policy).tolist() == []                 # within budget
    # pooled over 3 neighbouring keys, the heavy hitters are 1 and 2 (next to the heaviest), not 1 and 3
    pooled_policy = LengthPolicy(decode_sinks=1, decode_recent=2, decode_heavy=2, kv_pool=3)
    assert select_evictions(torch.tensor([0.0, 5.0, 0.1, 4.0, 0.0, 0.0, 0.3]), pooled_policy).tolist() == [3, 4]
    split = budget_policy(256, LengthPolicy())
    assert (split.decode_sinks, split.decode_recent, split.decode_heavy) == (4, 126, 126)
