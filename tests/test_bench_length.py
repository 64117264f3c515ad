"""bench/length_sweep.py on the tiny model: teacher forcing, admission and the whole sweep's record."""
from __future__ import annotations

import json

from trident.bench import length_sweep
from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from trident.engine.llm import LLM
from trident.engine.pruning.plan import LengthPolicy
from trident.engine.sampler import sample
from trident.engine.sampling_params import SamplingParams


def test_teacher_forcing_feeds_the_targets_and_scores_them(tiny_model_dir):
    llm = LLM(EngineConfig(model=str(tiny_model_dir), dtype="float32", cache=CacheConfig(num_blocks=64),
                           scheduler=SchedulerConfig(max_model_len=128)))
    passage = list(range(5, 45))
    (forced,) = length_sweep.forced_continuation(llm, [passage], 30, None)
    assert len(forced) == 10
    # The logprob of each target equals the one a plain prompt-logprobs pass gives that position.
    reference = llm.prompt_logprobs(passage)
    for (logprob, _), expected in zip(forced, reference[29:]):      # reference[i]: token i + 1
        assert abs(logprob - expected) < 1e-4
    # The forced argmax is what greedy decoding picks after the same prefix.
    greedy = llm.generate([passage[:30]], SamplingParams(max_tokens=1, temperature=0))[0].outputs[0].token_ids
    assert forced[0][1] == greedy[0]
    assert llm.engine.runner.sampler is sample          # the engine's own sampler is back afterwards


def test_the_sweep_writes_every_figure(tiny_model_dir, tmp_path):
    out = tmp_path / "length"
    assert length_sweep.main(["--model", str(tiny_model_dir), "--context", "120", "--continuation", "16",
                              "--passages", "2", "--prefill-keeps", "0.5", "--budgets", "16", "--streams", "2",
                              "--decode-tokens", "3", "--rounds", "1", "--admission-tokens", "40",
                              "--recent-only", "40", "--prefill-recent", "8", "--output-dir", str(out)]) == 0
    rows = {r["policy"]: r for r in json.loads((out / "length_sweep.json").read_text())["rows"]}
    assert set(rows) == {"dense", "keep 0.5 after layer 0", "kv budget 16", "dense on the last 40 tokens"}
    assert rows["dense on the last 40 tokens"]["perplexity"] > 0
    budget = rows["kv budget 16"]
    assert budget["decode_tok_s"] > 0 and budget["admitted"] >= rows["dense"]["admitted"] >= 2
    assert budget["blocks_per_seq"] < rows["dense"]["blocks_per_seq"]
    assert 0 <= budget["token_agreement"] <= 1 and budget["perplexity"] > 0
    assert rows["keep 0.5 after layer 0"]["ttft_s"] > 0
    assert (out / "length_sweep.png").stat().st_size > 0


def test_the_sweep_compares_prefill_pools_under_plan_files(tiny_model_dir, tmp_path):
    out = tmp_path / "pools"
    assert length_sweep.main(["--model", str(tiny_model_dir), "--context", "120", "--continuation", "16",
                              "--passages", "1", "--prefill-keeps", "0.5", "--prefill-layer", "1", "--budgets", "",
                              "--compare-pools", "1", "--streams", "1", "--decode-tokens", "2", "--rounds", "1",
                              "--admission-tokens", "20", "--output-dir", str(out)]) == 0
    rows = {r["policy"]: r for r in json.loads((out / "length_sweep.json").read_text())["rows"]}
    default = LengthPolicy().prefill_pool
    assert set(rows) == {"dense", f"keep 0.5 after layer 1, pool {default}", "keep 0.5 after layer 1, pool 1"}
    pooled = rows["keep 0.5 after layer 1, pool 1"]
    assert pooled["pruning"] == {"prefill_keep": [[1, 0.5]], "prefill_pool": 1} and pooled["perplexity"] > 0
