"""Static depth: Block-Influence ranking, layer-drop plans against models rebuilt without the
layers, least-squares compensation, calibration's depth sweep, and plans that drop layers and
prune width at once."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from trident.engine.loader import load_checkpoint
from trident.engine.pruning.apply import apply_plan
from trident.engine.calibration.statistics import RunningMoments, collect_stats, importance
from trident.engine.calibration.depth import (RunMoments, budgets_for, collect_run_moments, depth_plan, dropped_runs,
                                          rank_layers, refit_down_proj, sweep_runs)
from trident.engine.pruning.plan import ExitPoint, LayerPlan, PlanError, PruningPlan
from trident.engine.sampling_params import SamplingParams
from tests.test_pruning import PROMPTS, make_llm, tiny_plan

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)


def without_layers(src, dst, drop: set[int], state: dict | None = None):
    """A copy of the HF folder `src` whose checkpoint lacks layers `drop`, the rest renumbered 0..n-1
    (`state`: the tensors to write, default `src`'s own)."""
    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors")) if state is None else state
    config = json.loads((src / "config.json").read_text())
    kept = [i for i in range(config["num_hidden_layers"]) if i not in drop]
    out = {}
    for name, tensor in state.items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if match is None:
            out[name] = tensor
        elif int(match.group(1)) in kept:
            out[f"model.layers.{kept.index(int(match.group(1)))}.{match.group(2)}"] = tensor.contiguous()
    save_file(out, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps({**config, "num_hidden_layers": len(kept)}))
    return dst


def chosen_logprobs(out):
    return [lp[t] for lp, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]


def test_block_influence_ranking_drops_the_lowest_bi_layers(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    imp = {"layers": [{"block_influence": bi} for bi in (0.30, 0.05, 0.20, 0.05)]}
    assert rank_layers(imp) == [1, 3, 2, 0]                        # ties keep layer order
    for n, dropped in ((1, [1]), (2, [1, 3]), (3, [1, 2, 3])):
        plan, tensors, runs = depth_plan(imp, llm, n, f"depth-{n}", compensation="none")
        assert [i for i, layer in enumerate(plan.layers) if not layer.keep] == dropped
        assert tensors == {} and all(layer.ffn_bias is None for layer in plan.layers)
    assert dropped_runs([1, 2, 3]) == [(0, [1, 2, 3])]
    assert dropped_runs([0, 1, 3]) == [(None, [0, 1]), (2, [3])]
    assert budgets_for(4) == [1, 2, 3] and budgets_for(30) == [1, 2, 3, 4, 6, 8]
    with pytest.raises(ValueError, match="can drop 1..3 of 4 layers"):
        depth_plan(imp, llm, 4, "all", compensation="none")
    with pytest.raises(ValueError, match="needs the calibration moments"):
        depth_plan(imp, llm, 1, "x", compensation="bias")


@pytest.mark.parametrize("drop", [{3}, {1, 2}, {0, 2}])
def test_layer_drop_plan_equals_a_model_rebuilt_without_those_layers(drop, tmp_path, tiny_model_dir):
    config = load_checkpoint(str(tiny_model_dir)).config
    plan = PruningPlan.dense(config)
    for i in drop:
        plan.layers[i].keep = False
    plan.save(tmp_path / "plan.json")
    pruned = make_llm(tiny_model_dir, plan=str(tmp_path / "plan.json"))
    rebuilt = make_llm(without_layers(tiny_model_dir, tmp_path / "rebuilt", drop))
    assert [l.spec.index for l in pruned.engine.model.layers] == [i for i in range(4) if i not in drop]
    for prompt in PROMPTS:
        ids = pruned.tokenizer.encode(prompt)
        assert pruned.prompt_logprobs(ids) == rebuilt.prompt_logprobs(ids)          # the same math, bit for bit
    for a, b in zip(pruned.generate(PROMPTS, GREEDY), rebuilt.generate(PROMPTS, GREEDY)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert chosen_logprobs(a) == chosen_logprobs(b)
    assert pruned.generate(PROMPTS[:1], GREEDY)[0].pruning["saved_fraction"]["depth"] > 0


def test_layer_drop_plan_equals_transformers_without_those_layers(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    config = load_checkpoint(str(tiny_model_dir)).config
    plan = PruningPlan.dense(config)
    plan.layers[1].keep = plan.layers[2].keep = False
    plan.save(tmp_path / "plan.json")
    pruned = make_llm(tiny_model_dir, plan=str(tmp_path / "plan.json"))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    hf.model.layers = torch.nn.ModuleList([hf.model.layers[0], hf.model.layers[3]])
    for i, layer in enumerate(hf.model.layers):
        layer.self_attn.layer_idx = i                              # the KV cache is indexed by position
    hf.config.num_hidden_layers = 2
    for prompt in PROMPTS:
        ids = pruned.tokenizer.encode(prompt)
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, :-1].float()
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(pruned.prompt_logprobs(ids)), expected, atol=1e-4, rtol=1e-4)


def moments_of(x: torch.Tensor) -> RunningMoments:
    m = RunningMoments()
    m.add(x)
    return m


def test_least_squares_refit_absorbs_a_linear_contribution_and_beats_the_mean():
    g = torch.Generator().manual_seed(0)
    hidden, inter, tokens = 8, 12, 4000
    w = torch.randn(hidden, inter, generator=g, dtype=torch.float64)
    h = torch.randn(tokens, inter, generator=g, dtype=torch.float64) + 0.5
    a, c = 0.3 * torch.randn(hidden, inter, generator=g, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64,
                                                                                          generator=g)
    noise = 0.1 * torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    delta = h @ a.T + c + noise                                    # what the dropped run added
    run = RunMoments()
    for part_d, part_h in zip(delta.split(1000), h.split(1000)):  # sums over several windows
        run.add(part_d, part_h)
    ffn_in = moments_of(h)
    refit, bias = refit_down_proj(w, ffn_in, run, damping=1e-8)
    torch.testing.assert_close(refit, w + a, atol=0.02, rtol=0)
    torch.testing.assert_close(bias, c, atol=0.03, rtol=0)
    # The unexplained share from moments equals a direct computation on the tokens (RunningMoments
    # forms its products in float32).
    direct = lambda wp, b: ((h @ (w - wp).T + delta - b).pow(2).sum() / delta.pow(2).sum()).item()
    mean = delta.mean(0)
    assert run.unexplained(w, ffn_in, None, mean) == pytest.approx(direct(w, mean), rel=1e-5)
    assert run.unexplained(w, ffn_in, refit, bias) == pytest.approx(direct(refit, bias), rel=1e-5)
    assert run.unexplained(w, ffn_in, refit, bias) < 0.1 * run.unexplained(w, ffn_in, None, mean) < 0.1
    # Heavy damping pulls the weight back to W, leaving the best bias: the mean.
    refit, bias = refit_down_proj(w, ffn_in, run, damping=1e9)
    torch.testing.assert_close(refit, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(bias, mean, atol=1e-4, rtol=0)


def test_calibrate_writes_depth_plans(tmp_path, tiny_model_dir, capsys):
    from trident.engine.calibration.calibrate import calibrate
    from trident.server.cli import main

    text = " ".join(["The quick brown fox jumps over the lazy dog. Once upon a time there was a dragon."] * 60)
    (tmp_path / "text.txt").write_text(text)
    out = tmp_path / "out"
    report = calibrate(str(tiny_model_dir), tmp_path / "text.txt", num_tokens=256, eval_tokens=128, window=64,
                       out_dir=out, heal_steps=2, heal_budgets=(0.5,), heal_depths=(2,))
    order = report["layer_order"]
    bi = [layer["block_influence"] for layer in json.loads((out / "importance.json").read_text())["layers"]]
    assert sorted(bi[i] for i in order) == [bi[i] for i in order]
    assert [p["plan"] for p in report["depth_sweep"]] == ["depth-1", "depth-2", "depth-3"]
    for point in report["depth_sweep"]:
        n = point["layers_dropped"]
        plan = PruningPlan.load(out / f"depth-{n}.json")
        assert [i for i, l in enumerate(plan.layers) if not l.keep] == sorted(order[:n]) == point["dropped"]
        assert plan.weights == f"depth-{n}.safetensors" and point["perplexity"] > 0
        for run in point["runs"]:
            k = run["compensated_by"]
            if k is None:
                assert run["layers"][0] == 0
                continue
            assert k == run["layers"][0] - 1 and plan.layers[k].ffn_bias is not None
            share = run["unexplained"]
            assert share["least-squares"] <= share["bias"] <= share["none"] == 1.0
            if "healing" not in point:
                assert set(load_file(str(out / plan.weights))) >= {f"model.layers.{k}.mlp.down_proj.weight"}
    assert [p["plan"] for p in report["depth_sweep"] if "healing" in p] == ["depth-2"]
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["depth_sweep"] == json.loads(json.dumps(report["depth_sweep"]))

    # Mean compensation gives the kept layer before a run the run's mean as its bias and no weights;
    # "none" neither.
    llm = make_llm(tiny_model_dir)
    windows = [llm.tokenizer.encode(text)[i:i + 64] for i in (0, 64)]
    stats = collect_stats(llm, windows)
    imp = importance(llm, stats)
    depth_stats = collect_run_moments(llm, windows, sweep_runs(rank_layers(imp), [1, 2, 3]))
    ffn_in = [st.ffn_in for st in stats]
    for n in (1, 2, 3):
        plan, tensors, runs = depth_plan(imp, llm, n, "b", "bias", ffn_in, depth_stats)
        assert tensors == {}
        for k, run in dropped_runs(sorted(rank_layers(imp)[:n])):
            if k is not None:
                moments = depth_stats.runs[(k, run[0], run[-1])]
                assert plan.layers[k].ffn_bias == (moments.delta / moments.count).tolist()
        plan, tensors, _ = depth_plan(imp, llm, n, "n", "none", ffn_in, depth_stats)
        assert tensors == {} and all(l.ffn_bias is None for l in plan.layers)

    with pytest.raises(ValueError, match="heal depths \\[5\\] are not among"):
        calibrate("unused", tmp_path / "text.txt", heal_steps=1, heal_depths=(5,))
    with pytest.raises(ValueError, match="depth compensation must be one of"):
        calibrate("unused", tmp_path / "text.txt", depth_compensation="mean")
    for bad in (["--heal-depths", "2,x", "--heal-steps", "5"], ["--heal-depths", "2"]):
        assert main(["calibrate", "--data", str(tmp_path / "text.txt"), *bad]) == 2
        assert "--heal-depths must be layer counts" in capsys.readouterr().err


def test_a_plan_that_drops_layers_and_prunes_width_loads_runs_and_equals_its_reference(tmp_path, tiny_model_dir):
    """Width on layers 0-2 (ragged heads, a dropped KV group, channels, biases, a refit weight)
    and layer 3 dropped equals the dense checkpoint with the removed heads' and channels' weights
    zeroed, the biases and the weight written in, and layer 3 taken out."""
    ckpt = load_checkpoint(str(tiny_model_dir))
    cfg, d = ckpt.config, ckpt.config.head_dim
    plan = tiny_plan(cfg)
    plan.layers[3].keep = False
    refit = 0.05 * torch.randn(cfg.hidden_size, cfg.intermediate_size, generator=torch.Generator().manual_seed(1))
    save_file({"model.layers.1.mlp.down_proj.weight": refit}, str(tmp_path / "plan.safetensors"))
    plan.weights = "plan.safetensors"
    plan.save(tmp_path / "plan.json")

    state = load_file(str(tiny_model_dir / "model.safetensors"))
    for i, layer in enumerate(plan.layers[:3]):
        p = f"model.layers.{i}."
        for h in set(range(cfg.num_heads)) - set(layer.kept_q_heads or range(cfg.num_heads)):
            state[p + "self_attn.o_proj.weight"][:, h * d:(h + 1) * d] = 0
        drop = sorted(set(range(cfg.intermediate_size)) - set(layer.kept_ffn_channels or range(cfg.intermediate_size)))
        state[p + "mlp.down_proj.weight"][:, drop] = 0
        for name, bias in (("self_attn.o_proj.bias", layer.attn_bias), ("mlp.down_proj.bias", layer.ffn_bias)):
            if bias is not None:
                state[p + name] = torch.tensor(bias)
    state["model.layers.1.mlp.down_proj.weight"] = refit
    reference = make_llm(without_layers(tiny_model_dir, tmp_path / "reference", {3}, state))
    pruned = make_llm(tiny_model_dir, plan=str(tmp_path / "plan.json"))
    assert [l.self_attn.num_heads for l in pruned.engine.model.layers] == [3, 2, 4]
    for prompt in PROMPTS:
        ids = pruned.tokenizer.encode(prompt)
        torch.testing.assert_close(torch.tensor(pruned.prompt_logprobs(ids)),
                                   torch.tensor(reference.prompt_logprobs(ids)), atol=1e-5, rtol=1e-5)
    outs = pruned.generate(PROMPTS, GREEDY)
    for a, b in zip(outs, reference.generate(PROMPTS, GREEDY)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(chosen_logprobs(a)), torch.tensor(chosen_logprobs(b)),
                                   atol=1e-5, rtol=1e-5)
    saved = outs[0].pruning["saved_fraction"]
    assert saved["depth"] > 0 and saved["width"] > 0

    # A weights file or plan fields for the dropped layer are refused, not ignored.
    save_file({"model.layers.3.mlp.down_proj.weight": refit}, str(tmp_path / "plan.safetensors"))
    with pytest.raises(PlanError, match="'model.layers.3.mlp.down_proj.weight' is not in the pruned model"):
        apply_plan(ckpt.state_dict, cfg, PruningPlan.load(tmp_path / "plan.json"))
    for field, value in (("kept_ffn_channels", [0, 1]), ("ffn_bias", [0.0] * cfg.hidden_size),
                         ("exit", ExitPoint(threshold=0.5))):
        bad = tiny_plan(cfg)
        bad.layers[3] = LayerPlan(keep=False, **{field: value})
        with pytest.raises(PlanError, match=f"layer 3 is dropped \\(keep: false\\) but sets '{field}'"):
            bad.validate(cfg)
