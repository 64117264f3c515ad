"""Trident's model code against HF transformers on tiny random models, from both file formats."""
import numpy as np
import pytest
import torch

from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from trident.engine.llm import LLM
from trident.engine.sampling_params import SamplingParams

PROMPTS = ["The quick brown fox jumps", "Once upon a time there was a dragon who", "Hi"]


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def make_llm(model, **sched):
    return LLM(EngineConfig(model=str(model), dtype="float32", cache=CacheConfig(num_blocks=64),
                            scheduler=SchedulerConfig(max_model_len=256, **sched)))


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_logits_equal_hf(fmt, tiny_model_dir, tiny_gguf):
    llm = make_llm(tiny_model_dir if fmt == "hf" else tiny_gguf)
    ref = hf_model(tiny_model_dir)
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        ours = torch.tensor(llm.prompt_logprobs(ids))
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        expected = expected.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_greedy_equals_hf_with_chunked_prefill(tiny_model_dir):
    # A 5-token budget splits every prompt into chunks and mixes them with decodes of other sequences.
    llm = make_llm(tiny_model_dir, max_num_batched_tokens=5)
    ref = hf_model(tiny_model_dir)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.tokenizer.encode(prompt)
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert out.outputs[0].token_ids == expected[0, len(ids):].tolist()
        assert out.outputs[0].finish_reason == "length"


def test_preemption_recomputes_to_the_same_tokens(tiny_model_dir):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    roomy = make_llm(tiny_model_dir).generate(PROMPTS * 2, params)
    # 8 blocks of 16 tokens cannot hold six growing sequences: the scheduler must preempt.
    tight = LLM(EngineConfig(model=str(tiny_model_dir), dtype="float32", cache=CacheConfig(num_blocks=8),
                             scheduler=SchedulerConfig(max_model_len=64)))
    outs = tight.generate(PROMPTS * 2, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]
    assert tight.engine.block_manager.num_free_blocks == 8


def test_stop_strings_and_tokens(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    free = llm.generate(["Once upon"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].outputs[0]
    stop = free.text[5:8]
    assert stop and stop in free.text
    out = llm.generate(["Once upon"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                      stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:free.text.index(stop)]
    tok = free.token_ids[3]
    out = llm.generate(["Once upon"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                      stop_token_ids=[tok]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok
    assert out.token_ids == free.token_ids[:free.token_ids.index(tok) + 1]


def test_seeds_n_and_logprobs(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=7, n=3, logprobs=2)
    a = llm.generate(["Hello"], params)[0]
    b = llm.generate(["Hello", "The quick"], params)[0]     # other work in the batch changes nothing
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3   # children get distinct seeds
    for o in a.outputs:
        assert len(o.logprobs) == len(o.token_ids)
        for tok, lp in zip(o.token_ids, o.logprobs):
            assert tok in lp and 1 <= len(lp) <= 3 and all(v <= 0 for v in lp.values())


def test_penalties_and_logprobs_are_batch_invariant(tiny_model_dir):
    # A decode step samples every row straight from the step's logits (no row copy), and
    # penalties edit those logits in place: each row must still see only its own penalties.
    llm = make_llm(tiny_model_dir)
    penalised = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, frequency_penalty=1.5,
                               presence_penalty=0.5, logprobs=2)
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def run(params):
        return [out.outputs[0] for out in llm.generate(["Hello"] * len(params), params)]

    [alone] = run([penalised])
    [plain_alone] = run([plain])
    assert alone.token_ids != plain_alone.token_ids          # the penalties change the tokens
    together, plain_together = run([penalised, plain])
    assert together.token_ids == alone.token_ids and plain_together.token_ids == plain_alone.token_ids
    for got, want in zip(together.logprobs, alone.logprobs):
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-5 for k in got)


def test_request_validation(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    with pytest.raises(ValueError, match="maximum context length is 256"):
        llm.engine.add_request("a", [1] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        llm.engine.add_request("b", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        llm.engine.add_request("c", [10**6], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="1 sampling params for 2 prompts"):
        llm.generate(["Hello", "Hi"], [SamplingParams()])
    assert not llm.engine.has_unfinished_requests()                 # nothing was queued
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match="leaves nothing to sample"):
        llm.generate(["Hello"], SamplingParams(min_tokens=2, stop_token_ids=list(range(vocab))))
    with pytest.raises(ValueError, match="stop_token_ids must be in"):
        llm.generate(["Hello"], SamplingParams(min_tokens=2, stop_token_ids=[10**6]))
    assert SamplingParams(seed=np.int64(3), max_tokens=np.int64(4), top_p=np.float32(0.5)).max_tokens == 4
    with pytest.raises(ValueError, match="maximum context length"):    # the second prompt is too long
        llm.generate([[5, 6, 7], [1] * 300], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()                 # the first was not queued either


def test_min_tokens_holds_back_eos_and_stops(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    free = llm.generate(["Hello"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0]
    stop_token = free.token_ids[1]                    # greedy emits it second: a stop there ends early
    stopped = llm.generate(["Hello"], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_token]))[0]
    assert len(stopped.outputs[0].token_ids) <= 2
    held = llm.generate(["Hello"], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_token],
                                                  min_tokens=6))[0].outputs[0]
    assert len(held.token_ids) >= 6 and stop_token not in held.token_ids[:6]


def test_one_token_prompt_logprobs_and_output_snapshots(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    out = llm.generate([[5]], SamplingParams(max_tokens=2, prompt_logprobs=1))[0]
    assert out.prompt_logprobs == [None]              # one entry per prompt token
    engine = llm.engine
    engine.add_request("s", [5, 6], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1))
    first = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            first = first or o
    assert len(first.outputs[0].logprobs) == len(first.outputs[0].token_ids) == 1   # not the live list


def test_tiny_temperature_is_greedy(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    greedy = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    tiny = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=1e-45, ignore_eos=True))[0]
    assert tiny.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_stop_string_found_at_the_start_of_a_long_delta(tiny_model_dir):
    # One token can decode to many characters (e.g. a newline plus indentation); a stop string at
    # the start of such a delta must still end the sequence and stay out of the text.
    llm = make_llm(tiny_model_dir)
    engine = llm.engine
    engine.add_request("r", llm.tokenizer.encode("Hello"), SamplingParams(max_tokens=10, stop=["\n"]))
    req = engine.requests["r"]
    req.detokenizers[0].add = lambda token: "ab\n" + " " * 40 + "x"
    engine.output.append_token(req, req.seqs[0], 5, None)
    assert req.seqs[0].finish_reason == "stop" and req.seqs[0].text == "ab"


def test_prompt_logprobs_survive_preemption(tiny_model_dir):
    prompts = [list(range(10, 70)), list(range(100, 150))]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, prompt_logprobs=1)
    reference = make_llm(tiny_model_dir).generate(prompts, params)
    # Six 16-token blocks for two growing sequences, 8-token chunks: the newer request is preempted
    # after part of its prompt was scored, then recomputed from position 0.
    tight = LLM(EngineConfig(model=str(tiny_model_dir), dtype="float32", cache=CacheConfig(num_blocks=6),
                             scheduler=SchedulerConfig(max_model_len=96, max_num_batched_tokens=8)))
    outs = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    for prompt, out, ref in zip(prompts, outs, reference):
        assert len(out.prompt_logprobs) == len(prompt)
        for got, want in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
            assert got.keys() == want.keys()
            assert all(abs(got[k] - want[k]) < 1e-4 for k in got)


def test_cpu_decode_attention_shares_one_mask_per_step_and_rebuilds_it_for_new_positions():
    import torch.nn.functional as F

    from trident.kernels.attention import paged_attention_ref
    from trident.kernels.metadata import AttentionMetadata

    torch.manual_seed(0)
    block, kv_heads, group, dim = 4, 2, 3, 8
    meta = AttentionMetadata.build([[0, 1, 2], [3]], [9, 3], [1, 1], block)     # padded to 9 keys
    k_cache, v_cache = torch.randn(2, 4 * block, kv_heads, dim).unbind(0)
    q = torch.randn(2, kv_heads * group, dim)

    def expected(positions):
        out = []
        for s in range(2):
            keep = positions[s] >= 0
            keys = k_cache[meta.key_slots[s][keep]].repeat_interleave(group, 1).transpose(0, 1)
            values = v_cache[meta.key_slots[s][keep]].repeat_interleave(group, 1).transpose(0, 1)
            out.append(F.scaled_dot_product_attention(q[s][:, None], keys, values, scale=0.5)[:, 0])
        return torch.stack(out)

    first = paged_attention_ref(q, k_cache, v_cache, meta, 0.5)
    (mask,) = [v[1] for v in meta.derived.values()]
    assert paged_attention_ref(q, k_cache, v_cache, meta, 0.5).shape == first.shape
    assert len(meta.derived) == 1 and next(iter(meta.derived.values()))[1] is mask   # every layer reuses it
    torch.testing.assert_close(first, expected(meta.key_positions))
    meta.key_positions = meta.key_positions.clone()
    meta.key_positions[0, 2] = -1                                # a dropped token
    torch.testing.assert_close(paged_attention_ref(q, k_cache, v_cache, meta, 0.5), expected(meta.key_positions))


def test_bad_checkpoints_name_the_file(tmp_path, tiny_model_dir, tiny_gguf, monkeypatch):
    import json
    import shutil

    from trident.engine.loader import load_checkpoint

    monkeypatch.setenv("TRIDENT_CACHE_DIR", str(tmp_path / "cache"))      # no cached copy to fall back on
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.gguf is not a readable GGUF file"):
        load_checkpoint(str(cut))
    import trident.engine.loader as loader

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(loader, "save_file", full_disk)               # fails after the cache folder exists
    with pytest.raises(OSError, match="No space left"):
        load_checkpoint(str(tiny_gguf))
    assert (tmp_path / "cache").exists() and not any((tmp_path / "cache").iterdir())   # nothing half-written
    folder = tmp_path / "folder"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["num_attention_heads"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json has no 'num_attention_heads'"):
        load_checkpoint(str(folder))
    (folder / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_checkpoint(str(folder))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_and_swiglu_are_hf_definitions_bit_for_bit(dtype):
    """One definition of RMSNorm and SwiGLU for the model, the kernels and their twins: HF
    transformers' (the Triton kernels implement it too; tests/kernels checks them against the twins)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from trident.kernels.fused_norm import add_rms_norm_op, rms_norm_op
    from trident.kernels.swiglu import swiglu_op

    torch.manual_seed(0)
    x, residual = torch.randn(5, 64).to(dtype), torch.randn(5, 64).to(dtype)
    hf_norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf_norm.weight.copy_(1 + 0.1 * torch.randn(64))
        assert torch.equal(rms_norm_op(x, hf_norm.weight, 1e-5), hf_norm(x))
        normed, summed = add_rms_norm_op(x, residual, hf_norm.weight, 1e-5)
        assert torch.equal(summed, residual + x) and torch.equal(normed, hf_norm(residual + x))
        gate_up = torch.randn(5, 2 * 48).to(dtype)
        gate, up = gate_up[:, :48], gate_up[:, 48:]
        assert torch.equal(swiglu_op(gate_up), torch.nn.functional.silu(gate) * up)     # LlamaMLP's act * up
