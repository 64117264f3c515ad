"""The joint Pareto front of `trident plan` against each single-axis front, every figure from one run.

    python -m trident.bench.joint_front [--model smollm2-135m-instruct] [--dtype float32]
        [--context 1024] [--continuation 128] [--passages 4] [--tokens 16384] [--batch 8]
        [--rounds 2] [--levels 1.02,1.05,1.075,1.1] [--output-dir bench/results/joint-float32]

One planner (engine.calibration.planner) measures quality for every point; its cost model,
fitted to timed steps, predicts decode and prefill speed. The search runs twice from dense, once
for batch decode and once for prefill, sharing every quality measurement; each axis's own ladder
is measured too. Per phase, the joint front is the Pareto set of every measured point, and a
single-axis front that of its ladder. At each quality level, the fastest point of the joint
front and of every single-axis front are then timed side by side with dense (batch decode
steps and the time to first token of one `--context`-token prompt), so the table's ratios are measured, with
the prediction next to them. Writes joint_front.json, joint_front.md, joint_front.png (speed
against perplexity ratio, decode and prefill) and kv_memory.png (KV memory per sequence at a
4096-token context against perplexity ratio).
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from trident.bench.datasets import WIKITEXT_FILE, positive_int, require_data_file, require_writable
from trident.bench.inprocess import model_parser
from trident.bench.machine import machine_info
from trident.bench.report import markdown, save_figure
from trident.engine.calibration.candidates import LONG_CONTEXT, Planner, Settings
from trident.engine.calibration.compose import AXES, Point
from trident.engine.calibration.planner import describe, explore, lattice_for, probe_points, profiles_of
from trident.engine.calibration.search import best_within, pareto

PHASES = ("decode", "prefill")


def fronts(planner: Planner, phase: str, singles: dict) -> tuple[list, dict[str, list]]:
    """(joint front, {axis: its single-axis front}) for `phase`'s predicted speed."""
    measure = planner.measure(phase)
    joint = pareto([measure(p) for p in planner.qualities])
    axis_fronts = {axis: pareto([measure(m.point) for m in points]) for axis, points in singles.items()}
    return joint, axis_fronts


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    rows = {r["plan"]: r for r in result["points"]}
    for ax, phase in zip(axes, PHASES):
        key = f"predicted_{phase}_speedup"
        ax.scatter([r["perplexity_ratio"] for r in rows.values()], [r[key] for r in rows.values()],
                   s=10, color="0.75", label="measured points")
        for axis, labels in result["fronts"][phase]["single_axis"].items():
            pts = [rows[l] for l in labels]
            ax.plot([r["perplexity_ratio"] for r in pts], [r[key] for r in pts], marker="o", ms=3, label=axis)
        pts = [rows[l] for l in result["fronts"][phase]["joint"]]
        ax.plot([r["perplexity_ratio"] for r in pts], [r[key] for r in pts], marker="s", color="black", lw=2,
                label="joint")
        timed = [r for r in rows.values() if f"measured_{phase}_speedup" in r]
        ax.scatter([r["perplexity_ratio"] for r in timed], [r[f"measured_{phase}_speedup"] for r in timed],
                   marker="x", color="red", zorder=5, label="timed")
        ax.set_xlim(0.99, 1.32)
        ax.set_xlabel("perplexity / dense (held-out continuations)")
        ax.set_ylabel(f"{phase} speedup over dense (cost model; x = timed)")
        ax.set_title(f"{phase}: joint front vs single-axis fronts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_kv(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    rows = result["points"]
    for with_budget, colour, label in ((False, "0.6", "no KV budget"), (True, "tab:blue", "with a KV budget")):
        pts = [r for r in rows if (r["point"]["kv_budget"] > 0) == with_budget]
        ax.scatter([r["perplexity_ratio"] for r in pts], [r["kv_fraction_long_context"] for r in pts],
                   color=colour, s=14, label=label)
    lc = result["profiles"]["long-context"]
    ax.scatter([lc["perplexity_ratio"]], [lc["kv_fraction_long_context"]], marker="*", s=160, color="red",
               label=f"long-context profile ({lc['plan']})")
    ax.set_xlim(0.99, 1.32)
    ax.set_xlabel("perplexity / dense (held-out continuations)")
    ax.set_ylabel(f"KV memory per sequence at {LONG_CONTEXT} tokens / dense")
    ax.set_title("KV memory at long context")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def markdown_table(result: dict) -> str:
    s = result["settings"]
    caption = (f"`{result['command']}` — {result['model']}, {s['dtype']}, {result['machine'].get('cpu', '')}. "
               f"Quality: perplexity of {s['continuation']} teacher-forced tokens after {s['context']}-token "
               f"prompts, {s['passages']} held-out WikiText-2 passages (dense {result['dense_perplexity']:.2f}). "
               f"Speed, timed side by side with dense (median over {s['rounds']} rounds of the ratio to dense in the "
               f"same round): batch-{s['batch']} decode steps at {s['context']} tokens, and the time to first "
               f"token of one {s['context']}-token prompt; the cost model's prediction in brackets. "
               f"{result['measured_points']} combined plans measured; the joint front is the Pareto set of all of them, "
               f"a single-axis front that of its own ladder.")
    rows = []
    for phase in PHASES:
        for level, entry in result["levels"][phase].items():
            best_single = max((r for a, r in entry.items() if a != "joint" and r),
                              key=lambda r: r[f"measured_{phase}_speedup"], default=None)
            for name, r in entry.items():
                gain = ""
                if name == "joint" and best_single:
                    gain = f"{r[f'measured_{phase}_speedup'] / best_single[f'measured_{phase}_speedup'] - 1:+.0%}"
                rows.append([f"{phase} ≤ {level}", name, r["plan"], f"{r['perplexity_ratio']:.3f}",
                             f"{r['token_agreement']:.3f}",
                             f"{r[f'measured_{phase}_speedup']:.2f}x ({r[f'predicted_{phase}_speedup']:.2f}x)", gain])
    table = markdown(caption, ["quality level", "front", "plan", "perplexity vs dense", "token agreement",
                               "speedup (predicted)", "joint vs best single axis"], rows)
    prof = [[name, r["plan"], f"{r['perplexity_ratio']:.3f}", f"{r['token_agreement']:.3f}",
             f"{r.get('measured_decode_speedup', float('nan')):.2f}x",
             f"{r.get('measured_prefill_speedup', float('nan')):.2f}x", f"{r['kv_fraction_long_context']:.3f}"]
            for name, r in result["profiles"].items()]
    table += "\n" + markdown("Profiles (timed in the same run):", ["profile", "plan", "perplexity vs dense",
                                                                   "token agreement", "batch decode", "prefill",
                                                                   f"KV per sequence at {LONG_CONTEXT} tokens"], prof)
    cost = result["cost_model"]
    table += (f"\nCost model (seconds per step = weights . {cost['features']}): decode {cost['weights']['decode']}, "
              f"relative RMS error {cost['residuals']['decode']:.1%}; prefill {cost['weights']['prefill']}, "
              f"{cost['residuals']['prefill']:.1%}.\n")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("python -m trident.bench.joint_front", __doc__)
    ap.add_argument("--context", type=positive_int, default=Settings.context)
    ap.add_argument("--continuation", type=positive_int, default=Settings.continuation)
    ap.add_argument("--passages", type=positive_int, default=Settings.passages)
    ap.add_argument("--tokens", type=positive_int, default=Settings.calibration_tokens)
    ap.add_argument("--window", type=positive_int, default=Settings.window, help="tokens per statistics window")
    ap.add_argument("--batch", type=positive_int, default=Settings.batch)
    ap.add_argument("--rounds", type=positive_int, default=Settings.rounds)
    ap.add_argument("--levels", default="1.02,1.05,1.075,1.1", help="perplexity ratios the fronts are timed at")
    ap.add_argument("--output-dir", type=Path, default=Path("bench/results/joint-float32"))
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    try:
        levels = [float(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--levels must be numbers like 1.05,1.1, got {args.levels!r}")
    for name in ("joint_front.json", "joint_front.md", "joint_front.png", "kv_memory.png"):
        require_writable(args.output_dir / name)
    data = require_data_file(args.data_dir, WIKITEXT_FILE)
    settings = Settings(context=args.context, continuation=args.continuation, passages=args.passages,
                        calibration_tokens=args.tokens, window=args.window, batch=args.batch, rounds=args.rounds, dtype=args.dtype)
    settings.lattice = lattice_for("decode", args.context)
    planner = Planner(args.model, data, Path(tempfile.mkdtemp(prefix="joint-front-")), settings)
    settings = planner.settings
    planner.fit_cost(probe_points(settings.lattice))
    searches, singles = {}, {}
    for phase in PHASES:
        searches[phase], found = explore(planner, phase, single_axis=not singles)
        singles = singles or found
    profiles = profiles_of(planner, "decode")
    level_points = {}
    front_labels = {}
    for phase in PHASES:
        joint, axis_fronts = fronts(planner, phase, singles)
        front_labels[phase] = {"joint": [m.point.label for m in joint],
                               "single_axis": {a: [m.point.label for m in f] for a, f in axis_fronts.items()}}
        level_points[phase] = {}
        for level in levels:
            entry = {"joint": best_within(joint, level)}
            entry.update({axis: best_within(f, level) for axis, f in axis_fronts.items()})
            level_points[phase][level] = {k: m.point for k, m in entry.items() if m is not None}
    to_time = [Point()] + list(profiles.values())
    to_time += [p for by_level in level_points.values() for entry in by_level.values() for p in entry.values()]
    to_time = list(dict.fromkeys(to_time))
    print(f"timing {len(to_time)} plans side by side", file=sys.stderr)
    timed = planner.time_points(to_time)
    result = {
        "command": "python -m trident.bench.joint_front " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": planner.ingredients.llm.engine.model_name, "machine": machine_info(),
        "settings": {k: v for k, v in vars(settings).items() if k != "lattice"}, "lattice": vars(settings.lattice),
        "dense_perplexity": planner.dense_ppl, "measured_points": len(planner.qualities),
        "cost_model": planner.cost_report(),
        "search": {phase: {"path": [m.point.label for m in r.path], "moves": r.moves} for phase, r in searches.items()},
        "points": [describe(planner, p, timed) for p in planner.qualities],
        "fronts": front_labels,
        "levels": {phase: {str(level): {k: describe(planner, p, timed) for k, p in entry.items()}
                           for level, entry in by_level.items()} for phase, by_level in level_points.items()},
        "profiles": {name: describe(planner, p, timed) for name, p in profiles.items()},
        "timed": {"dense_prefill_seconds": [r[0] for r in timed[Point()]],
                  "dense_decode_step_seconds": [r[1] for r in timed[Point()]]},
    }
    planner.close()
    shutil.rmtree(planner.out_dir, ignore_errors=True)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "joint_front.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "joint_front.md").write_text(markdown_table(result))
    plot(result, out / "joint_front.png")
    plot_kv(result, out / "kv_memory.png")
    print(markdown_table(result))
    print(f"single-axis ladders measured: {', '.join(a for a in AXES if a in singles)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
