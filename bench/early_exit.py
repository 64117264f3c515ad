"""Dynamic early exit against dense decoding, every figure from one run.

    python -m trident.bench.early_exit [--model smollm2-135m-instruct] [--dtype float32]
        [--exit-layers 14,18,21,25] [--thresholds 0.95,0.9,0.8,0.7,0.5] [--passages 8]
        [--context 64] [--tokens 128] [--output-dir bench/results/early-exit-float32]

Exit probes are fitted on the start of WikiText-2 (engine.calibration.exits, the recipe `trident
calibrate` runs) and the plan's thresholds picked for --agreement on the windows after. Quality
and speed are measured on --passages passages from the held-out end of the file, decoded
teacher-forced: after a --context-token prompt, each of --tokens decode steps runs through the
engine (exits, K/V fill and all) and is then given the true next token. Per setting, next to
dense in the same engine:
- token agreement: the step's argmax equals dense's at the same position;
- perplexity of the true tokens, and its ratio to dense's;
- tokens exited and the mean layers a decode token ran;
- decode tok/s at batch 1 (passages one by one, dense and exit runs alternating) and at batch
  --passages (all at once), as ratios to dense.
Settings: the calibrated per-layer thresholds, then one threshold for every exit (the request's
`exit_threshold`), from conservative to aggressive. Writes JSON, a Markdown table and a PNG.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from trident.bench.datasets import positive_int, require_writable
from trident.bench.inprocess import model_parser
from trident.bench.machine import machine_info
from trident.bench.report import markdown, save_figure
from trident.engine.config import EngineConfig, SchedulerConfig
from trident.engine.llm import LLM
from trident.engine.calibration.evaluate import split_windows
from trident.engine.calibration.exits import DEFAULT_AGREEMENT, calibrate_exits, default_exit_layers, exit_plan
from trident.engine.pruning.length import RequestPruning
from trident.engine.sampling_params import SamplingParams

TRAIN_WINDOWS, CHECK_WINDOWS, WINDOW = 12, 4, 512


class StepLogits:
    """While installed (through the runner's sampler hook), keeps the logits each step samples from
    (exited rows softened by their exit temperature, as the engine samples them) and the sequences
    they sample for, in row order; `take()` hands over the last step's."""

    def __init__(self, llm: LLM) -> None:
        self.runner = llm.engine.runner
        self.rows: list[tuple[object, torch.Tensor]] = []

    def __enter__(self):
        self.sample = self.runner.sampler

        def keep(logits, seqs):
            self.rows = list(zip(seqs, logits))
            return self.sample(logits, seqs)
        self.runner.sampler = keep
        return self

    def __exit__(self, *exc):
        self.runner.sampler = self.sample

    def take(self) -> list[tuple[object, torch.Tensor]]:
        rows, self.rows = self.rows, []
        return rows


def teacher_forced(llm: LLM, passages: list[list[int]], context: int, params: SamplingParams) -> dict:
    """Decode all `passages` together, each step given the true token; per passage the argmax and
    true-token log-probability at every decode position, the decode seconds and the usage."""
    engine = llm.engine
    ids = {}
    for i, passage in enumerate(passages):
        request_id = f"tf-{time.monotonic_ns()}-{i}"
        engine.add_request(request_id, passage[:context], params)
        ids[request_id] = i
    argmax = [[] for _ in passages]
    logprob = [[] for _ in passages]
    finals = {}
    seconds, started = 0.0, False
    with StepLogits(llm) as capture:
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            outputs = engine.step()
            if started:
                seconds += time.perf_counter() - t
            started = True        # the first step is the prefill
            for seq, row in capture.take():
                i = ids[seq.request_id]
                position = len(argmax[i])
                truth = passages[i][context + position]
                argmax[i].append(int(row.argmax()))
                logprob[i].append(float(row.log_softmax(-1)[truth]))
                if not seq.is_finished:
                    seq.token_ids[-1] = truth          # teacher forcing: the next step feeds the true token
            for out in outputs:
                if out.finished:
                    finals[ids[out.request_id]] = out
    tokens = sum(len(a) - 1 for a in argmax)          # decode positions (the prefill's prediction excluded)
    return {"argmax": argmax, "logprob": logprob, "decode_seconds": seconds, "decode_tokens": tokens,
            "usage": [finals[i].pruning for i in range(len(passages))]}


def summarize(run: dict, dense: dict | None, num_layers: int) -> dict:
    lps = [lp for row in run["logprob"] for lp in row]
    row = {"perplexity": math.exp(-sum(lps) / len(lps)), "decode_tok_s": run["decode_tokens"] / run["decode_seconds"]}
    exits = {}
    for usage in run["usage"]:
        for n, count in usage.get("early_exit", {}).get("exits_after_layers", {}).items():
            exits[int(n)] = exits.get(int(n), 0) + count
    decode = run["decode_tokens"]
    row["tokens_exited"] = sum(exits.values())
    row["exit_rate"] = row["tokens_exited"] / max(decode, 1)
    row["mean_layers"] = (sum(n * c for n, c in exits.items()) + num_layers * (decode - row["tokens_exited"])) / max(decode, 1)
    row["exits_after_layers"] = dict(sorted(exits.items()))
    if dense is not None:
        pairs = [(a, b) for ra, rb in zip(run["argmax"], dense["argmax"]) for a, b in zip(ra[1:], rb[1:])]
        row["token_agreement"] = sum(a == b for a, b in pairs) / len(pairs)
    return row


def run(args) -> dict:
    torch.manual_seed(0)
    config = EngineConfig(model=args.model, dtype=args.dtype, scheduler=SchedulerConfig(max_num_seqs=32))
    llm = LLM(config)
    text = (args.data_dir / "wikitext2-valid.txt").read_text(encoding="utf-8")
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    windows = split_windows(ids[:(TRAIN_WINDOWS + CHECK_WINDOWS) * WINDOW], WINDOW)
    num_layers = llm.engine.model_config.num_layers
    layers = args.exit_layers or default_exit_layers(num_layers)
    found = calibrate_exits(llm, windows[:TRAIN_WINDOWS], windows[TRAIN_WINDOWS:], layers, (args.agreement,))
    plan = exit_plan(llm.engine.model_config, found, args.agreement, f"exit-{args.agreement}")
    plan_path = args.output_dir / "exit-plan.json"
    plan.save(plan_path)
    del llm
    llm = LLM(EngineConfig(model=args.model, dtype=args.dtype, plan=str(plan_path),
                           scheduler=SchedulerConfig(max_num_seqs=32)))
    span = args.context + args.tokens + 1
    tail = ids[-args.passages * span:]
    passages = [tail[i * span:(i + 1) * span] for i in range(args.passages)]
    base = dict(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    dense_params = SamplingParams(**base, pruning=RequestPruning(early_exit=False))
    teacher_forced(llm, passages[:1], args.context, dense_params)                # warm-up
    settings = [("calibrated", None)] + [(f"threshold {t}", t) for t in args.thresholds]
    dense = teacher_forced(llm, passages, args.context, dense_params)
    dense_row = summarize(dense, None, num_layers)
    rows = []
    for label, threshold in settings:
        params = SamplingParams(**base, pruning=RequestPruning(early_exit=True, exit_threshold=threshold))
        batched = teacher_forced(llm, passages, args.context, params)
        again = teacher_forced(llm, passages, args.context, dense_params)          # dense next to it
        row = {"setting": label, "threshold": threshold, **summarize(batched, dense, num_layers)}
        row["perplexity_ratio"] = row["perplexity"] / dense_row["perplexity"]
        row[f"b{len(passages)}_speedup"] = row["decode_tok_s"] / (again["decode_tokens"] / again["decode_seconds"])
        single, single_dense = 0.0, 0.0
        for i, passage in enumerate(passages):
            order = (params, dense_params) if i % 2 else (dense_params, params)
            for p in order:
                r = teacher_forced(llm, [passage], args.context, p)
                if p is params:
                    single += r["decode_seconds"]
                else:
                    single_dense += r["decode_seconds"]
        row["b1_speedup"] = single_dense / single
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return {"command": "python -m trident.bench.early_exit " + " ".join(sys.argv[1:]), "model": args.model,
            "dtype": llm.engine.dtype, "machine": machine_info(), "exit_layers": layers,
            "agreement_target": args.agreement, "passages": len(passages), "context": args.context,
            "tokens": args.tokens, "dense": dense_row,
            "calibration": {str(i): {k: v for k, v in e.items() if k != "weight"} for i, e in found["layers"].items()},
            "rows": rows}


def plot(result: dict, path: Path) -> None:
    """Perplexity ratio and token agreement against batch-1 decode speedup, one point per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "perplexity_ratio", "perplexity vs dense (lower is better)"),
                           (axes[1], "token_agreement", "teacher-forced token agreement with dense")):
        ax.plot([1.0] + [r["b1_speedup"] for r in rows], [1.0] + [r[key] for r in rows], marker="o")
        for r in rows:
            ax.annotate(f"{r['setting']} ({r['exit_rate']:.0%} exit)", (r["b1_speedup"], r[key]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.annotate("dense", (1.0, 1.0), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set_xlabel("batch-1 decode speedup over dense (same run)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if rows and max(r["perplexity_ratio"] for r in rows) > 4:
        axes[0].set_yscale("log")
    fig.suptitle(f"Early exit on {result['model']}: the threshold sweep")
    save_figure(fig, path)


def markdown_table(result: dict) -> str:
    n = result["passages"]
    caption = (f"`{result['command']}` — {result['model']}, {result['dtype']}, {result['machine']['threads']} threads; "
               f"exits after layers {result['exit_layers']} (0-based); {n} held-out WikiText-2 passages, "
               f"{result['tokens']} teacher-forced decode steps each after a {result['context']}-token prompt. "
               f"Dense perplexity {result['dense']['perplexity']:.2f}.")
    columns = ["setting", "tokens exited", "mean layers", "token agreement", "perplexity vs dense", "b1 decode",
               f"b{n} decode"]
    return markdown(caption, columns, [
        [r["setting"], f"{r['exit_rate']:.1%}", f"{r['mean_layers']:.1f}", f"{r['token_agreement']:.3f}",
         f"{r['perplexity_ratio']:.3f}x", f"{r['b1_speedup']:.2f}x", f"{r[f'b{n}_speedup']:.2f}x"]
        for r in result["rows"]])


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("trident.bench.early_exit", __doc__)
    ap.add_argument("--exit-layers", help="comma-separated layers (default: from half the depth on)")
    ap.add_argument("--agreement", type=float, default=DEFAULT_AGREEMENT, help="target of the calibrated thresholds")
    ap.add_argument("--thresholds", default="0.95,0.9,0.8,0.7,0.5", help="one-threshold settings (comma-separated)")
    ap.add_argument("--passages", type=positive_int, default=8)
    ap.add_argument("--context", type=positive_int, default=64)
    ap.add_argument("--tokens", type=positive_int, default=128)
    ap.add_argument("--output-dir", type=Path, default=Path("bench/results/early-exit-float32"))
    args = ap.parse_args(argv)
    args.exit_layers = [int(x) for x in args.exit_layers.split(",")] if args.exit_layers else None
    args.thresholds = [float(x) for x in args.thresholds.split(",") if x.strip()]
    require_writable(args.output_dir / "early_exit.json")
    result = run(args)
    (args.output_dir / "early_exit.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output_dir / "early_exit.md").write_text(markdown_table(result))
    plot(result, args.output_dir / "early_exit.png")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
