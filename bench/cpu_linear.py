"""F.linear against the weight-major form kernels.linear uses for small batches, on this CPU.

    python -m trident.bench.cpu_linear [--dtype float32] [--rows 1,8,64,1024] [--json FILE]
    python -m trident.bench.cpu_linear --engine [--plans width-0.20] [--rounds 3]

For each projection of the model (SmolLM2-135M's shapes by default) and each row count: the median
time per call of F.linear(x, W) and of (W @ x^T)^T made contiguous (one row padded to two, as
kernels.linear does; at one row the unpadded product is timed too). Each timing cycles through
copies of W that together exceed the CPU caches, as a forward pass streams 30 layers of weights;
a single hot W would measure cache bandwidth instead. `kernels.linear.SMALL_BATCH_ROWS` is set from
these figures.

--engine times the decode steps of the width sweep's speed batch (8 prompts of 512 tokens), dense
and each plan, with the dispatch off (every projection through F.linear) and on, in alternating
rounds, and reports each setting's median step time.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from trident.bench.offline import machine_info
from trident.kernels.linear import weight_major_linear

COLD_BYTES = 256 << 20        # weight copies per timing: well past any L3
MAX_COPIES = 1024             # tiny shapes (tests) need no more


def shapes(hidden: int, ffn: int, q_size: int, kv_size: int, vocab: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection."""
    return {"qkv_proj": (q_size + 2 * kv_size, hidden), "o_proj": (hidden, q_size),
            "gate_up_proj": (2 * ffn, hidden), "down_proj": (hidden, ffn), "lm_head": (vocab, hidden)}


def time_form(form, x: torch.Tensor, weights: list[torch.Tensor], repeats: int) -> float:
    """Median ms of one call, over `repeats` passes through every weight copy (one warm-up pass)."""
    for w in weights:
        form(x, w)
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            form(x, w)
        passes.append((time.perf_counter() - start) / len(weights))
    return 1000 * statistics.median(passes)


def engine_ab(args) -> list[dict]:
    """Median decode-step ms with kernels.linear's dispatch off and on, per plan, interleaved."""
    from trident.kernels import linear as kernel_linear
    from trident.bench.decode_breakdown import decode_steps
    from trident.bench.inprocess import DATA_DIR, batch_params, engine_for, plan_runs, speed_batch_prompts
    from trident.engine.pruning.profiles import profile_dir

    runs = plan_runs(args.plans, profile_dir(args.model), args.model)
    prompts_for = speed_batch_prompts((DATA_DIR / "wikitext2-valid.txt").read_text(), args.speed_batch, args.window)
    settings = {"off": 0, "on": kernel_linear.SMALL_BATCH_ROWS}
    steps = {(label, s): [] for label, _ in runs for s in settings}
    for r in range(args.rounds):
        for label, plan in runs:
            llm = engine_for(args.model, plan, args)
            prompts = prompts_for(llm.tokenizer)
            llm.generate(prompts, batch_params(args.decode_tokens))                      # warm-up
            order = list(settings) if r % 2 == 0 else list(settings)[::-1]
            try:
                for setting in order:
                    kernel_linear.SMALL_BATCH_ROWS = settings[setting]
                    steps[label, setting] += decode_steps(llm, prompts, args.decode_tokens, profiled=False)
            finally:
                kernel_linear.SMALL_BATCH_ROWS = settings["on"]
            del llm
            gc.collect()
    results = []
    print("| plan | dispatch off ms/step | on ms/step | speed-up |\n|---|---:|---:|---:|")
    for label, _ in runs:
        off, on = (1000 * statistics.median(steps[label, s]) for s in settings)
        results.append({"plan": label, "off_ms": off, "on_ms": on, "speedup": off / on})
        print(f"| {label} | {off:.1f} | {on:.1f} | {off / on:.2f}x |", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trident.bench.cpu_linear", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rows", default="1,4,8,16,32,64,128,256,1024")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--q-size", type=int, default=576)
    ap.add_argument("--kv-size", type=int, default=192)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--engine", action="store_true", help="time the engine's decode steps instead")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--plans", default="", help="--engine: comma-separated plan names next to dense")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=int, default=512, help="--engine: prompt tokens")
    ap.add_argument("--speed-batch", type=int, default=8, help="--engine: sequences decoded together")
    ap.add_argument("--decode-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    command = "python -m trident.bench.cpu_linear " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.engine:
        if args.dtype != "float32":
            ap.error("--engine runs float32, where the dispatch applies")
        args.max_tokens = args.decode_tokens
        results = engine_ab(args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"command": command, "machine": machine_info(), "torch": torch.__version__,
                                             "batch": args.speed_batch, "context": args.window,
                                             "decode_tokens": args.decode_tokens, "rounds": args.rounds,
                                             "results": results}, indent=1))
        return 0
    dtype = getattr(torch, args.dtype)
    try:
        rows = [int(r) for r in args.rows.split(",") if r]
    except ValueError:
        ap.error(f"--rows takes comma-separated integers, got {args.rows!r}")
    if not rows or min(rows) < 1:
        ap.error("--rows needs row counts >= 1")

    torch.manual_seed(0)
    results = []
    print("| projection | rows | F.linear ms | (W @ x^T)^T ms | speed-up | one row unpadded ms |\n|---|---:|---:|---:|---:|---:|")
    for name, (out_size, in_size) in shapes(args.hidden, args.ffn, args.q_size, args.kv_size, args.vocab).items():
        copies = min(max(2, COLD_BYTES // (out_size * in_size * dtype.itemsize)), MAX_COPIES)
        weights = [torch.randn(out_size, in_size).to(dtype) for _ in range(copies)]
        for n in rows:
            x = torch.randn(n, in_size).to(dtype)
            base = time_form(F.linear, x, weights, args.repeats)
            transposed = time_form(weight_major_linear, x, weights, args.repeats)
            result = {"projection": name, "shape": [out_size, in_size], "rows": n,
                      "linear_ms": base, "weight_major_ms": transposed, "speedup": base / transposed}
            if n == 1:     # the weight-major form pads one row to two; this is the product without it
                result["unpadded_ms"] = time_form(partial(weight_major_linear, pad_one_row=False), x, weights,
                                                  args.repeats)
            results.append(result)
            unpadded = f"{result['unpadded_ms']:.3f}" if n == 1 else ""
            print(f"| {name} {out_size}x{in_size} | {n} | {base:.3f} | {transposed:.3f} | {base / transposed:.2f}x | "
                  f"{unpadded} |", flush=True)
        del weights
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": command,
            "machine": machine_info(),
            "torch": torch.__version__, "dtype": args.dtype, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
