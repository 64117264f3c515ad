"""Lossless self-speculative decoding against dense decoding, every figure from one run.

    python -m trident.bench.speculative [--model smollm2-135m-instruct] [--dtype float32]
        [--instructions 8] [--max-tokens 64] [--skips 4,8] [--draft-tokens 1,2,3]
        [--output-dir bench/results/speculative-float32]

Drafts: the served model without its N layers of lowest Block Influence, measured here on
--calibration-tokens of WikiText-2 as `trident calibrate` ranks them. One engine serves every row
(the draft is switched between runs), so dense and speculative share weights, threads and cache.
Per draft and draft length, each next to a dense run made just before it:
- batch 1: greedy decode tok/s of each Alpaca instruction alone (prefill excluded), and batch 8:
  all of them at once;
- quality: instructions whose greedy tokens equal dense's (the mode is lossless: all of them);
- acceptance: accepted / drafted tokens, and tokens emitted per verify pass;
- cost model at batch 1: a draft pass and a verify pass against a dense decode step, in ms, and
  the speedup a draft that cost nothing would give at the measured acceptance (the ceiling any
  cheaper draft of the same quality could reach). Writes JSON, a Markdown table and a PNG.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from trident.bench.datasets import load_alpaca, positive_int, require_writable
from trident.bench.inprocess import model_parser
from trident.bench.machine import machine_info
from trident.bench.report import markdown, save_figure
from trident.engine.config import EngineConfig, SchedulerConfig, SpeculativeConfig
from trident.engine.llm import LLM
from trident.engine.calibration.evaluate import token_windows
from trident.engine.calibration.statistics import collect_stats, importance
from trident.engine.calibration.depth import rank_layers
from trident.engine.pruning.length import RequestPruning
from trident.engine.sampling_params import SamplingParams


def chat_prompt(llm: LLM, instruction: str) -> list[int]:
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": instruction}])
    return llm.tokenizer.encode(text, add_special_tokens=False)


class StepTimes:
    """Sums the runner's step and draft times while installed."""

    def __init__(self, llm: LLM) -> None:
        self.runner = llm.engine.runner
        self.execute = self.runner.execute
        self.step = self.draft = 0.0
        self.steps = 0

    def __enter__(self):
        def timed(sched):
            out = self.execute(sched)
            self.step += out.step_time
            self.draft += out.draft_time
            self.steps += 1
            return out
        self.runner.execute = timed
        return self

    def __exit__(self, *exc):
        self.runner.execute = self.execute


def decode(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Run `prompts` together; time from the step after every prompt has its first token to the
    end (the decode phase), with the runner's own step and draft times."""
    engine = llm.engine
    ids = [f"bench-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    first: dict[str, int] = {}
    done: dict = {}
    while len(first) < len(ids):
        for out in engine.step():
            first.setdefault(out.request_id, out.num_output_tokens)
            if out.finished:
                done[out.request_id] = out
    with StepTimes(llm) as times:
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        seconds = time.perf_counter() - start
    outs = [done[r] for r in ids]
    tokens = sum(o.num_output_tokens for o in outs) - sum(first.values())
    spec = [o.pruning.get("speculative", {}) for o in outs]
    return {"tokens": [o.outputs[0].token_ids for o in outs], "decode_tokens": tokens, "seconds": seconds,
            "tok_s": tokens / seconds, "steps": times.steps, "step_seconds": times.step,
            "draft_seconds": times.draft, "drafted": sum(s.get("draft_tokens", 0) for s in spec),
            "accepted": sum(s.get("accepted_tokens", 0) for s in spec),
            "verify_steps": sum(s.get("verify_steps", 0) for s in spec)}


def run(args) -> dict:
    torch.manual_seed(0)
    llm = LLM(EngineConfig(model=args.model, dtype=args.dtype, scheduler=SchedulerConfig(max_num_seqs=16),
                           speculative=SpeculativeConfig("0", num_draft_tokens=1)))
    engine = llm.engine
    text = (args.data_dir / "wikitext2-valid.txt").read_text(encoding="utf-8")
    windows = token_windows(llm.tokenizer, text, args.calibration_tokens, min(512, args.calibration_tokens))
    order = rank_layers(importance(llm, collect_stats(llm, windows)))
    tasks = load_alpaca(args.data_dir / "alpaca-seed-tasks.jsonl")[:args.instructions]
    prompts = [chat_prompt(llm, task.prompt) for task in tasks]
    base = dict(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    dense_params = SamplingParams(**base, pruning=RequestPruning(speculative=False))
    decode(llm, prompts[:2], dense_params)                                   # warm-up
    rows = []
    for skip in args.skips:
        engine.set_draft(order[:skip])
        for k in args.draft_tokens:
            spec_params = SamplingParams(**base, pruning=RequestPruning(num_draft_tokens=k))
            row = {"skip": skip, "skipped_layers": sorted(order[:skip]), "draft_tokens": k}
            for batch, label in ((1, "b1"), (len(prompts), f"b{len(prompts)}")):
                groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
                dense, spec = [], []
                for i, g in enumerate(groups):          # side by side, the order alternating
                    for params, runs in ((dense_params, dense), (spec_params, spec))[::1 if i % 2 else -1]:
                        runs.append(decode(llm, g, params))
                tok = lambda runs, key: sum(r[key] for r in runs)                       # noqa: E731
                row[f"{label}_dense_tok_s"] = tok(dense, "decode_tokens") / tok(dense, "seconds")
                row[f"{label}_spec_tok_s"] = tok(spec, "decode_tokens") / tok(spec, "seconds")
                row[f"{label}_speedup"] = row[f"{label}_spec_tok_s"] / row[f"{label}_dense_tok_s"]
                row[f"{label}_identical"] = sum(a == b for d, s in zip(dense, spec)
                                                for a, b in zip(d["tokens"], s["tokens"]))
                if batch == 1:
                    drafted, accepted, verifies = (tok(spec, key) for key in ("drafted", "accepted", "verify_steps"))
                    row["acceptance"] = accepted / max(drafted, 1)
                    row["tokens_per_verify"] = (accepted + verifies) / max(verifies, 1)
                    row["dense_step_ms"] = 1e3 * tok(dense, "step_seconds") / tok(dense, "steps")
                    row["draft_pass_ms"] = 1e3 * tok(spec, "draft_seconds") / max(drafted, 1)
                    row["verify_pass_ms"] = 1e3 * (tok(spec, "step_seconds") - tok(spec, "draft_seconds")) / tok(spec, "steps")
                    # The speedup a draft that cost nothing would give at this acceptance.
                    row["free_draft_ceiling"] = row["tokens_per_verify"] * row["dense_step_ms"] / row["verify_pass_ms"]
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return {"command": "python -m trident.bench.speculative " + " ".join(sys.argv[1:]), "model": args.model,
            "dtype": engine.dtype, "device": "cpu", "machine": machine_info(), "instructions": len(prompts),
            "max_tokens": args.max_tokens, "calibration_tokens": args.calibration_tokens,
            "layer_order_by_block_influence": order, "rows": rows}


def plot(result: dict, path: Path) -> None:
    """Batch-1 speedup against acceptance, per draft and draft length, with the free-draft ceiling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for skip in sorted({r["skip"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["skip"] == skip]
        line, = ax.plot([r["draft_tokens"] for r in rows], [r["b1_speedup"] for r in rows], marker="o",
                        label=f"draft skips {skip} layers")
        ax.plot([r["draft_tokens"] for r in rows], [r["free_draft_ceiling"] for r in rows], linestyle="--",
                color=line.get_color(), label="  a free draft at the same acceptance")
        for r in rows:
            ax.annotate(f"{r['acceptance']:.2f}", (r["draft_tokens"], r["b1_speedup"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xlabel("draft tokens per step (labels: acceptance)")
    ax.set_ylabel("batch-1 decode speedup over dense (same run)")
    ax.set_title(f"Self-speculative decoding on {result['model']} (greedy output identical)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def markdown_table(result: dict) -> str:
    n = result["instructions"]
    caption = (f"`{result['command']}` — {result['model']}, {result['dtype']}, {result['machine']['threads']} threads, "
               f"{n} Alpaca instructions, {result['max_tokens']} greedy tokens each. Drafts skip the layers of "
               f"lowest Block Influence; every speed ratio is against a dense run made just before it.")
    columns = ["draft skips", "draft tokens", "acceptance", "tokens / verify", f"identical (b1, b{n})", "b1 speedup",
               f"b{n} speedup", "dense step (ms)", "draft pass (ms)", "verify pass (ms)", "free-draft ceiling"]
    return markdown(caption, columns, [
        [f"{r['skip']} layers {r['skipped_layers']}", str(r["draft_tokens"]), f"{r['acceptance']:.2f}",
         f"{r['tokens_per_verify']:.2f}", f"{r['b1_identical']}/{n}, {r[f'b{n}_identical']}/{n}",
         f"{r['b1_speedup']:.2f}x", f"{r[f'b{n}_speedup']:.2f}x", f"{r['dense_step_ms']:.1f}",
         f"{r['draft_pass_ms']:.1f}", f"{r['verify_pass_ms']:.1f}", f"{r['free_draft_ceiling']:.2f}x"]
        for r in result["rows"]])


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("trident.bench.speculative", __doc__)
    ap.add_argument("--instructions", type=positive_int, default=8)
    ap.add_argument("--max-tokens", type=positive_int, default=64)
    ap.add_argument("--calibration-tokens", type=positive_int, default=2048)
    ap.add_argument("--skips", default="4,8", help="layers the draft skips, one draft each (comma-separated)")
    ap.add_argument("--draft-tokens", default="1,2,3", help="draft lengths (comma-separated)")
    ap.add_argument("--output-dir", type=Path, default=Path("bench/results/speculative-float32"))
    args = ap.parse_args(argv)
    args.skips = [int(x) for x in args.skips.split(",")]
    args.draft_tokens = [int(x) for x in args.draft_tokens.split(",")]
    require_writable(args.output_dir / "speculative.json")
    out = args.output_dir
    result = run(args)
    (out / "speculative.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "speculative.md").write_text(markdown_table(result))
    plot(result, out / "speculative.png")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
