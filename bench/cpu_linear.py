"""The CPU GEMM providers of kernels/cpu_gemm.py on this CPU: per projection, and in the engine.

    python -m trident.bench.cpu_linear [--rows 1,4,8,16] [--json FILE]
    python -m trident.bench.cpu_linear --engine [--plans width-0.20] [--batches 1,16] [--rounds 3]

Default: for each row count, the weight-read rate (GB/s) of every provider over passes through a
model of random weights with SmolLM2-135M's shapes (30 layers of qkv, o, gate_up and down, then the
LM head; other shapes by flag), timed exactly as the engine's start-up measurement times the real
model, and the provider the dispatch picks.

--engine: the engine's decode steps (prompts of --window tokens, --batches sequences at a time),
dense and each plan, with every decode-sized product through F.linear (`torch`), through the
weight-major form that was the fixed rule before the measured dispatch (`torch-wm-pad`), and
through the measured dispatch (`auto`), in alternating rounds; each setting's median step time.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

from trident.bench.machine import machine_info
from trident.kernels import cpu_gemm

ENGINE_SETTINGS = ("torch", "torch-wm-pad", "auto")


def shapes(hidden: int, ffn: int, q_size: int, kv_size: int, vocab: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection."""
    return {"qkv_proj": (q_size + 2 * kv_size, hidden), "o_proj": (hidden, q_size),
            "gate_up_proj": (2 * ffn, hidden), "down_proj": (hidden, ffn), "lm_head": (vocab, hidden)}


def engine_ab(args) -> tuple[list[dict], dict]:
    """Median decode-step ms per plan, batch size and GEMM setting, settings interleaved by round;
    and the measured dispatch's choices (of the last plan)."""
    from trident.bench.decode_breakdown import decode_steps
    from trident.bench.inprocess import DATA_DIR, engine_for, plan_runs, speed_batch_prompts
    from trident.engine.loader import cache_root
    from trident.engine.pruning.profiles import profile_dir

    runs = plan_runs(args.plans, profile_dir(args.model), args.model)
    text = (DATA_DIR / "wikitext2-valid.txt").read_text()
    steps: dict[tuple[str, int, str], list[float]] = {}
    measured = {}
    for r in range(args.rounds):
        for label, plan in runs:
            llm = engine_for(args.model, plan, args)
            engine = llm.engine
            weights = [m.weight for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
            for batch in args.batches:
                prompts = speed_batch_prompts(text, batch, args.window)(llm.tokenizer)
                order = ENGINE_SETTINGS if r % 2 == 0 else ENGINE_SETTINGS[::-1]
                for setting in order:
                    cpu_gemm.configure(setting, weights, max(args.batches), cache_root())
                    if setting == "auto":
                        measured = cpu_gemm.DISPATCH.summary()
                    decode_steps(llm, prompts, 2, profiled=False)                       # warm-up
                    steps.setdefault((label, batch, setting), []).extend(
                        decode_steps(llm, prompts, args.decode_tokens, profiled=False))
            del llm, engine, weights
            gc.collect()
    results = []
    print("| plan | batch | " + " | ".join(f"{s} ms/step" for s in ENGINE_SETTINGS) +
          " | auto vs torch | auto vs torch-wm-pad |\n|---|---:|" + "---:|" * (len(ENGINE_SETTINGS) + 2))
    for label, _ in runs:
        for batch in args.batches:
            ms = {s: 1000 * statistics.median(steps[label, batch, s]) for s in ENGINE_SETTINGS}
            results.append({"plan": label, "batch": batch, "ms_per_step": ms,
                            "auto_speedup_vs_torch": ms["torch"] / ms["auto"],
                            "auto_speedup_vs_torch_wm_pad": ms["torch-wm-pad"] / ms["auto"]})
            print(f"| {label} | {batch} | " + " | ".join(f"{ms[s]:.1f}" for s in ENGINE_SETTINGS) +
                  f" | {ms['torch'] / ms['auto']:.2f}x | {ms['torch-wm-pad'] / ms['auto']:.2f}x |", flush=True)
    return results, measured


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trident.bench.cpu_linear", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--q-size", type=int, default=576)
    ap.add_argument("--kv-size", type=int, default=192)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--engine", action="store_true", help="time the engine's decode steps instead")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--plans", default="", help="--engine: comma-separated plan names next to dense")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=int, default=512, help="--engine: prompt tokens")
    ap.add_argument("--batches", default="1,16", help="--engine: comma-separated sequences decoded together")
    ap.add_argument("--decode-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    command = "python -m trident.bench.cpu_linear " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        counts = [int(r) for r in (args.batches if args.engine else args.rows).split(",") if r]
    except ValueError:
        ap.error("--rows and --batches take comma-separated integers")
    if not counts or min(counts) < 1 or max(counts) > cpu_gemm.MAX_ROWS:
        ap.error(f"row counts must be 1 to {cpu_gemm.MAX_ROWS}, the decode sizes the dispatch serves")
    report = {"command": command, "machine": machine_info(), "torch": torch.__version__}
    if args.engine:
        args.batches, args.dtype, args.max_tokens = counts, "float32", args.decode_tokens
        results, measured = engine_ab(args)
        report.update(context=args.window, decode_tokens=args.decode_tokens, rounds=args.rounds,
                      results=results, measured_dispatch=measured)
    else:
        torch.manual_seed(0)
        projections = shapes(args.hidden, args.ffn, args.q_size, args.kv_size, args.vocab)
        layer = [projections[name] for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")]
        weights = [torch.rand(*shape) for _ in range(args.layers) for shape in layer]
        weights.append(torch.rand(*projections["lm_head"]))
        names = list(cpu_gemm.PROVIDERS)
        results = []
        print("| rows | " + " | ".join(f"{p} GB/s" for p in names) + " | chosen |\n|---:|" + "---:|" * len(names) + "---|")
        for rows in counts:
            m = cpu_gemm.time_providers(weights, rows)
            results.append({"rows": rows, "gb_s": m.gb_s, "chosen": m.provider})
            cells = " | ".join(f"{m.gb_s[p]:.1f}" if p in m.gb_s else "" for p in names)
            print(f"| {rows} | {cells} | {m.provider} |", flush=True)
        report.update(dtype="float32", shapes=projections, layers=args.layers,
                      weight_bytes=sum(w.numel() * 4 for w in weights), results=results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
