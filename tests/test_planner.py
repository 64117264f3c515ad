"""The joint planner: composing axes into one plan, the cost model, the search, and `trident plan`
end to end on a tiny random model."""
import json
from dataclasses import replace

import pytest

from tests.conftest import DATA_DIR
from trident.engine.calibration.compose import Point
from trident.engine.calibration.cost_model import CostModel, features
from trident.engine.calibration.search import Lattice, Measured, greedy_path, pareto
from trident.engine.pruning.plan import PruningPlan


def test_cost_model_recovers_the_weights_of_timed_steps(tiny_model_dir):
    from trident.engine.loader import load_checkpoint

    config = load_checkpoint(str(tiny_model_dir)).config
    dense = PruningPlan.dense(config)
    plans = [dense]
    for drop in (1, 2):
        p = PruningPlan.dense(config)
        for i in range(drop):
            p.layers[i].keep = False
        plans.append(p)
    narrow = PruningPlan.dense(config)
    for layer in narrow.layers:
        layer.kept_ffn_channels = list(range(48))
    plans.append(narrow)
    budget = PruningPlan.dense(config)
    budget.length = replace(budget.length, decode_sinks=4, decode_recent=12, decode_heavy=16)
    plans.append(budget)
    truth = [2e-3, 5.0, 3.0, 1e-4, 1e-2]
    samples = {phase: [(features(p, config, phase, 256, 4), sum(w * x for w, x in zip(truth, features(
        p, config, phase, 256, 4)))) for p in plans] for phase in ("decode", "prefill")}
    model = CostModel.fit(samples, 256, 4)
    assert model.residuals["decode"] < 1e-6
    # Fewer layers, fewer channels and a KV budget are all predicted faster than dense.
    for p in plans[1:]:
        assert model.speedup(p, dense, config, "decode") > 1.0
    # A budget does not speed up prefill; prefill dropping does.
    assert model.speedup(budget, dense, config, "prefill") == pytest.approx(1.0)
    keep = PruningPlan.dense(config)
    keep.length = replace(keep.length, prefill_keep=[(0, 0.5)])
    assert model.speedup(keep, dense, config, "prefill") > 1.2
    # Exits shorten decode rows only: half the layers per decode token, no prefill gain.
    assert model.speedup(dense, dense, config, "decode", layer_fraction=0.5) > 1.1
    assert model.speedup(dense, dense, config, "prefill", layer_fraction=0.5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="phase"):
        features(dense, config, "train", 8, 1)


def test_greedy_path_follows_the_best_trade_and_measures_combinations():
    lattice = Lattice(depth=(0, 1, 2), width=(0.0, 0.1, 0.2), exit=(None,), prefill_keep=(1.0,), kv_budget=(0,))
    seen = []

    def measure(p: Point) -> Measured:
        seen.append(p)
        # Width is cheap in quality until depth is also pruned (an interaction a sum would miss).
        quality = 1 + 0.10 * p.depth + (0.01 if p.depth == 0 else 0.2) * p.width * 10
        return Measured(p, quality, 1 + 0.2 * p.depth + 0.1 * p.width * 10)

    result = greedy_path(lattice, measure, max_quality=1.6)
    labels = [m.point.label for m in result.path]
    assert labels[:3] == ["dense", "width-0.1", "width-0.2"]      # 0.1 speed per 0.01 quality beats depth
    assert labels[3] == "depth-1+width-0.2"
    assert Point(depth=1, width=0.2) in seen and all(m["options"] for m in result.moves[:3])
    every = [measure(p) for p in set(seen)]
    front = pareto(every)
    for a in front:            # nothing measured beats a front point on both counts
        assert not any(b.quality <= a.quality and b.speedup > a.speedup for b in every)
    for b in every:            # and every point off the front is beaten by one on it
        assert b.point in {a.point for a in front} or \
            any(a.quality <= b.quality and a.speedup >= b.speedup for a in front)


def test_greedy_path_skips_combinations_the_engine_cannot_run():
    lattice = Lattice(depth=(0,), width=(0.0,), exit=(None, 0.9), prefill_keep=(1.0, 0.5), kv_budget=(0,))
    measured = []

    def measure(p: Point) -> Measured:
        measured.append(p)
        return Measured(p, 1.0 + 0.01 * len(p.axes), 1.0 + 0.5 * len(p.axes))

    greedy_path(lattice, measure, max_quality=2.0)
    assert all(p.runnable for p in measured)
    assert not Point(exit=0.9, prefill_keep=0.5).runnable


@pytest.fixture(scope="module")
def planned(tiny_model_dir, tmp_path_factory):
    from trident.engine.calibration.candidates import Settings
    from trident.engine.calibration.planner import Target, run

    out = tmp_path_factory.mktemp("plans")
    lattice = Lattice(depth=(0, 1), width=(0.0, 0.25), exit=(None, 0.9), prefill_keep=(1.0, 0.5))
    settings = Settings(context=48, continuation=8, passages=2, calibration_tokens=256, window=32, batch=2,
                        timed_steps=2, rounds=1, prefill_recent=8, lattice=lattice, search_limit=1e9)
    report = run(str(tiny_model_dir), DATA_DIR / "wikitext2-valid.txt", out, Target(max_perplexity_increase=10.0),
                 "long-context", settings)
    return out, report


def test_plan_writes_the_chosen_plan_the_profiles_and_a_report(planned, tiny_model_dir):
    from trident.engine.config import EngineConfig
    from trident.engine.llm import LLM
    from trident.engine.sampling_params import SamplingParams

    out, report = planned
    assert json.loads((out / "plan-report.json").read_text())["workload"] == "long-context"
    assert not (out / "candidates").exists()
    assert set(report["profiles"]) == {"lossless", "balanced", "aggressive", "long-context"}
    labels = {row["plan"] for row in report["points"]}
    assert "dense" in labels and len(labels) == report["search"]["measured_points"]
    # The search measured combinations.
    assert any(len(row["axes"]) >= 2 for row in report["points"])
    # Every reported point has quality next to its predicted speed; timed ones a measured speed.
    for row in report["points"]:
        assert row["perplexity"] > 0 and 0 <= row["token_agreement"] <= 1 and row["predicted_decode_speedup"] > 0
    assert report["chosen"]["perplexity_ratio"] <= 11.0 and "measured_decode_speedup" in report["chosen"]
    assert report["profiles"]["lossless"]["plan"] == "dense"
    # The long-context profile holds no more KV per sequence than any plan within its limit.
    limit = 1.10
    ok = [r["kv_bytes_long_context"] for r in report["points"] if r["perplexity_ratio"] <= limit]
    assert report["profiles"]["long-context"]["kv_bytes_long_context"] == min(ok)
    # Each written plan loads and serves on the model; lossless is greedy-identical to dense.
    prompt = list(range(5, 30))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    dense = LLM(EngineConfig(model=str(tiny_model_dir), dtype="float32")).generate([prompt], params)
    for name, path in report["plans"].items():
        plan = PruningPlan.load(path)
        llm = LLM(EngineConfig(model=str(tiny_model_dir), dtype="float32", plan=path))
        got = llm.generate([prompt], params)[0].outputs[0].token_ids
        assert len(got) == 8, name
        if name == "lossless":
            assert plan.is_dense and got == dense[0].outputs[0].token_ids


def test_a_composed_plan_prunes_every_axis_it_names(planned, tiny_model_dir):
    from trident.engine.calibration.candidates import Planner, Settings

    out, report = planned
    rows = {r["plan"]: r for r in report["points"]}
    both = [r for r in rows.values() if {"depth", "width"} <= set(r["axes"])]
    assert both, "the search reached a depth and width combination"
    # Rebuild one combined point directly and check its shape.
    lattice = Lattice(depth=(0, 1), width=(0.0, 0.25), exit=(None,), prefill_keep=(1.0, 0.5), kv_budget=(0, 24))
    planner = Planner(str(tiny_model_dir), DATA_DIR / "wikitext2-valid.txt", out / "direct",
                      Settings(context=48, continuation=8, passages=2, calibration_tokens=256, window=32, batch=2,
                               timed_steps=2, rounds=1, prefill_recent=8, lattice=lattice))
    point = Point(depth=1, width=0.25, prefill_keep=0.5, kv_budget=24)
    plan = PruningPlan.load(planner.plan_file(point))
    plan.validate(planner.config)
    assert sum(not l.keep for l in plan.layers) == 1
    assert any(l.kept_ffn_channels is not None for l in plan.layers if l.keep)
    assert plan.length.kv_budget == 24 and plan.length.prefill_keep[0][1] == 0.5
    assert plan.layers[plan.length.prefill_keep[0][0]].keep
    assert planner.kv_bytes(point) < planner.kv_bytes(Point())
    q = planner.quality(point)
    assert q.ratio > 0 and q.flops_fraction < 1
    with pytest.raises(ValueError, match="exits"):
        planner.plan_file(Point(exit=0.9, kv_budget=24))
    planner.close()
    assert not planner.work_dir.exists()


def test_trident_plan_writes_profiles_a_user_can_serve(tiny_model_dir, tmp_path, capsys):
    from trident.engine.config import EngineConfig
    from trident.engine.llm import LLM
    from trident.engine.sampling_params import SamplingParams
    from trident.server.cli import main

    (tmp_path / "balanced.json").write_text("{}")           # an earlier file is replaced, not kept
    (tmp_path / "chosen.json").write_text("{}")
    args = ["plan", "--model", str(tiny_model_dir), "--workload", "prefill", "--context", "48", "--continuation",
            "8", "--passages", "2", "--tokens", "256", "--batch", "2", "--out", str(tmp_path)]
    assert main(args + ["--max-perplexity-increase", "100"]) == 0
    out = capsys.readouterr().out
    assert "plan-report.json" in out
    report = json.loads((tmp_path / "plan-report.json").read_text())
    assert report["workload"] == "prefill" and report["lattice"]["kv_budget"] == [0]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for name in ("lossless", "balanced", "aggressive", "long-context", "chosen"):
        assert name in out
        plan = PruningPlan.load(tmp_path / f"{name}.json")
        assert plan.name == name
        llm = LLM(EngineConfig(model=str(tiny_model_dir), dtype="float32", plan=str(tmp_path / f"{name}.json")))
        assert len(llm.generate([list(range(5, 20))], params)[0].outputs[0].token_ids) == 4
    # A target no plan meets: exit code 1, and no stale chosen.json left behind.
    assert main(args + ["--target-speedup", "1000"]) == 1
    assert "no plan on the front meets the target" in capsys.readouterr().out
    assert not (tmp_path / "chosen.json").exists()


def test_trident_plan_refuses_bad_targets(tiny_model_dir, tmp_path, capsys):
    from trident.server.cli import main

    assert main(["plan", "--model", str(tiny_model_dir), "--max-perplexity-increase", "-1",
                 "--out", str(tmp_path)]) == 2
    assert "must be >= 0" in capsys.readouterr().err
    assert main(["plan", "--model", str(tiny_model_dir), "--flops-budget", "0.5", "--context", "0",
                 "--out", str(tmp_path)]) == 2
    assert "--context must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--model", str(tiny_model_dir), "--flops-budget", "0.5", "--target-speedup", "2"])


def test_joint_front_bench_writes_both_fronts_and_times_them(tiny_model_dir, tmp_path):
    from trident.bench.joint_front import main

    out = tmp_path / "joint"
    out.mkdir()                    # a folder from an earlier run is fine
    assert main(["--model", str(tiny_model_dir), "--context", "48", "--continuation", "8", "--passages", "2",
                 "--tokens", "256", "--window", "32", "--batch", "2", "--rounds", "1", "--levels", "1.1,100",
                 "--output-dir", str(out)]) == 0
    result = json.loads((out / "joint_front.json").read_text())
    for name in ("joint_front.md", "joint_front.png", "kv_memory.png"):
        assert (out / name).stat().st_size > 0
    rows = {r["plan"]: r for r in result["points"]}
    for phase in ("decode", "prefill"):
        fronts = result["fronts"][phase]
        assert set(fronts["single_axis"]) == {"depth", "width", "exit", "prefill_keep", "kv_budget"}
        # The joint front is drawn from every measured point, so no single-axis plan beats it.
        joint = [rows[label] for label in fronts["joint"]]
        for label in (l for ladder in fronts["single_axis"].values() for l in ladder):
            single = rows[label]
            assert not any(single["perplexity_ratio"] < j["perplexity_ratio"] and
                           single[f"predicted_{phase}_speedup"] > j[f"predicted_{phase}_speedup"] for j in joint)
        # Every plan the table compares at a level was timed against dense.
        for entry in result["levels"][phase].values():
            assert all(f"measured_{phase}_speedup" in r for r in entry.values())
    assert "joint vs best single axis" in (out / "joint_front.md").read_text()
