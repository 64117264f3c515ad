"""Pruning plans: JSON round trip, validation, exact slicing, dense identity, accounting, calibration."""
import json

import pytest
import torch

from trident.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from trident.engine.llm import LLM
from trident.engine.loader import load_checkpoint
from trident.engine.pruning.accounting import FlopCounter, LayerShape, merge_summaries
from trident.engine.pruning.apply import apply_plan
from trident.engine.pruning.plan import ExitPoint, LayerPlan, LengthPolicy, PlanError, PruningPlan
from trident.engine.sampling_params import SamplingParams

PROMPTS = ["The quick brown fox jumps over", "Once upon a time there was a dragon who liked"]


def make_llm(model, plan=None):
    return LLM(EngineConfig(model=str(model), dtype="float32", plan=plan, cache=CacheConfig(num_blocks=64),
                            scheduler=SchedulerConfig(max_model_len=256)))


def tiny_plan(config: ModelConfig) -> PruningPlan:
    """Ragged heads (KV head 0 keeps 1 of 2 query heads, KV head 1 keeps both), a dropped KV group,
    channels and biases; every construct the width axis uses."""
    plan = PruningPlan.dense(config)
    g = torch.Generator().manual_seed(0)
    bias = lambda: (0.01 * torch.randn(config.hidden_size, generator=g)).tolist()
    plan.layers[0] = LayerPlan(kept_q_heads=[3, 1, 2], kept_kv_heads=[0, 1],
                               kept_ffn_channels=list(range(0, 96, 2)), attn_bias=bias(), ffn_bias=bias())
    plan.layers[1] = LayerPlan(kept_q_heads=[2, 3], kept_kv_heads=[1])
    plan.layers[2] = LayerPlan(kept_ffn_channels=[5, 1, 7, 60])
    return plan


def test_plan_json_round_trip(tmp_path, tiny_model_dir):
    config = load_checkpoint(str(tiny_model_dir)).config
    plan = tiny_plan(config)
    plan.layers[2].exit = ExitPoint(threshold=0.9, probe_weight=[0.0] * config.hidden_size)
    plan.length = LengthPolicy(prefill_keep=[(2, 0.5)], decode_sinks=4, decode_recent=64, decode_heavy=32,
                               kv_pool=7, evict_during_prefill=True)
    plan.save(tmp_path / "p.json")
    loaded = PruningPlan.load(tmp_path / "p.json")
    assert loaded == plan
    loaded.validate(config)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.layers[0].__setattr__("kept_q_heads", [4]), "query head 4 is out of range"),
    (lambda p: p.layers[0].__setattr__("kept_q_heads", [0, 2]) or p.layers[0].__setattr__("kept_kv_heads", [1]),
     "query head 0 is kept but its KV head 0 is dropped"),
    (lambda p: p.layers[1].__setattr__("kept_ffn_channels", [0, 96]), "FFN channel 96 is out of range"),
    (lambda p: p.layers[1].__setattr__("ffn_bias", [0.0] * 3), "ffn_bias has 3 values, hidden size is 64"),
    (lambda p: p.layers.pop(), "plan has 3 layers, model has 4"),
    (lambda p: p.model.__setitem__("num_heads", 8), "made for num_heads=8"),
    (lambda p: p.layers[0].__setattr__("kept_q_heads", []), "keeps no query heads"),
    (lambda p: p.layers[2].__setattr__("kept_kv_heads", [0]), "query head 2 is kept but its KV head 1 is dropped"),
    (lambda p: p.layers[2].__setattr__("kept_kv_heads", []), "query head 0 is kept but its KV head 0 is dropped"),
    (lambda p: [l.__setattr__("keep", False) for l in p.layers], "drops every layer"),
    (lambda p: p.layers[1].__setattr__("kept_q_heads", [0.0, 1.5]), "query head 0.0 is out of range"),
])
def test_plan_validation_errors(edit, message, tiny_model_dir):
    config = load_checkpoint(str(tiny_model_dir)).config
    plan = PruningPlan.dense(config)
    edit(plan)
    with pytest.raises(PlanError, match=message):
        plan.validate(config)


def test_bad_plan_files(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        PruningPlan.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(PlanError, match="version 99"):
        PruningPlan.load(tmp_path / "b.json")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.__setitem__("version", True), "version True is not supported"),
    (lambda d: d.__setitem__("version", 1.0), "version 1.0 is not supported"),
    (lambda d: d.__setitem__("model", None), "'model' must be an object"),
    (lambda d: d.__setitem__("layers", {"0": {}}), "'layers' must be a list"),
    (lambda d: d.__setitem__("extra", 1), "unknown field 'extra'"),
    (lambda d: d.pop("name"), "no 'name' field"),
    (lambda d: d["layers"].__setitem__(0, "keep"), "layer 0: must be an object"),
    (lambda d: d["layers"][1].__setitem__("keep", "false"), "layer 1: 'keep' must be true or false"),
    (lambda d: d["layers"][1].__setitem__("kept_q_heads", ["0", "1"]), "must hold integer indices, got '0'"),
    (lambda d: d["layers"][1].__setitem__("kept_q_heads", [0.0, 1.5]), "must hold integer indices, got 0.0"),
    (lambda d: d["layers"][1].__setitem__("kept_q_heads", [True, False]), "must hold integer indices, got True"),
    (lambda d: d["layers"][1].__setitem__("kept_q_heads", [[0]]), r"must hold integer indices, got \[0\]"),
    (lambda d: d["layers"][1].__setitem__("kept_ffn_channels", 3), "must be a list of integer indices or null"),
    (lambda d: d["layers"][1].__setitem__("ffn_bias", 0.5), "'ffn_bias' must be a list of numbers or null"),
    (lambda d: d["layers"][1].__setitem__("attn_bias", ["x"] * 64), "'attn_bias' must hold numbers"),
    (lambda d: d["layers"][1].__setitem__("exit", {"threshold": "high"}), "numeric 'threshold'"),
    (lambda d: d["layers"][1].__setitem__("exit", {"threshold": 0.5, "when": 1}), "malformed 'exit'"),
    (lambda d: d["layers"][1].__setitem__("heads", [0]), "layer 1: unknown field 'heads'"),
    (lambda d: d.__setitem__("length", {"decode_sinks": -5}), "'decode_sinks' must be a token count >= 0"),
    (lambda d: d.__setitem__("length", {"prefill_keep": [[1]]}), "list of \\[layer, fraction\\] pairs"),
    (lambda d: d.__setitem__("length", {"prefill_keep": [["a", 0.5]]}), "list of \\[layer, fraction\\] pairs"),
    (lambda d: d.__setitem__("length", {"kv_pool": 1.5}), "'kv_pool' must be a token count >= 0"),
    (lambda d: d.__setitem__("length", {"evict_during_prefill": 1}), "'evict_during_prefill' must be true or false"),
])
def test_malformed_plan_fields_are_named(edit, message, tiny_model_dir):
    data = json.loads(PruningPlan.dense(load_checkpoint(str(tiny_model_dir)).config).to_json())
    PruningPlan.from_dict(json.loads(json.dumps(data)))          # the unedited plan parses
    edit(data)
    with pytest.raises(PlanError, match=message):
        PruningPlan.from_dict(data)


def test_a_plan_from_another_checkpoint_of_the_same_shape_is_refused(tmp_path, tiny_model_dir):
    from tests.tiny_model import build_tiny_hf_model

    other = load_checkpoint(str(build_tiny_hf_model(tmp_path / "other", seed=1)))
    ours = load_checkpoint(str(tiny_model_dir))
    plan = tiny_plan(other.config)
    plan.model["digest"] = PruningPlan.checkpoint_digest(other.state_dict)
    apply_plan(other.state_dict, other.config, plan)                        # its own checkpoint: fine
    with pytest.raises(PlanError, match="calibrated on another checkpoint"):
        apply_plan(ours.state_dict, ours.config, plan)
    del plan.model["digest"]                                                # older plans: shape only
    apply_plan(ours.state_dict, ours.config, plan)


def test_compensation_adds_to_a_bias_the_checkpoint_has(tiny_model_dir):
    ckpt = load_checkpoint(str(tiny_model_dir))
    state, hidden = dict(ckpt.state_dict), ckpt.config.hidden_size
    own = {name: torch.randn(hidden) for name in ("self_attn.o_proj.bias", "mlp.down_proj.bias")}
    state.update({f"model.layers.0.{name}": b for name, b in own.items()})       # as attention_bias / mlp_bias
    plan = tiny_plan(ckpt.config)
    out = apply_plan(state, ckpt.config, plan)
    layer = plan.layers[0]
    assert torch.equal(out["model.layers.0.self_attn.o_proj.bias"],
                       own["self_attn.o_proj.bias"] + torch.tensor(layer.attn_bias))
    assert torch.equal(out["model.layers.0.mlp.down_proj.bias"], own["mlp.down_proj.bias"] + torch.tensor(layer.ffn_bias))


def test_dense_plan_is_bit_identical(tiny_model_dir):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3)
    plain = make_llm(tiny_model_dir).generate(PROMPTS, params)
    dense = make_llm(tiny_model_dir, plan="dense").generate(PROMPTS, params)
    for a, b in zip(plain, dense):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs          # exact, not approximately
    assert dense[0].pruning["total_saved_fraction"] == 0.0


def test_sliced_model_equals_zeroed_dense_model(tmp_path, tiny_model_dir):
    """Slicing must equal zeroing the dropped heads/channels' weights and adding the biases."""
    from safetensors.torch import load_file, save_file

    ckpt = load_checkpoint(str(tiny_model_dir))
    plan = tiny_plan(ckpt.config)
    plan.save(tmp_path / "plan.json")
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    d = ckpt.config.head_dim
    for i, layer in enumerate(plan.layers):
        p = f"model.layers.{i}."
        if layer.kept_q_heads is not None:
            for h in set(range(4)) - set(layer.kept_q_heads):
                state[p + "self_attn.o_proj.weight"][:, h * d:(h + 1) * d] = 0
        if layer.kept_ffn_channels is not None:
            drop = sorted(set(range(96)) - set(layer.kept_ffn_channels))
            state[p + "mlp.down_proj.weight"][:, drop] = 0
        if layer.attn_bias is not None:
            state[p + "self_attn.o_proj.bias"] = torch.tensor(layer.attn_bias)
        if layer.ffn_bias is not None:
            state[p + "mlp.down_proj.bias"] = torch.tensor(layer.ffn_bias)
    zeroed = tmp_path / "zeroed"
    zeroed.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "model.safetensors":
            (zeroed / f.name).write_bytes(f.read_bytes())
    save_file(state, str(zeroed / "model.safetensors"))

    sliced, reference = make_llm(tiny_model_dir, plan=str(tmp_path / "plan.json")), make_llm(zeroed)
    layers = sliced.engine.model.layers
    assert [l.self_attn.num_heads for l in layers] == [3, 2, 4, 4]
    assert layers[0].self_attn.virtual_q_heads.tolist() == [1, 2, 3]
    assert [l.self_attn.num_kv_heads for l in layers] == [2, 1, 2, 2]
    assert layers[2].mlp.intermediate_size == 4
    for prompt in PROMPTS:
        ids = sliced.tokenizer.encode(prompt)
        torch.testing.assert_close(torch.tensor(sliced.prompt_logprobs(ids)),
                                   torch.tensor(reference.prompt_logprobs(ids)), atol=1e-5, rtol=1e-5)
    # Decode steps (the ragged layers' virtual-layout path) too: same tokens, same logprobs.
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    for a, b in zip(sliced.generate(PROMPTS, params), reference.generate(PROMPTS, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        chosen = lambda out: [lp[t] for lp, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
        torch.testing.assert_close(torch.tensor(chosen(a)), torch.tensor(chosen(b)), atol=1e-5, rtol=1e-5)


def test_dropped_layer_and_usage_accounting(tmp_path, tiny_model_dir):
    config = load_checkpoint(str(tiny_model_dir)).config
    plan = PruningPlan.dense(config)
    plan.layers[3].keep = False
    plan.save(tmp_path / "p.json")
    llm = make_llm(tiny_model_dir, plan=str(tmp_path / "p.json"))
    assert len(llm.engine.model.layers) == 3
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    saved = out.pruning["saved_fraction"]
    assert saved["width"] == pytest.approx(0.0, abs=1e-12) and saved["length"] == 0.0
    assert 0.1 < saved["depth"] < 0.25      # a quarter of the layers, minus the LM head's share


def test_flop_formulas_by_hand():
    cfg = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=6, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=2)
    counter = FlopCounter(cfg, [LayerShape(2, 1, 3), None])
    # Pruned layer: q=4, kv=2 -> qkv 2*8*(4+4)=128, o 2*4*8=64, ffn 6*8*3=144 -> 336 per token.
    # Dense layer: q=8, kv=4 -> 2*8*16=256, 2*8*8=128, 6*8*6=288 -> 672 per token.
    # Tokens at positions 3 and 4 attend to 4 and 5 keys: sum 9. Attention 4*heads*2 per key.
    c = counter.step(num_new_tokens=2, context_end=5, num_logit_rows=1)
    head = 2 * 8 * 10
    assert c.executed == 2 * 336 + 4 * 2 * 2 * 9 + head
    assert c.dense == 2 * 2 * 672 + 4 * 4 * 2 * 2 * 9 + head
    assert c.saved["depth"] == 2 * 672 + 4 * 4 * 2 * 9
    assert c.saved["width"] == 2 * (672 - 336) + 4 * 2 * 2 * 9
    assert c.executed + sum(c.saved.values()) == c.dense
    # A ragged layer whose decode path computes all 4 slots of its virtual head layout (CPU).
    ragged = FlopCounter(cfg, [LayerShape(2, 1, 3, decode_attention_heads=4), None])
    assert ragged.step(1, 5, 1, decode=True).executed == 336 + 4 * 4 * 2 * 5 + head
    assert ragged.step(1, 5, 1).executed == 336 + 4 * 2 * 2 * 5 + head
    # CPU decode pads every sequence to the batch's longest (9 keys), dense side too; GPU does not.
    padded = FlopCounter(cfg, [LayerShape(2, 1, 3), None], decode_pads=True).step(1, 5, 1, decode=True, batch_keys=9)
    assert padded.executed == 336 + 4 * 2 * 2 * 9 + head
    assert padded.dense == 2 * 672 + 4 * 4 * 2 * 2 * 9 + head
    assert counter.step(1, 5, 1, decode=True, batch_keys=9).executed == 336 + 4 * 2 * 2 * 5 + head
    merged = merge_summaries([c.summary(), c.summary()])
    assert merged["dense_flops"] == 2 * c.dense
    assert merged["saved_fraction"]["depth"] == pytest.approx(c.saved["depth"] / c.dense)


def test_calibration_is_deterministic_and_writes_profiles(tmp_path, tiny_model_dir):
    from trident.engine.calibration.calibrate import calibrate

    text = " ".join(["The quick brown fox jumps over the lazy dog. Once upon a time there was a dragon."] * 60)
    (tmp_path / "text.txt").write_text(text)
    runs = [calibrate(str(tiny_model_dir), tmp_path / "text.txt", num_tokens=256, eval_tokens=128, window=64,
                      out_dir=tmp_path / f"run{i}", heal_steps=2, heal_budgets=(0.5,)) for i in range(2)]
    assert runs[0]["sweep"] == [{**p, "path": p["path"].replace("run1", "run0")} for p in runs[1]["sweep"]]
    for name in ("importance.json", "dense.json", "balanced.json", "aggressive.json", "width-0.50.json",
                 "width-0.50.safetensors"):
        assert (tmp_path / "run0" / name).read_bytes() == (tmp_path / "run1" / name).read_bytes()
    half = PruningPlan.load(tmp_path / "run0" / "width-0.50.json")
    assert sum(len(l.kept_q_heads or range(4)) for l in half.layers) == 8    # half of 4 layers x 4 heads
    assert half.weights == "width-0.50.safetensors" and runs[0]["sweep"][-1]["healing"]["steps"] == 2
    # Least-squares compensation gives every pruned plan refit weights; only the healed one trains.
    assert PruningPlan.load(tmp_path / "run0" / "width-0.40.json").weights == "width-0.40.safetensors"
    assert [p["plan"] for p in runs[0]["sweep"] if "healing" in p] == ["width-0.50"]
    assert runs[0]["sweep"][-1]["perplexity"] > runs[0]["dense_perplexity"]


def test_healing_brings_the_pruned_model_closer_to_dense_and_travels_with_the_plan(tmp_path, tiny_model_dir):
    from safetensors.torch import save_file

    from trident.engine.model import LlamaModel
    from trident.engine.calibration.heal import distill_loss, forward_logits, heal, layer_tensors

    ckpt = load_checkpoint(str(tiny_model_dir))
    cfg, plan = ckpt.config, tiny_plan(ckpt.config)
    build = lambda state: LlamaModel.from_hf_state_dict(cfg, state, 64, torch.float32, torch.device("cpu"))
    teacher = build(ckpt.state_dict)
    students = [build(apply_plan(ckpt.state_dict, cfg, plan)) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, cfg.vocab_size, (96, 32), generator=g).tolist()
    held_out = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    with torch.no_grad():
        target = forward_logits(teacher, held_out)
        before = distill_loss(forward_logits(students[0], held_out), target).item()
    runs = [heal(teacher, s, windows, steps=40, lr=5e-4, batch_size=4) for s in students]
    with torch.no_grad():
        after = distill_loss(forward_logits(students[0], held_out), target).item()
    assert after < 0.8 * before                                   # held-out KL, not the training batches
    assert runs[0] == runs[1]                                      # deterministic
    healed = layer_tensors(students[0])
    assert all(torch.equal(v, layer_tensors(students[1])[k]) for k, v in healed.items())

    # The plan's weights file reproduces the healed model in the engine.
    save_file(healed, str(tmp_path / "healed.safetensors"))
    plan.weights = "healed.safetensors"
    plan.save(tmp_path / "plan.json")
    llm = make_llm(tiny_model_dir, plan=str(tmp_path / "plan.json"))
    ids = held_out[0]
    with torch.no_grad():
        expected = torch.log_softmax(forward_logits(students[0], ids[None]), -1)[:-1].gather(1, ids[1:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(llm.prompt_logprobs(ids.tolist())), expected, atol=1e-4, rtol=1e-4)

    # A missing or foreign weights file is a clear error.
    (tmp_path / "healed.safetensors").unlink()
    with pytest.raises(PlanError, match="does not exist"):
        make_llm(tiny_model_dir, plan=str(tmp_path / "plan.json"))
    healed["model.layers.2.mlp.down_proj.weight"] = torch.zeros(cfg.hidden_size, 96)
    save_file(healed, str(tmp_path / "healed.safetensors"))
    with pytest.raises(PlanError, match="belongs to another plan"):
        make_llm(tiny_model_dir, plan=str(tmp_path / "plan.json"))


def test_healing_keeps_the_weights_of_its_best_validation_step(tiny_model_dir):
    from trident.engine.model import LlamaModel
    from trident.engine.calibration.heal import autocast_dtype, heal, held_out_kl, layer_tensors

    ckpt = load_checkpoint(str(tiny_model_dir))
    cfg, plan = ckpt.config, tiny_plan(ckpt.config)
    build = lambda state: LlamaModel.from_hf_state_dict(cfg, state, 64, torch.float32, torch.device("cpu"))
    teacher, start = build(ckpt.state_dict), build(apply_plan(ckpt.state_dict, cfg, plan))
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, cfg.vocab_size, (32, 16), generator=g).tolist()
    val = torch.randint(0, cfg.vocab_size, (4, 16), generator=g).tolist()
    amp = autocast_dtype(torch.device("cpu"))

    def val_kl(model):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            return held_out_kl(teacher, model, torch.tensor(val))

    # A sane run: measured at 0, every 5 steps and at the end; the kept weights score the minimum.
    student = build(apply_plan(ckpt.state_dict, cfg, plan))
    run = heal(teacher, student, windows, steps=12, lr=5e-4, batch_size=4, val_windows=val, eval_every=5)
    assert [s for s, _ in run["val"]] == [0, 5, 10, 12] and len(run["losses"]) == 12
    best = min(run["val"], key=lambda p: p[1])
    assert run["best_step"] == best[0] and val_kl(student) == pytest.approx(best[1], rel=1e-6)
    assert best[1] < run["val"][0][1]
    # A diverging run (absurd learning rate) falls back to the starting weights exactly.
    student = build(apply_plan(ckpt.state_dict, cfg, plan))
    run = heal(teacher, student, windows, steps=6, lr=50.0, batch_size=4, val_windows=val, eval_every=3)
    assert run["best_step"] == 0 and not any(kl <= run["val"][0][1] for _, kl in run["val"][1:])   # worse or NaN
    before = layer_tensors(start)
    assert all(torch.equal(v, before[k]) for k, v in layer_tensors(student).items())
    with pytest.raises(ValueError, match="same length"):
        heal(teacher, student, windows, steps=2, val_windows=[w[:8] for w in val])


def test_calibrate_rejects_bad_heal_budgets(tmp_path, capsys):
    from trident.engine.calibration.calibrate import calibrate
    from trident.server.cli import main

    (tmp_path / "text.txt").write_text("some text")
    for bad in (["--heal-budgets", "0.2,lots", "--heal-steps", "5"], ["--heal-budgets", "", "--heal-steps", "5"],
                ["--heal-budgets", "0.2"]):
        assert main(["calibrate", "--data", str(tmp_path / "text.txt"), *bad]) == 2
        assert "--heal-budgets must be numbers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not among the width budgets"):
        calibrate("unused", tmp_path / "text.txt", heal_steps=1, heal_budgets=(0.33,))
    with pytest.raises(ValueError, match="must each fill at least one window"):
        calibrate("unused", tmp_path / "text.txt", num_tokens=100)
    with pytest.raises(ValueError, match="heal steps must be >= 0"):
        calibrate("unused", tmp_path / "text.txt", heal_steps=-1)
    with pytest.raises(ValueError, match="learning rate must be a positive number"):
        calibrate("unused", tmp_path / "text.txt", heal_steps=1, heal_lr=-1.0)
    with pytest.raises(ValueError, match="is not a file"):
        calibrate("unused", tmp_path, num_tokens=512)
    assert main(["calibrate", "--data", str(tmp_path)]) == 2 and "no such file" in capsys.readouterr().err


def test_calibrate_checks_its_text_and_output_folder_before_the_statistics(tmp_path, tiny_model_dir, capsys):
    from trident.server.cli import main

    text = tmp_path / "text.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 60))
    args = ["calibrate", "--model", str(tiny_model_dir), "--data", str(text), "--eval-tokens", "512"]
    # Too short for calibration and held-out text apart: the held-out end would overlap the rest.
    assert main([*args, "--tokens", "100000", "--out", str(tmp_path / "out")]) == 2
    assert "fewer than 100000 calibration + 512" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main([*args, "--tokens", "512", "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert "cannot write plans to" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_least_squares_refit_matches_a_direct_solve_and_beats_the_mean_bias():
    from trident.engine.calibration.reconstruct import refit_columns

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=g, dtype=torch.float64)
    x = torch.randn(4000, 12, generator=g, dtype=torch.float64) @ mix + 0.5     # correlated, non-zero mean
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    gram, mean = x.T @ x / len(x), x.mean(0)
    kept = [0, 2, 3, 7, 8, 11]
    refit, bias = refit_columns(w, gram, mean, kept, damping=0.0)
    # The same fit by an independent solver on the samples themselves.
    design = torch.cat([x[:, kept], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    direct = torch.linalg.lstsq(design, x @ w.T).solution.T
    torch.testing.assert_close(refit, direct[:, :-1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(bias, direct[:, -1], rtol=1e-6, atol=1e-8)
    dropped = [i for i in range(12) if i not in kept]
    mean_bias = w[:, dropped] @ mean[dropped]
    error = lambda wk, b: (x @ w.T - x[:, kept] @ wk.T - b).pow(2).mean().item()
    assert error(refit, bias) < 0.9 * error(w[:, kept], mean_bias)      # 60 vs 90 here
    # Damping pulls toward the original columns; keeping every column changes nothing.
    far, _ = refit_columns(w, gram, mean, kept, damping=1e6)
    torch.testing.assert_close(far, w[:, kept], rtol=0, atol=1e-4)
    same, zero = refit_columns(w, gram, mean, list(range(12)), damping=0.0)
    torch.testing.assert_close(same, w, rtol=0, atol=1e-8)
    torch.testing.assert_close(zero, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="do not fit"):
        refit_columns(w, gram[:6, :6], mean, kept)


def test_bias_only_compensation_writes_plans_without_weights(tmp_path, tiny_model_dir):
    from trident.engine.calibration.calibrate import calibrate

    (tmp_path / "text.txt").write_text(" ".join(["Once upon a time there was a dragon."] * 120))
    report = calibrate(str(tiny_model_dir), tmp_path / "text.txt", num_tokens=128, eval_tokens=64, window=64,
                       out_dir=tmp_path / "bias", compensation="bias")
    half = PruningPlan.load(tmp_path / "bias" / "width-0.50.json")
    assert half.weights is None and half.layers[0].ffn_bias is not None
    # Width plans carry only biases; the depth plans refit by least squares (their own setting).
    assert not list((tmp_path / "bias").glob("width-*.safetensors"))
    assert all(p["compensation"] == "bias" for p in report["sweep"][1:])
    with pytest.raises(ValueError, match="compensation must be one of"):
        calibrate(str(tiny_model_dir), tmp_path / "text.txt", compensation="magic")


def test_group_head_unit_drops_whole_kv_groups_by_summed_scores():
    from trident.engine.calibration.width import _global_keep_groups

    # Two layers of 4 query heads in 2 groups. Layer 0's lowest single head (0) sits in its
    # strongest group; the groups' summed standardized scores pick group 1 instead.
    scores = [[0.0, 9.0, 4.0, 4.5], [5.0, 6.0, 6.0, 5.0]]
    # 0.5 of 8 heads is the attention weight of 4 * 2 / (2 * 2 + 2) = 1.33 -> 1 group.
    assert _global_keep_groups(scores, 0.5, group=2) == [[0, 1], [0, 1, 2, 3]]
    # Every layer keeps a group, however large the budget.
    assert _global_keep_groups(scores, 1.0, group=2) == [[0, 1], [2, 3]]
    assert _global_keep_groups(scores, 0.0, group=2) == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_calibration_with_group_head_unit_keeps_groups_equal_and_shrinks_the_kv_cache(tmp_path, tiny_model_dir):
    from trident.engine.calibration.calibrate import calibrate

    (tmp_path / "text.txt").write_text(" ".join(["Once upon a time there was a dragon."] * 120))
    report = calibrate(str(tiny_model_dir), tmp_path / "text.txt", num_tokens=128, eval_tokens=64, window=64,
                       out_dir=tmp_path / "groups", head_unit="group")
    assert all(p["head_unit"] == "group" for p in report["sweep"][1:])
    ckpt = load_checkpoint(str(tiny_model_dir))
    half = PruningPlan.load(tmp_path / "groups" / "width-0.50.json")
    kv = [half.kv_heads_of(i, ckpt.config) for i in range(len(half.layers))]
    assert sum(len(k) for k in kv) == 8 - 3            # round(0.5 * 16 * 2 / 6) groups of 8 go
    for layer, kept_kv in zip(half.layers, kv):
        assert sorted(layer.kept_q_heads or range(4)) == [2 * g + j for g in kept_kv for j in range(2)]
    state = apply_plan(ckpt.state_dict, ckpt.config, half)
    assert not [k for k in state if k.endswith("virtual_q_heads")]
    llm = make_llm(tiny_model_dir, str(tmp_path / "groups" / "width-0.50.json"))
    caches = llm.engine.runner.kv_caches
    assert [c[0].shape[1] for c in caches] == [len(k) for k in kv]
    assert llm.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="head unit must be one of"):
        calibrate(str(tiny_model_dir), tmp_path / "text.txt", head_unit="layer")
