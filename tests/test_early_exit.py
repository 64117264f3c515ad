"""Dynamic early exit: a threshold that never fires is dense bit for bit, a forced exit equals a
reference that runs k layers and fills the deeper K/V from the exit state, a batch with mixed exit
layers equals each sequence run alone, and calibration writes a plan the engine serves."""
import json

import pytest
import torch

from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from trident.engine.llm import LLM
from trident.engine.loader import load_checkpoint
from trident.engine.calibration.calibrate import calibrate
from trident.engine.calibration.exits import TEMPERATURES, ExitData, default_exit_layers, fit_probe, pick_threshold
from trident.engine.pruning.length import RequestPruning
from trident.engine.pruning.plan import ExitPoint, PlanError, PruningPlan
from trident.engine.sampling_params import SamplingParams
from trident.kernels.metadata import AttentionMetadata

PROMPTS = ["The quick brown fox jumps over", "Once upon a time there was a dragon who liked", "hello", "a b c d e f"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)


def make_llm(model, plan=None):
    return LLM(EngineConfig(model=str(model), dtype="float32", plan=plan, cache=CacheConfig(num_blocks=64),
                            scheduler=SchedulerConfig(max_model_len=256)))


def exit_plan_file(model_dir, path, exits: dict[int, ExitPoint]):
    plan = PruningPlan.dense(load_checkpoint(str(model_dir)).config)
    plan.name = "exits"
    for layer, point in exits.items():
        plan.layers[layer].exit = point
    plan.save(path)
    return str(path)


def probe(hidden: int, scale: float, bias: float = 0.0, seed: int = 0) -> ExitPoint:
    g = torch.Generator().manual_seed(seed)
    return ExitPoint(threshold=0.5, probe_weight=(scale * torch.randn(hidden, generator=g)).tolist(), probe_bias=bias)


def chosen_logprobs(out):
    return [lp[t] for lp, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]


@pytest.fixture(scope="module")
def hidden(tiny_model_dir):
    return load_checkpoint(str(tiny_model_dir)).config.hidden_size


@pytest.fixture(scope="module")
def dense(tiny_model_dir):
    return make_llm(tiny_model_dir)


def test_a_threshold_that_never_fires_equals_dense_bit_for_bit(tiny_model_dir, tmp_path, dense, hidden):
    never = ExitPoint(threshold=0.5, probe_weight=[0.0] * hidden, probe_bias=-100.0)
    llm = make_llm(tiny_model_dir, exit_plan_file(tiny_model_dir, tmp_path / "p.json", {1: never, 2: never}))
    want, got = dense.generate(PROMPTS, GREEDY), llm.generate(PROMPTS, GREEDY)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert chosen_logprobs(g) == chosen_logprobs(w)                # bit for bit
        assert g.pruning["early_exit"]["tokens_exited"] == 0 and g.pruning["early_exit"]["checks"] == 2 * 11
        assert g.pruning["saved_fraction"]["depth"] < 0                 # the checks cost, nothing was saved


def reference_exit_decode(llm: LLM, prompt: list[int], steps: int, exit_after: int,
                          temperature: float = 1.0) -> tuple[list[int], list[float]]:
    """Greedy decode on fresh caches: the prompt through every layer, then each token through
    layers 0..exit_after, K/V of the deeper layers from its exit state, logits from that state
    (divided by `temperature`). Returns the tokens and each one's log-probability."""
    model = llm.engine.model
    caches = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in llm.engine.runner.kv_caches]
    n = len(prompt)
    with torch.inference_mode():
        meta = AttentionMetadata.from_keys([list(range(n))], [list(range(n))], [n])
        first = model.compute_logits(model(torch.tensor(prompt), meta.query_positions, meta, caches))[-1]
        tokens, logprobs = [int(first.argmax())], [float(first.log_softmax(-1).max())]
        for _ in range(steps - 1):
            p = n + len(tokens) - 1
            meta = AttentionMetadata.from_keys([list(range(p + 1))], [list(range(p + 1))], [1])
            x = model.embed_tokens(torch.tensor(tokens[-1:]))
            angles = model.rotary.angles(meta.query_positions)
            for layer, cache in zip(model.layers, caches):
                if layer.spec.index <= exit_after:
                    x = layer(x, angles, meta, cache)
                else:
                    layer.self_attn.fill_kv(layer.input_layernorm(x), angles, meta.slot_mapping, cache)
            logits = model.compute_logits(model.norm(x))[-1] / temperature
            tokens.append(int(logits.argmax()))
            logprobs.append(float(logits.log_softmax(-1).max()))
    return tokens, logprobs


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_a_forced_exit_equals_running_k_layers_and_filling_the_deeper_kv(tiny_model_dir, tmp_path, hidden, temperature):
    point = probe(hidden, 0.1)
    point.temperature = temperature
    llm = make_llm(tiny_model_dir, exit_plan_file(tiny_model_dir, tmp_path / "p.json", {1: point}))
    forced = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0,
                            pruning=RequestPruning(exit_threshold=0.0))
    outs = llm.generate(PROMPTS, forced)
    for prompt, out in zip(PROMPTS, outs):
        want, want_logprobs = reference_exit_decode(llm, llm.tokenizer.encode(prompt), 12, 1, temperature)
        assert out.outputs[0].token_ids == want
        assert chosen_logprobs(out) == pytest.approx(want_logprobs, abs=1e-5)
        assert out.pruning["early_exit"]["exits_after_layers"] == {"2": 11}     # every decode token, after 2 layers
        prompt_len = len(llm.tokenizer.encode(prompt))
        assert (out.pruning["tokens"], out.pruning["layer_tokens"]) == (prompt_len + 11, 4 * prompt_len + 2 * 11)
        assert out.pruning["saved_fraction"]["depth"] > 0
    assert llm.engine.block_manager.num_free_blocks == 64


def test_a_batch_with_mixed_exit_layers_equals_each_sequence_alone(tiny_model_dir, tmp_path, hidden):
    # Probes with spread-out scores: at threshold 0.5 some tokens exit at layer 0, some at 2, some never.
    path = exit_plan_file(tiny_model_dir, tmp_path / "p.json", {0: probe(hidden, 0.5, seed=1), 2: probe(hidden, 0.5, seed=2)})
    llm = make_llm(tiny_model_dir, path)
    params = [GREEDY, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0,
                                     pruning=RequestPruning(exit_threshold=0.3)),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0,
                             pruning=RequestPruning(early_exit=False)), GREEDY]
    together = llm.generate(PROMPTS, params)
    alone = [llm.generate([p], q)[0] for p, q in zip(PROMPTS, params)]
    for t, a in zip(together, alone):
        assert t.outputs[0].token_ids == a.outputs[0].token_ids
        assert chosen_logprobs(t) == pytest.approx(chosen_logprobs(a), abs=1e-5)
    layers = {}
    for out in together:
        for n, count in out.pruning.get("early_exit", {}).get("exits_after_layers", {}).items():
            layers[n] = layers.get(n, 0) + count
    assert set(layers) == {"1", "3"}, layers                            # both exit points fired in the batch
    assert "early_exit" not in together[2].pruning or together[2].pruning["early_exit"]["checks"] == 0


@pytest.mark.parametrize("pruning, message", [
    (RequestPruning(exit_threshold=1.5), r"exit_threshold must be in \[0, 1\]"),
    (RequestPruning(early_exit=False, exit_threshold=0.5), "turns off"),
    (RequestPruning(early_exit=True, kv_budget=64), "length pruning"),
])
def test_exit_requests_that_cannot_run_are_refused(tiny_model_dir, tmp_path, hidden, pruning, message):
    llm = make_llm(tiny_model_dir, exit_plan_file(tiny_model_dir, tmp_path / "p.json", {1: probe(hidden, 0.1)}))
    with pytest.raises(ValueError, match=message):
        llm.generate(["hi"], SamplingParams(max_tokens=2, pruning=pruning))


def test_exits_need_a_plan_with_exit_points_and_valid_probes(tiny_model_dir, tmp_path, dense, hidden):
    with pytest.raises(ValueError, match="no exit points"):
        dense.generate(["hi"], SamplingParams(max_tokens=2, pruning=RequestPruning(early_exit=True)))
    for exits, message in (({3: probe(hidden, 0.1)}, "after the last kept layer"),
                           ({1: ExitPoint(threshold=0.5)}, "needs a probe"),
                           ({1: ExitPoint(threshold=2.0, probe_weight=[0.0] * hidden)}, "threshold must be in")):
        with pytest.raises(PlanError, match=message):
            make_llm(tiny_model_dir, exit_plan_file(tiny_model_dir, tmp_path / "bad.json", exits))


def test_thresholds_meet_the_target_agreement_and_probes_separate():
    scores = torch.tensor([0.9, 0.8, 0.8, 0.7, 0.6, 0.2])
    agrees = torch.tensor([True, True, False, True, False, False])
    assert pick_threshold(scores, agrees, 1.0) == pytest.approx(0.9)     # ties at 0.8 exit together: 2/3 < 1
    assert pick_threshold(scores, agrees, 0.75) == pytest.approx(0.7)    # 3 of the top 4
    assert pick_threshold(scores, torch.zeros(6, dtype=torch.bool), 0.5) == 1.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    weight, bias = fit_probe(ExitData(x, x[:, 0] > 0.3))
    assert weight[0] > 0 and weight[0] > weight[1:].abs().max()
    assert default_exit_layers(30) == [14, 18, 21, 25] and default_exit_layers(4) == [1, 2]


def test_calibrate_writes_an_exit_plan_the_engine_serves(tiny_model_dir, tmp_path, dense):
    text = " ".join(["The quick brown fox jumps over the lazy dog. Once upon a time there was a dragon."] * 60)
    (tmp_path / "text.txt").write_text(text)
    report = calibrate(str(tiny_model_dir), tmp_path / "text.txt", num_tokens=256, eval_tokens=128, window=64,
                       out_dir=tmp_path / "out", exit_layers=(1,), exit_agreement=0.9)
    assert set(report["exits"]) == {"1"} and 0 <= report["exits"]["1"]["threshold"] <= 1
    assert report["exits"]["1"]["temperature"] in TEMPERATURES
    plan = json.loads((tmp_path / "out" / "exit.json").read_text())
    assert plan["layers"][1]["exit"]["threshold"] == report["exits"]["1"]["threshold"]
    out = make_llm(tiny_model_dir, str(tmp_path / "out" / "exit.json")).generate(PROMPTS[:1], GREEDY)[0]
    assert out.pruning["early_exit"]["checks"] == 11


def test_a_prompt_only_request_next_to_exiting_rows_and_no_shared_approximate_kv(tiny_model_dir, tmp_path, hidden):
    """A max_tokens=0 request whose last prompt chunk is one token (after a prefix-cache hit) runs
    beside rows that exit; and blocks whose K/V an exit filled are never reused by prefix caching."""
    llm = make_llm(tiny_model_dir, exit_plan_file(tiny_model_dir, tmp_path / "p.json", {1: probe(hidden, 0.1)}))
    forced = RequestPruning(exit_threshold=0.0)
    prompt = llm.tokenizer.encode(" ".join(["word"] * 200))[:33]          # two full blocks and one token
    llm.generate([prompt], SamplingParams(max_tokens=1))                    # publish its full blocks
    outs = llm.generate([prompt, PROMPTS[0]], [SamplingParams(max_tokens=0, pruning=forced),
                                               SamplingParams(max_tokens=8, ignore_eos=True, pruning=forced)])
    assert outs[0].outputs[0].token_ids == [] and len(outs[1].outputs[0].token_ids) == 8
    # A follow-up turn over a forced-exit completion, without exits, equals a fresh dense engine's.
    first = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, pruning=forced))[0]
    follow = llm.tokenizer.encode(PROMPTS[1]) + first.outputs[0].token_ids + [5, 6, 7]
    plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0,
                           pruning=RequestPruning(early_exit=False))
    got = llm.generate([follow], plain)[0]
    want = make_llm(tiny_model_dir).generate([follow], plain)[0]
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert chosen_logprobs(got) == pytest.approx(chosen_logprobs(want), abs=1e-5)


def test_the_dense_profile_refuses_exits(tiny_model_dir, tmp_path, hidden):
    llm = make_llm(tiny_model_dir, exit_plan_file(tiny_model_dir, tmp_path / "p.json", {1: probe(hidden, 0.1)}))
    with pytest.raises(ValueError, match="'dense' runs no dynamic pruning"):
        llm.generate(["hi"], SamplingParams(max_tokens=2, pruning=RequestPruning(profile="dense", exit_threshold=0.5)))
    out = llm.generate(["hi"], SamplingParams(max_tokens=4, ignore_eos=True, pruning=RequestPruning(profile="dense")))[0]
    assert out.pruning["early_exit"]["checks"] == 0
