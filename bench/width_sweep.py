"""In-process plan sweep: quality against measured speed for the plans of a calibration.

    python -m trident.bench.quality width-sweep [--model smollm2-135m-instruct] [--plans-dir DIR]
    python -m trident.bench.quality width-sweep --plans depth-1,depth-2,... --name depth_sweep

For dense and each `width-*.json` plan written by `trident calibrate` (or the `--plans` named,
width or depth alike): perplexity on the held-out
end of WikiText-2 (calibration reads the start), greedy token agreement with dense on the last
`--num-prompts` Alpaca tasks (instruction and input), and prefill, batch decode and
single-sequence decode tok/s measured in this same run. All plans' engines are loaded at once and
timed side by side, one engine step each in turn, in `--repeats` rounds: a figure is the median
of its rounds, a "vs dense" ratio the median of the rounds' paired ratios. Writes a markdown
table, JSON and a PNG plot of quality against speed with the Pareto front. "GEMM
weights" is the plan's share of the dense model's projection and LM-head weights: a decode step
reads each of them once, so a decode that only read weights would speed up by its inverse.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from trident.bench.agreement import prefix_agreement
from trident.engine.calibration.timing import lockstep_speed, paired_ratio
from trident.bench.inprocess import (DATA_DIR, engine_for, labelled, plan_runs,
                                     speed_batch_prompts)
from trident.bench.datasets import (ALPACA_FILE, WIKITEXT_FILE, load_alpaca, positive_int, require_data_file,
                                    require_writable)
from trident.bench.pareto import pareto_front
from trident.bench.report import save_figure
from trident.engine.llm import LLM
from trident.engine.calibration.evaluate import perplexity, token_windows
from trident.engine.pruning.profiles import profile_dir
from trident.engine.sampling_params import SamplingParams
from trident.kernels.linear import Linear


def calibration_report(plan: str | None) -> dict | None:
    """The calibration.json next to `plan`: the record of the calibration that wrote it (None: none)."""
    if plan is None or not (report := Path(plan).parent / "calibration.json").exists():
        return None
    return json.loads(report.read_text())


def heal_steps(plan: str | None) -> int:
    """Distillation steps that healed `plan`, from its calibration report (0: not healed, or no
    record; every least-squares plan has a weights file, so the file alone does not tell)."""
    report = calibration_report(plan) or {}
    entries = [p for p in report.get("sweep", []) + report.get("depth_sweep", []) if p["plan"] == Path(plan).stem]
    return entries[0]["healing"]["steps"] if entries and "healing" in entries[0] else 0


def gemm_weights(llm: LLM) -> int:
    """Weight elements of every GEMM a decode token runs through (each layer's projections and the
    LM head): what a decode step reads from memory, once per step whatever the batch."""
    return sum(m.weight.numel() for m in llm.engine.runner.model.modules() if isinstance(m, Linear))


def evaluate(model: str, plan: str | None, held_out, instructions, args) -> dict:
    llm = engine_for(model, plan, args)
    chats = [llm.tokenizer.apply_chat_template([{"role": "user", "content": i}]) for i in instructions]
    outs = llm.generate(chats, SamplingParams(max_tokens=args.max_tokens, temperature=0))
    return {"perplexity": perplexity(llm, held_out(llm.tokenizer)), "greedy": [o.outputs[0].token_ids for o in outs],
            "gemm_weights": gemm_weights(llm)}


def interleaved_speed(model: str, plans: list[tuple[str, str | None]], speed_prompts, args) -> dict[str, dict]:
    """{label: {"prefill_tok_s", "decode_tok_s", "single_decode_tok_s": medians of `args.repeats`
    rounds, and "prefill_rounds", "decode_rounds", "single_decode_rounds": every round's figure,
    in round order}}. Every plan's engine is loaded once, and each round times them all side by
    side (`lockstep_speed`), the first turn of round r going to plan r: the speed batch, then the
    first `args.single_prompt` tokens of its first prompt alone for `args.single_decode_tokens`
    steps (one sequence, as llama.cpp's token-generation benchmark). A round's figures of two
    plans come from the same stretch of time, so their ratio is a paired measurement."""
    keys = ("prefill", "decode", "single_decode")
    llms = [engine_for(model, plan, args, timing=True) for _, plan in plans]
    batches = [speed_prompts(llm.tokenizer) for llm in llms]
    singles = [[batch[0][:args.single_prompt]] for batch in batches]
    samples = {label: {k: [] for k in keys} for label, _ in plans}
    for r in range(args.repeats):
        first = r % len(plans)
        batch_rates = lockstep_speed(llms, batches, args.decode_tokens, first)
        single_rates = lockstep_speed(llms, singles, args.single_decode_tokens, first)
        for (label, _), (prefill, decode), (_, single) in zip(plans, batch_rates, single_rates):
            for key, value in zip(keys, (prefill, decode, single)):
                samples[label][key].append(value)
            print(f"  round {r + 1}/{args.repeats} {label}: prefill {prefill:.0f} tok/s, decode {decode:.1f} tok/s, "
                  f"single-sequence decode {single:.1f} tok/s", flush=True)
    return {label: {**{f"{k}_tok_s": statistics.median(v) for k, v in runs.items()},
                    **{f"{k}_rounds": v for k, v in runs.items()}} for label, runs in samples.items()}


def plot(points: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key, label in ((axes[0], "prefill_tok_s", "prefill tok/s"), (axes[1], "decode_tok_s", "batch decode tok/s"),
                           (axes[2], "single_decode_tok_s", "single-sequence decode tok/s")):
        xs, ys = [p[key] for p in points], [p["perplexity"] for p in points]
        ax.scatter(xs, ys, zorder=2)
        for p, x, y in zip(points, xs, ys):
            label_text = f"{p['plan']}{'*' if p['healed'] else ''} ({p['agreement']:.2f})"
            ax.annotate(label_text, (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        front = sorted((x, y) for (x, y), on in zip(zip(xs, ys), pareto_front(list(zip(xs, ys)), (True, False))) if on)
        ax.plot(*zip(*front), color="tab:red", marker="*", label="Pareto front", zorder=3)
        ax.set_xlabel(f"{label} (measured, same run)")
        ax.set_ylabel("held-out perplexity (lower is better)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Pruning plans: quality vs speed (labels: plan, * if healed, and greedy agreement with dense)")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trident.bench.quality width-sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--plans-dir", type=Path, help="calibration output (default: where --plan PROFILE looks)")
    ap.add_argument("--plans", help="comma-separated plan names (in --plans-dir) or .json paths (default: every "
                                    "width-*.json of --plans-dir)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--eval-tokens", type=positive_int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--num-prompts", type=positive_int, default=16, help="Alpaca instructions for agreement")
    ap.add_argument("--max-tokens", type=positive_int, default=32)
    ap.add_argument("--speed-batch", type=positive_int, default=8)
    ap.add_argument("--speed-window", type=int,
                    help="prompt tokens of each timed batch prompt (default: --window, the perplexity window)")
    ap.add_argument("--decode-tokens", type=positive_int, default=32)
    ap.add_argument("--single-prompt", type=int, default=64, help="prompt tokens of the single-sequence decode")
    ap.add_argument("--single-decode-tokens", type=int, default=64, help="decode steps of the single-sequence decode")
    ap.add_argument("--repeats", type=positive_int, default=3,
                    help="timing rounds over all plans; each figure is the median of its rounds")
    ap.add_argument("--output-dir", type=Path, default=Path("bench/results/width"))
    ap.add_argument("--name", default="width_sweep",
                    help="file name of the table, JSON and plot in --output-dir (default %(default)s)")
    args = ap.parse_args(argv)
    if not 2 <= args.window <= args.eval_tokens:
        ap.error(f"--window must be 2..--eval-tokens ({args.eval_tokens})")
    args.speed_window = args.window if args.speed_window is None else args.speed_window
    if not 1 <= args.speed_window <= args.window:
        ap.error(f"--speed-window must be 1..--window ({args.window})")
    if not 1 <= args.single_prompt <= args.speed_window or args.single_decode_tokens < 1:
        ap.error(f"--single-prompt must be 1..--speed-window ({args.speed_window}) and --single-decode-tokens >= 1")
    if args.single_prompt + args.single_decode_tokens > args.window + args.max_tokens + 63:
        ap.error("--single-prompt + --single-decode-tokens must fit the engine's max_model_len "
                 f"(--window + --max-tokens + 64 = {args.window + args.max_tokens + 64})")

    plans_dir = args.plans_dir or profile_dir(args.model)
    if args.plans:
        runs = plan_runs(args.plans, plans_dir, args.model)
    else:
        runs = [("dense", None)] + labelled(sorted(plans_dir.glob("width-*.json")))
    if len(runs) == 1:
        print(f"error: no width-*.json plans in {plans_dir}; run `trident calibrate --model {args.model}`",
              file=sys.stderr)
        return 1
    for _, plan in runs[1:]:
        # Held-out tokens at the end of the text of the calibration that wrote the plan.
        held_out_tokens = (calibration_report(plan) or {}).get("eval_tokens")
        if held_out_tokens is not None and args.eval_tokens > held_out_tokens:
            print(f"error: --eval-tokens {args.eval_tokens} reaches into text that {plan} was calibrated or "
                  f"healed on (its calibration held out the last {held_out_tokens} tokens)", file=sys.stderr)
            return 1
    try:
        text = require_data_file(args.data_dir, WIKITEXT_FILE).read_text()
        tasks = load_alpaca(require_data_file(args.data_dir, ALPACA_FILE))
        require_writable(args.output_dir / f"{args.name}.json")     # before the measurements, not after
    except OSError as e:        # FileNotFoundError from require_data_file, or an unwritable output dir
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.num_prompts > len(tasks):
        ap.error(f"--num-prompts must be 1..{len(tasks)}")
    instructions = [t.prompt for t in tasks[-args.num_prompts:]]     # instruction and its input
    held_out = lambda tok: token_windows(tok, text, args.eval_tokens, args.window, from_end=True)
    speed_prompts = speed_batch_prompts(text, args.speed_batch, args.speed_window)

    points = []
    for label, plan in runs:
        result = evaluate(args.model, plan, held_out, instructions, args)
        steps = heal_steps(plan)
        points.append({"plan": label, "dtype": args.dtype, "healed": steps > 0, "heal_steps": steps, **result})
        print(f"{label}: perplexity {result['perplexity']:.3f}", flush=True)
    timings = interleaved_speed(args.model, runs, speed_prompts, args)
    for p in points:
        p.update(timings[p["plan"]])
    dense, reference = points[0], points[0]["greedy"]
    for p in points:
        p["agreement"] = sum(prefix_agreement(list(map(str, a)), list(map(str, b)))
                             for a, b in zip(reference, p["greedy"])) / len(instructions)
        for key in ("perplexity", "gemm_weights"):
            p[f"{key}_vs_dense"] = p[key] / dense[key]
        for key in ("prefill", "decode", "single_decode"):
            p[f"{key}_tok_s_vs_dense"] = paired_ratio(p[f"{key}_rounds"], dense[f"{key}_rounds"])
        del p["greedy"]
    rows = [f"| plan | healing steps | perplexity | vs dense | agreement | GEMM weights | prefill tok/s | vs dense | "
            f"batch-{args.speed_batch} decode tok/s ({args.speed_window}-token prompts) | vs dense | 1-sequence decode tok/s | vs dense |", "|---|---|" + "---:|" * 10]
    for p in points:
        rows.append(f"| {p['plan']} | {p['heal_steps'] or 'no'} | {p['perplexity']:.2f} | {p['perplexity_vs_dense']:.3f}x | "
                    f"{p['agreement']:.2f} | {p['gemm_weights_vs_dense']:.3f} | {p['prefill_tok_s']:.0f} | {p['prefill_tok_s_vs_dense']:.2f}x | "
                    f"{p['decode_tok_s']:.1f} | {p['decode_tok_s_vs_dense']:.2f}x | {p['single_decode_tok_s']:.1f} | "
                    f"{p['single_decode_tok_s_vs_dense']:.2f}x |")
    table = "\n".join(rows) + "\n"
    print(table)
    (args.output_dir / f"{args.name}.md").write_text(table)
    (args.output_dir / f"{args.name}.json").write_text(json.dumps(
        {"command": "python -m trident.bench.quality width-sweep " + " ".join(argv or []), "points": points}, indent=1))
    plot(points, args.output_dir / f"{args.name}.png")
    print(f"wrote {args.output_dir}/{args.name}.{{md,json,png}}")
    return 0
