"""Where a batched decode step's time goes, dense against width plans, by kind of work.

    python -m trident.bench.decode_breakdown [--plans width-0.25,width-0.50] [--dtype float32]

Runs the width sweep's speed batch (8 prompts of 512 tokens from the middle of WikiText-2), and
profiles (torch.profiler, CPU self time) every decode step after the whole batch holds its first
token. Ops are grouped into the layers' weight matmuls, the LM head, the KV-cache gather, the
attention op, the KV-cache write and everything else; each group's median over the steps is
reported next to the median wall time of a step in a run without the profiler. Width pruning
can only shrink the first group (and the attention of fewer KV heads), which bounds the decode
speed-up a plan can reach.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from trident.bench.datasets import WIKITEXT_FILE, positive_int, require_data_file, require_writable
from trident.bench.inprocess import DATA_DIR, engine_for, plan_runs, speed_batch_prompts
from trident.engine.calibration.timing import add_batch, batch_params
from trident.engine.llm import LLM
from trident.engine.pruning.profiles import profile_dir

GROUPS = ("layer matmuls", "LM head", "KV gather", "attention", "KV write", "other")


def group_of(name: str, shapes: list, vocab_size: int) -> str:
    """The GROUPS entry of one profiled op, from its name and input shapes."""
    if name in ("aten::mm", "aten::addmm"):
        return "LM head" if any(vocab_size in s for s in shapes if s) else "layer matmuls"
    if name == "aten::index_select" and shapes and len(shapes[0]) == 3:
        return "KV gather"        # rows of a [slots, kv_heads, head_dim] cache
    if name.startswith("aten::_scaled_dot_product") or name.startswith("aten::_flash_attention"):
        return "attention"
    if name == "aten::index_copy_":
        return "KV write"
    return "other"


def decode_steps(llm: LLM, prompts: list[list[int]], decode_tokens: int, profiled: bool) -> list:
    """Prefill the batch, then step it to the end. Returns each decode step's wall time or, when
    `profiled`, its {group: ms} (one profiler per step, so a step that stalls, as a first touch
    of cache pages can, shows up as one outlier instead of raising a mean)."""
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    seqs = add_batch(llm, prompts, decode_tokens, "breakdown")
    while any(seq.num_output_tokens == 0 for seq in seqs):
        engine.step()
    steps = []
    while engine.has_unfinished_requests():
        if not profiled:
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
            continue
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            engine.step()
        ms = dict.fromkeys(GROUPS, 0.0)
        for event in prof.key_averages(group_by_input_shape=True):
            ms[group_of(event.key, event.input_shapes, vocab)] += event.self_cpu_time_total / 1000
        steps.append(ms)
    return steps


def breakdown(model: str, plan: str | None, prompts_for, args) -> dict:
    """Median wall time of a decode step and the median profiled ms of each group over the steps."""
    llm = engine_for(model, plan, args)
    prompts = prompts_for(llm.tokenizer)
    llm.generate(prompts, batch_params(args.decode_tokens))                               # warm-up
    walls = decode_steps(llm, prompts, args.decode_tokens, profiled=False)
    profiled = decode_steps(llm, prompts, args.decode_tokens, profiled=True)
    del llm
    gc.collect()
    return {"step_ms": 1000 * statistics.median(walls),
            "profiled_ms": {g: statistics.median(step[g] for step in profiled) for g in GROUPS}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trident.bench.decode_breakdown", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--plans", default="width-0.25,width-0.50", help="comma-separated plan names or paths")
    ap.add_argument("--plans-dir", type=Path, help="where plan names are looked up (default: the calibration's)")
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--window", type=positive_int, default=512)
    ap.add_argument("--speed-batch", type=positive_int, default=8)
    ap.add_argument("--decode-tokens", type=positive_int, default=32)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    args.max_tokens = args.decode_tokens

    runs = plan_runs(args.plans, args.plans_dir or profile_dir(args.model), args.model)
    try:
        text = require_data_file(args.data_dir, WIKITEXT_FILE).read_text()
        if args.json:                            # fail now, not after minutes of profiling
            require_writable(args.json)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    prompts_for = speed_batch_prompts(text, args.speed_batch, args.window)
    # The first engine of a process ran slower here (its KV gather, 20x under the profiler), which
    # would land on dense: one discarded pass first.
    breakdown(args.model, None, prompts_for, args)
    results = {}
    for label, plan in runs:
        results[label] = breakdown(args.model, plan, prompts_for, args)
        print(f"{label}: {results[label]['step_ms']:.1f} ms per decode step", flush=True)

    labels = list(results)
    rows = ["| ms per decode step | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for group in GROUPS:
        rows.append(f"| {group} (profiled) | " + " | ".join(f"{results[l]['profiled_ms'][group]:.1f}" for l in labels) + " |")
    rows.append("| sum of the medians | " + " | ".join(f"{sum(results[l]['profiled_ms'].values()):.1f}" for l in labels) + " |")
    rows.append("| wall, no profiler (median) | " + " | ".join(f"{results[l]['step_ms']:.1f}" for l in labels) + " |")
    print("\n".join(rows))
    if args.json:                              # its folder was made by require_writable
        args.json.write_text(json.dumps({"command": "python -m trident.bench.decode_breakdown " + " ".join(argv or sys.argv[1:]),
                                         "dtype": args.dtype, "batch": args.speed_batch, "context": args.window,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
