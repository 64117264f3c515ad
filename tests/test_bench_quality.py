"""Quality arithmetic without a server: agreement, perplexity windows, Pareto fronts, sweep parsing."""
import pytest

from trident.bench.agreement import GreedyOutput, compare_outputs, prefix_agreement
from trident.bench.pareto import SweepPoint, markdown_table, pareto_front, plot_sweep, speed_ppl_front
from trident.bench.perplexity import window_nll, word_windows
from trident.bench.quality import parse_sweep


def test_prefix_agreement():
    assert prefix_agreement(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == 0.5   # diverges at position 2
    assert prefix_agreement(["a", "b"], ["a", "b", "c", "d"]) == 0.5             # shorter: the longer counts
    assert prefix_agreement(["a"], ["a"]) == 1.0
    assert prefix_agreement([], []) == 1.0
    assert prefix_agreement(["x"], []) == 0.0


def test_compare_outputs():
    ref = [GreedyOutput("p1", ["a", "b"], "ab", "tokens"), GreedyOutput("p2", ["c", "d"], "cd", "tokens")]
    run = [GreedyOutput("p1", ["a", "b"], "ab", "tokens"), GreedyOutput("p2", ["c", "e"], "ce", "tokens")]
    result = compare_outputs(ref, run)
    assert result.per_prompt == [1.0, 0.5]
    assert (result.mean_prefix_agreement, result.exact_match_rate, result.unit) == (0.75, 0.5, "tokens")
    # one side without token logprobs: both compared per character
    chars = compare_outputs(ref, [GreedyOutput("p1", list("ab"), "ab", "chars"), GreedyOutput("p2", list("cx"), "cx", "chars")])
    assert chars.unit == "chars" and chars.per_prompt == [1.0, 0.5]
    with pytest.raises(ValueError, match="prompt mismatch"):
        compare_outputs(ref, list(reversed(run)))
    with pytest.raises(ValueError, match="outputs"):
        compare_outputs(ref, run[:1])


def test_window_nll_skips_the_first_token():
    assert window_nll([None, -1.0, -0.5]) == (1.5, 2)
    with pytest.raises(RuntimeError, match="null logprob"):
        window_nll([None, None, -1.0])
    windows = word_windows("one two three four five six seven", window=4, num_windows=2)
    assert windows == ["two three four", "five six seven"]          # the end of the text, as token windows


def _point(label, speed, ppl, agreement=None):
    return SweepPoint(label, "http://x", {}, ppl, agreement, None, speed, 1.0, 10.0, 20.0, 0, {})


def test_pareto_front():
    # (speed up, ppl down): B is dominated by A (slower and worse); C is fastest; D ties A exactly
    points = [(10.0, 5.0), (9.0, 6.0), (20.0, 8.0), (10.0, 5.0)]
    assert pareto_front(points, (True, False)) == [True, False, True, True]
    assert pareto_front([(1.0, 1.0), (2.0, 2.0)], (True, True)) == [False, True]
    sweep = [_point("dense", 10, 5.0), _point("balanced", 15, 5.5), _point("bad", 12, 9.0), _point("noppl", 99, None)]
    assert speed_ppl_front(sweep) == [True, True, False, False]


def test_table_and_plot(tmp_path):
    sweep = [_point("dense", 10, 5.0, 1.0), _point("balanced", 15, 5.5, 0.8)]
    table = markdown_table(sweep)
    assert "| dense | 5.000 | 1.000 | - | 10.00 |" in table and table.count("| * |") == 2
    plot_sweep(sweep, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_parse_sweep():
    points = parse_sweep(['dense={"pruning": "dense"}', "b=http://127.0.0.1:9000"], "http://base")
    assert points == [("dense", "http://base", {"pruning": "dense"}), ("b", "http://127.0.0.1:9000", {})]
    for bad in (["nolabel"], ["x=dense"], ["x={bad json}"], ["x={}", "x={}"], ["x=[1]"]):
        with pytest.raises(ValueError):
            parse_sweep(bad, "http://base")


def test_lockstep_speed_of_one_engine_times_prefill_and_decode_steps_directly(tiny_model_dir, monkeypatch):
    from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from trident.engine.llm import LLM
    import trident.engine.calibration.timing as sweep

    def make(prefix_caching=False):
        return LLM(EngineConfig(model=str(tiny_model_dir), dtype="float32",
                                cache=CacheConfig(num_blocks=64, enable_prefix_caching=prefix_caching),
                                scheduler=SchedulerConfig(max_model_len=48, max_num_batched_tokens=16)))

    llm = make()
    # A clock that advances one second per engine step, so the rates count tokens per step.
    clock = {"now": 0.0}
    real_step = llm.engine.step

    def step():
        clock["now"] += 1.0
        return real_step()

    monkeypatch.setattr(llm.engine, "step", step)
    monkeypatch.setattr(sweep.time, "perf_counter", lambda: clock["now"])
    prompts = [list(range(3, 13)), list(range(20, 30)), list(range(40, 50))]   # 30 tokens, 16 per step
    ((prefill, decode),) = sweep.lockstep_speed([llm], [prompts], decode_tokens=4)
    # Two chunked prefill steps give every sequence its first token (sequence 0's second token
    # rides along in step 2 and is not counted); then 4 decode steps of the whole batch, 3 tokens
    # each, and the batch is aborted.
    assert prefill == 30 / 2
    assert decode == 12 / 4
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="finished before its 40 decode steps"):
        sweep.lockstep_speed([llm], [prompts], decode_tokens=40, warm_up=False)     # 10 + 40 > 48 tokens of room
    with pytest.raises(ValueError, match="prefix caching"):
        sweep.lockstep_speed([make(prefix_caching=True)], [prompts], decode_tokens=4)


def test_decode_breakdown_groups_ops_and_profiles_only_decode_steps(tiny_model_dir):
    import argparse

    from trident.bench.decode_breakdown import GROUPS, breakdown, group_of

    vocab = 300
    assert group_of("aten::mm", [[8, 64], [64, vocab]], vocab) == "LM head"
    assert group_of("aten::addmm", [[64], [8, 96], [96, 64]], vocab) == "layer matmuls"
    assert group_of("aten::index_select", [[1024, 2, 16], [], [136]], vocab) == "KV gather"
    assert group_of("aten::index_select", [[vocab, 64], [], [8]], vocab) == "other"     # embedding rows
    assert group_of("aten::_scaled_dot_product_flash_attention_for_cpu", [], vocab) == "attention"
    assert group_of("aten::index_copy_", [], vocab) == "KV write"

    args = argparse.Namespace(dtype="float32", window=16, max_tokens=4, decode_tokens=4)
    prompts = [list(range(3, 19)), list(range(20, 36))]
    result = breakdown(str(tiny_model_dir), None, lambda tok: prompts, args)
    assert set(result["profiled_ms"]) == set(GROUPS)
    for group in ("layer matmuls", "LM head", "KV gather", "attention", "KV write"):
        assert result["profiled_ms"][group] > 0, group
    assert result["step_ms"] > 0

    # Only decode steps run under the profiler: every sequence has its first token (sampled by the
    # prefill) when one starts, and there is one per decode token (batch_params asks decode_tokens + 1).
    import contextlib

    from trident.bench import decode_breakdown
    from trident.engine.llm import LLM
    from trident.engine.config import CacheConfig, EngineConfig

    llm = LLM(EngineConfig(model=str(tiny_model_dir), dtype="float32", cache=CacheConfig(num_blocks=64)))
    seen: list[bool] = []

    class Spy(contextlib.AbstractContextManager):
        def __init__(self, *a, **k):
            seen.append(all(seq.num_output_tokens > 0 for req in llm.engine.requests.values() for seq in req.seqs))

        def __exit__(self, *exc):
            return None

        def key_averages(self, **kwargs):
            return []

    original = decode_breakdown.profile
    decode_breakdown.profile = Spy
    try:
        decode_breakdown.decode_steps(llm, prompts, 4, profiled=True)
    finally:
        decode_breakdown.profile = original
    assert seen == [True] * 4


def test_cpu_linear_times_every_provider_and_the_engine_under_each_gemm_setting(tiny_model_dir, tmp_path,
                                                                                 monkeypatch, dispatch):
    import json

    from trident.bench import cpu_linear

    monkeypatch.setenv("TRIDENT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "linear.json"
    assert cpu_linear.main(["--hidden", "16", "--ffn", "24", "--q-size", "16", "--kv-size", "8",
                            "--vocab", "40", "--layers", "2", "--rows", "1,9", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert [r["rows"] for r in results] == [1, 9] and report["weight_bytes"] == 4 * (2 * (32 * 16 + 16 * 16 + 48 * 16 + 16 * 24) + 40 * 16)
    assert all(r["gb_s"][r["chosen"]] == max(r["gb_s"].values()) > 0 for r in results)
    assert [("torch-wm-pad" in r["gb_s"]) for r in results] == [True, False]   # padding: 1 row only
    with pytest.raises(SystemExit):
        cpu_linear.main(["--rows", "0"])

    # Which setting served each timed run: a spy on decode_steps reads the dispatch's state.
    from trident.bench import decode_breakdown
    real_steps, seen = decode_breakdown.decode_steps, []

    def spying_steps(llm, prompts, tokens, profiled):
        seen.append((len(prompts), dispatch.pinned or "auto", tokens))
        return real_steps(llm, prompts, tokens, profiled)

    monkeypatch.setattr(decode_breakdown, "decode_steps", spying_steps)
    out = tmp_path / "engine.json"
    assert cpu_linear.main(["--engine", "--model", str(tiny_model_dir), "--window", "16", "--decode-tokens",
                            "3", "--rounds", "2", "--batches", "1,2", "--json", str(out)]) == 0
    timed = [(batch, setting) for batch, setting, tokens in seen if tokens == 3]
    assert sorted(timed) == sorted((b, s) for b in (1, 2) for s in cpu_linear.ENGINE_SETTINGS for _ in range(2))
    report = json.loads(out.read_text())
    assert [(r["plan"], r["batch"]) for r in report["results"]] == [("dense", 1), ("dense", 2)]
    assert all(set(r["ms_per_step"]) == set(cpu_linear.ENGINE_SETTINGS) for r in report["results"])
    assert {c["rows"] for c in report["measured_dispatch"]["choices"]} == {1, 2}
    with pytest.raises(SystemExit, match="no plan"):
        cpu_linear.main(["--engine", "--model", str(tiny_model_dir), "--plans", "width-0.99"])


def test_lockstep_speed_steps_the_engines_in_turns_and_times_each_ones_own_steps(tiny_model_dir, monkeypatch):
    from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from trident.engine.llm import LLM
    import trident.engine.calibration.timing as sweep

    def make():
        return LLM(EngineConfig(model=str(tiny_model_dir), dtype="float32",
                                cache=CacheConfig(num_blocks=64, enable_prefix_caching=False),
                                scheduler=SchedulerConfig(max_model_len=128, max_num_batched_tokens=16)))

    # Engine "a" takes one second a step and "b" three, on a clock that only steps advance.
    clock, order, timed = {"now": 0.0}, [], {"on": False}
    llms = [make(), make()]
    for name, llm, cost in (("a", llms[0], 1.0), ("b", llms[1], 3.0)):
        real_step = llm.engine.step

        def step(name=name, cost=cost, real_step=real_step):
            clock["now"] += cost
            if timed["on"]:
                order.append(name)
            return real_step()

        monkeypatch.setattr(llm.engine, "step", step)
    monkeypatch.setattr(sweep.time, "perf_counter", lambda: clock["now"])
    real_add = sweep.add_batch

    def add_batch(*a, **k):
        timed["on"] = True          # the warm-ups are done
        return real_add(*a, **k)

    monkeypatch.setattr(sweep, "add_batch", add_batch)
    long = [list(range(3, 13)), list(range(20, 30)), list(range(40, 50))]      # 30 tokens, 2 prefill steps
    short = [list(range(3, 9))]                                                # 6 tokens, 1 prefill step
    (a_prefill, a_decode), (b_prefill, b_decode) = sweep.lockstep_speed(llms, [long, short], 4, first=1)
    # "a": two chunked prefill steps give every sequence its first token, then 4 decode steps of
    # 3 tokens each. "b": one prefill step, then 4 decode steps of one token each.
    assert (a_prefill, a_decode) == (30 / 2, 12 / 4)
    assert (b_prefill, b_decode) == (6 / 3, 4 / 12)
    # Turn k starts at engine (1 + k) % 2; an engine done with its timed steps gives up its turn.
    assert order == ["b", "a", "a", "b", "b", "a", "a", "b", "b", "a", "a"]
    assert not any(llm.engine.has_unfinished_requests() for llm in llms)
    with pytest.raises(ValueError, match="prefix caching"):
        sweep.lockstep_speed([llms[0], LLM(EngineConfig(model=str(tiny_model_dir), dtype="float32",
                                                         cache=CacheConfig(num_blocks=64)))], [long, long], 4)


def test_interleaved_speed_loads_every_plan_once_and_pairs_the_rounds(monkeypatch):
    import argparse

    from trident.bench import width_sweep as sweep

    loaded, calls = [], []

    class FakeLLM:
        tokenizer = None

    def fake_engine_for(model, plan, args, timing=False):
        assert timing
        loaded.append(plan)
        return FakeLLM()

    monkeypatch.setattr(sweep, "engine_for", fake_engine_for)

    def fake_lockstep(llms, prompts, decode_tokens, first):
        # Round r (counted from 1) rates plan i's batch at prefill 100 r + i and decode 10 r + i,
        # and its single sequence at r + i.
        calls.append((len(llms), decode_tokens, first))
        r = (len(calls) + 1) // 2
        if decode_tokens == 2:
            assert prompts == [[list(range(8))] * 3] * 3
            return [(100.0 * r + i, 10.0 * r + i) for i in range(3)]
        assert decode_tokens == 5 and prompts == [[[0, 1, 2, 3]]] * 3
        return [(0.0, 1.0 * r + i) for i in range(3)]

    monkeypatch.setattr(sweep, "lockstep_speed", fake_lockstep)
    plans = [("dense", None), ("a", "a.json"), ("b", "b.json")]
    args = argparse.Namespace(repeats=3, decode_tokens=2, single_prompt=4, single_decode_tokens=5)
    result = sweep.interleaved_speed("m", plans, lambda tok: [list(range(8))] * 3, args)
    assert loaded == [None, "a.json", "b.json"]
    assert calls == [(3, 2, 0), (3, 5, 0), (3, 2, 1), (3, 5, 1), (3, 2, 2), (3, 5, 2)]
    assert result["dense"]["decode_rounds"] == [10.0, 20.0, 30.0]
    assert result["a"]["prefill_rounds"] == [101.0, 201.0, 301.0]
    assert result["b"]["single_decode_rounds"] == [3.0, 4.0, 5.0]
    assert result["b"]["decode_tok_s"] == 22.0 and result["b"]["prefill_tok_s"] == 202.0
    # Paired: the median of the per-round ratios, not the ratio of the medians.
    assert sweep.paired_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 4.0]) == 2.0
    with pytest.raises(ValueError):
        sweep.paired_ratio([1.0], [1.0, 2.0])


def test_width_sweep_writes_batch_and_single_sequence_figures(tiny_model_dir, tmp_path, capsys):
    import json
    import shutil

    from trident.bench import width_sweep as sweep
    from trident.engine.calibration.calibrate import calibrate

    data = tmp_path / "data"
    data.mkdir()
    (data / "wikitext2-valid.txt").write_text(" ".join(["Once upon a time there was a dragon who slept."] * 200))
    (data / "alpaca-seed-tasks.jsonl").write_text("\n".join(json.dumps({"instruction": f"Tell story {i}."})
                                                            for i in range(3)))
    calibrate(str(tiny_model_dir), data / "wikitext2-valid.txt", num_tokens=128, eval_tokens=64, window=64,
              out_dir=tmp_path / "calib", compensation="bias")
    plans = tmp_path / "plans"
    plans.mkdir()
    shutil.copy(tmp_path / "calib" / "width-0.50.json", plans)
    (plans / "calibration.json").write_text(json.dumps({"sweep": [{"plan": "width-0.50", "healing": {"steps": 7}}]}))
    out = tmp_path / "out"
    common = ["--model", str(tiny_model_dir), "--plans-dir", str(plans), "--data-dir", str(data),
              "--dtype", "float32", "--eval-tokens", "64", "--window", "16", "--num-prompts", "2", "--max-tokens", "4",
              "--speed-batch", "2", "--decode-tokens", "3", "--repeats", "1", "--output-dir", str(out)]
    other = str(tmp_path / "calib" / "width-0.50.json")
    assert sweep.main(common + ["--plans", f"width-0.50,{other}", "--single-prompt", "8",
                                "--single-decode-tokens", "5"]) == 0
    points = json.loads((out / "width_sweep.json").read_text())["points"]
    assert [p["plan"] for p in points] == ["dense", "plans/width-0.50", "calib/width-0.50"]
    assert [p["heal_steps"] for p in points] == [0, 7, 0] and points[1]["healed"]
    for p in points:
        assert p["single_decode_tok_s"] > 0 and len(p["single_decode_rounds"]) == 1
        assert p["decode_tok_s"] > 0 and p["prefill_tok_s"] > 0
    assert points[0]["single_decode_tok_s_vs_dense"] == 1.0 and points[0]["gemm_weights_vs_dense"] == 1.0
    assert 0.5 < points[1]["gemm_weights_vs_dense"] == points[2]["gemm_weights_vs_dense"] < 1.0
    table = (out / "width_sweep.md").read_text()
    assert "| batch-2 decode tok/s (16-token prompts) |" in table and "| plans/width-0.50 | 7 |" in table
    assert (out / "width_sweep.png").read_bytes()[:4] == b"\x89PNG"
    # A shorter timed batch than the perplexity window.
    assert sweep.main(common + ["--plans", "width-0.50", "--speed-window", "12", "--single-prompt", "12"]) == 0
    assert "| batch-2 decode tok/s (12-token prompts) |" in (out / "width_sweep.md").read_text()
    for bad in (["--single-prompt", "17"], ["--single-prompt", "8", "--single-decode-tokens", "200"],
                ["--plans", "width-0.99"], ["--speed-window", "17"], ["--speed-window", "0"],
                ["--speed-window", "8", "--single-prompt", "9"], ["--repeats", "0"], ["--decode-tokens", "0"],
                ["--speed-batch", "0"], ["--num-prompts", "0"], ["--num-prompts", "4"], ["--eval-tokens", "8"]):
        with pytest.raises(SystemExit):
            sweep.main(common + bad)
    # Caught before any plan is measured: missing data, an output folder under a file, and
    # held-out text that reaches into what a plan was calibrated on (calib held out 64 tokens).
    (tmp_path / "afile").write_text("")
    for bad, message in ((["--data-dir", str(tmp_path / "nowhere")], "data file"),
                         (["--output-dir", str(tmp_path / "afile" / "out")], "afile"),
                         (["--plans", other, "--eval-tokens", "128"], "calibrated or healed on")):
        assert sweep.main(common + ["--single-prompt", "8"] + bad) == 1
        assert message in capsys.readouterr().err


def test_quality_cli_rejects_bad_numbers_and_unwritable_results_before_measuring(tmp_path, capsys):
    from trident.bench.quality import main

    (tmp_path / "afile").write_text("")
    target = ["--base-url", "http://127.0.0.1:9"]              # nothing listens: no request is made
    with pytest.raises(SystemExit):
        main([*target, "--concurrency", "0"])
    assert "--concurrency: must be >= 1, got 0" in capsys.readouterr().err
    assert main([*target, "--result-file", str(tmp_path / "afile" / "r.json")]) == 1
    assert "afile" in capsys.readouterr().err
    assert main([*target, "--sweep", "a={}", "--output-dir", str(tmp_path / "afile" / "sweep")]) == 1
    assert "afile" in capsys.readouterr().err


def test_plans_of_the_same_name_from_two_calibrations_get_their_folder_in_the_label(tmp_path):
    from trident.bench.width_sweep import plan_runs

    for folder in ("heads", "groups"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "width-0.20.json").write_text("{}")
    (tmp_path / "heads" / "width-0.25.json").write_text("{}")
    runs = plan_runs(f"width-0.20,width-0.25,{tmp_path}/groups/width-0.20.json", tmp_path / "heads", "m")
    assert [label for label, _ in runs] == ["dense", "heads/width-0.20", "width-0.25", "groups/width-0.20"]
    with pytest.raises(SystemExit, match="no plan"):
        plan_runs("width-0.30", tmp_path / "heads", "m")
