"""The length axis against dense on long WikiText contexts, every figure from one run.

    python -m trident.bench.length_sweep [--model smollm2-135m-instruct] [--dtype float32]
        [--context 4000] [--continuation 256] [--passages 4] [--prefill-keeps 0.7,0.5,0.3]
        [--prefill-layer M] [--compare-pools 1,15] [--budgets 128,256,512] [--streams 8]
        [--prefill-recent 256] [--max-num-batched-tokens 512] [--recent-only 256,1024] [--output-dir bench/results/length-float32]

Per policy, next to dense:
- prefill: time to first token of one --context-token prompt, in rounds that rotate which policy
  runs first; the ratio is the median of the per-round ratios;
- decode: --streams sequences of --context tokens decoding side by side with dense's, one engine
  step each in turn, timed over steps in which all of them decode (tok/s ratio);
- memory: KV blocks per decoding sequence, and how many --context sequences decode at once in a
  KV cache sized for two dense ones (16 offered);
- quality, on held-out passages from the end of WikiText-2: perplexity of a --continuation-token
  continuation teacher-forced after the (pruned) context, teacher-forced token agreement with
  dense (argmax equal given the same prefix), and greedy agreement of 32 free-running tokens;
  --recent-only adds the quality of dense on only the last N context tokens, the reference a
  budget of N keys would have to beat.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from trident.bench.datasets import WIKITEXT_FILE, positive_int, require_data_file, require_writable
from trident.bench.inprocess import model_parser
from trident.engine.calibration.timing import lockstep_speed, paired_ratio
from trident.bench.machine import machine_info
from trident.bench.report import markdown, save_figure
from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from trident.engine.llm import LLM
from trident.engine.calibration.evaluate import forced_continuation, token_windows
from trident.engine.pruning.length import RequestPruning, default_prefill_layer
from trident.engine.pruning.plan import LengthPolicy, PruningPlan
from trident.engine.sampling_params import SamplingParams

GREEDY_TOKENS = 32
ADMISSION_OFFERED = 16


def make_llm(args, num_blocks: int | None = None, max_model_len: int | None = None, plan: str | None = None) -> LLM:
    """An engine without prefix caching (every run recomputes its prompts)."""
    return LLM(EngineConfig(model=args.model, dtype=args.dtype, plan=plan,
                            cache=CacheConfig(enable_prefix_caching=False, num_blocks=num_blocks),
                            scheduler=SchedulerConfig(max_model_len=max_model_len or args.context + args.continuation + 64,
                                                      max_num_batched_tokens=args.max_num_batched_tokens)))


def length_plan(llm: LLM, folder: Path, **fields) -> str:
    """A plan file, written into `folder`, for `llm`'s model that prunes nothing statically and
    sets the length policy's `fields` (e.g. prefill_pool, prefill_recent)."""
    plan = PruningPlan.dense(llm.engine.model_config)
    plan.name = "length-" + "-".join(f"{k}-{v}" for k, v in fields.items())
    plan.length = LengthPolicy(**fields)
    path = folder / f"plan-{plan.name}.json"
    plan.save(path)
    return str(path)


def quality(llm: LLM, passages, args, pruning, dense: dict | None) -> dict:
    forced = forced_continuation(llm, passages, args.context, pruning)
    logprobs = [lp for passage in forced for lp, _ in passage]
    argmax = [[a for _, a in passage] for passage in forced]
    greedy = [o.outputs[0].token_ids for o in llm.generate(
        [p[:args.context] for p in passages],
        SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True, pruning=pruning))]
    out = {"perplexity": math.exp(-statistics.fmean(logprobs)), "argmax": argmax, "greedy": greedy}
    if dense is not None:
        pairs = [(a, b) for mine, ref in zip(argmax, dense["argmax"]) for a, b in zip(mine, ref)]
        out["token_agreement"] = sum(a == b for a, b in pairs) / len(pairs)
        out["greedy_agreement"] = statistics.fmean(common_prefix(a, b) / GREEDY_TOKENS
                                                   for a, b in zip(greedy, dense["greedy"]))
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def ttft_rounds(llm: LLM, prompt: list[int], policies: list[tuple[str, RequestPruning | None]], rounds: int) -> dict:
    """{label: [seconds to first token, per round]}, the policies' order rotated every round."""
    times = {label: [] for label, _ in policies}
    llm.generate([prompt], SamplingParams(max_tokens=1))                                   # warm-up
    for r in range(rounds):
        for k in range(len(policies)):
            label, pruning = policies[(r + k) % len(policies)]
            start = time.perf_counter()
            llm.generate([prompt], SamplingParams(max_tokens=1, pruning=pruning))
            times[label].append(time.perf_counter() - start)
    return times


def admission(args, pruning, decode_tokens: int) -> dict:
    """In a KV cache sized for two dense --context sequences, offer 16 of them and step until the
    first finishes: the most that decode at once, and the KV blocks each decoding one holds."""
    per_seq = -(-(args.context + decode_tokens + 1) // CacheConfig.block_size)
    llm = make_llm(args, num_blocks=2 * per_seq + 2, max_model_len=args.context + decode_tokens + 8)
    engine = llm.engine
    prompts = passages_for(llm, args, ADMISSION_OFFERED, args.context, offset=1)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"adm-{i}", prompt, SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True,
                                                                pruning=pruning))
    peak, blocks = 0, []
    while engine.has_unfinished_requests():
        engine.step()
        decoding = [s for s in engine.scheduler.running if s.num_output_tokens > 0]
        peak = max(peak, len(decoding))
        blocks += [len(s.block_table) for s in decoding]
        if any(req.finished for req in engine.requests.values()) or len(engine.requests) < ADMISSION_OFFERED:
            break
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    return {"peak_decoding": peak, "blocks_per_seq": statistics.fmean(blocks) if blocks else 0.0,
            "num_blocks": engine.block_manager.num_blocks, "preemptions": engine.scheduler.num_preemptions}


def passages_for(llm: LLM, args, count: int, length: int, offset: int = 0) -> list[list[int]]:
    """`count` consecutive `length`-token passages from the end of WikiText-2 (held out from
    calibration, which reads its start); `offset` skips that many passages first."""
    text = require_data_file(args.data_dir, WIKITEXT_FILE).read_text(encoding="utf-8")
    windows = token_windows(llm.tokenizer, text, (count + offset) * length, length, from_end=True)
    if len(windows) < count + offset:
        raise SystemExit(f"error: WikiText-2 holds fewer than {count + offset} passages of {length} tokens")
    return windows[offset:offset + count]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [(axes[0], "prefill", "ttft_speedup", "time-to-first-token speedup over dense"),
              (axes[1], "decode", "decode_speedup", "8-stream decode speedup over dense"),
              (axes[2], "decode", "block_reduction", "fewer KV blocks per sequence (x)")]
    for ax, kind, key, label in panels:
        points = [r for r in rows if r["kind"] in (kind, "dense") and r.get(key) is not None]
        ax.plot([r[key] for r in points], [r["perplexity"] for r in points], marker="o")
        for r in points:
            ax.annotate(r["policy"], (r[key], r["perplexity"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"{label} (same run)")
        ax.set_ylabel("continuation perplexity (lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle("Length axis: quality vs speed and memory on long WikiText contexts")
    save_figure(fig, path)


def markdown_table(result: dict) -> str:
    """The sweep's rows as a Markdown table (quality next to every speed and memory figure)."""
    def cell(row: dict, key: str, fmt: str, unit: str = "") -> str:
        value = row.get(key)
        return "" if value is None else format(value, fmt) + unit

    caption = (f"`{result['command']}` — {result['model']}, {result['dtype']}, {result['context']}-token contexts, "
               f"{result['continuation']}-token teacher-forced continuations over {result['passages']} passages; "
               f"{result['streams']}-stream decode; admission in {result['kv_cache_blocks_admission']} KV blocks.")
    columns = ["policy", "perplexity", "vs dense", "token agreement", "greedy agreement", "TTFT speedup",
               "decode speedup", "KV blocks / seq", "fewer blocks", "admitted"]
    return markdown(caption, columns, [
        [row["policy"], cell(row, "perplexity", ".2f"), cell(row, "perplexity_ratio", ".3f") or "1",
         cell(row, "token_agreement", ".3f"), cell(row, "greedy_agreement", ".3f"), cell(row, "ttft_speedup", ".2f", "x"),
         cell(row, "decode_speedup", ".2f", "x"), cell(row, "blocks_per_seq", ".1f"),
         cell(row, "block_reduction", ".1f", "x"), cell(row, "admitted", "d")]
        for row in result["rows"]])


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("trident.bench.length_sweep", __doc__)
    ap.add_argument("--context", type=positive_int, default=4000)
    ap.add_argument("--continuation", type=positive_int, default=256)
    ap.add_argument("--passages", type=positive_int, default=4)
    ap.add_argument("--prefill-keeps", default="0.7,0.5,0.3")
    ap.add_argument("--prefill-layer", type=int, help="layer the keeps prune after (default: the server's default)")
    ap.add_argument("--prefill-recent", type=int, default=LengthPolicy().prefill_recent,
                    help="last prompt tokens prefill dropping always keeps (the served plan's prefill_recent)")
    ap.add_argument("--compare-pools", default="",
                    help="prefill_pool values whose quality to measure too, each under a plan that sets it (comma-separated)")
    ap.add_argument("--budgets", default="128,256,512")
    ap.add_argument("--recent-only", default="",
                    help="context lengths N for reference rows: dense on only the last N context tokens, what N "
                         "contiguous recent keys give (comma-separated)")
    ap.add_argument("--max-num-batched-tokens", type=positive_int, default=SchedulerConfig.max_num_batched_tokens,
                    help="the engines' step size; prefill dropping scores each chunk of this many tokens by its own last queries")
    ap.add_argument("--streams", type=positive_int, default=8)
    ap.add_argument("--decode-tokens", type=positive_int, default=32)
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--admission-tokens", type=positive_int, default=160,
                    help="decode tokens of each offered sequence in the admission run")
    ap.add_argument("--output-dir", type=Path, default=Path("bench/results/length-float32"))
    args = ap.parse_args(argv)
    if args.prefill_recent < 0:
        ap.error("--prefill-recent must be >= 0")
    keeps = [float(f) for f in args.prefill_keeps.split(",") if f]
    budgets = [int(b) for b in args.budgets.split(",") if b]
    for name in ("length_sweep.json", "length_sweep.md", "length_sweep.png"):
        require_writable(args.output_dir / name)
    torch.manual_seed(0)

    llm = make_llm(args)
    folder = Path(tempfile.mkdtemp())
    if args.prefill_recent:
        llm = make_llm(args, plan=length_plan(llm, folder, prefill_recent=args.prefill_recent))
    num_layers = llm.engine.model_config.num_layers
    layer = default_prefill_layer(num_layers) if args.prefill_layer is None else args.prefill_layer
    pools = [int(p) for p in args.compare_pools.split(",") if p]
    suffix = f", pool {LengthPolicy().prefill_pool}" if pools else ""      # the default pool, named next to others
    prefill_policies = [(f"keep {f:g} after layer {layer}{suffix}", RequestPruning(prefill_keep=[(layer, f)]))
                        for f in keeps]
    decode_policies = [(f"kv budget {b}", RequestPruning(kv_budget=b)) for b in budgets]
    passages = passages_for(llm, args, args.passages, args.context + args.continuation)

    print("quality ...", file=sys.stderr)
    dense_quality = quality(llm, passages, args, None, None)
    rows = [{"policy": "dense", "kind": "dense", "perplexity": dense_quality["perplexity"], "token_agreement": 1.0,
             "greedy_agreement": 1.0, "ttft_speedup": 1.0, "decode_speedup": 1.0, "block_reduction": 1.0}]
    for kind, policies in (("prefill", prefill_policies), ("decode", decode_policies)):
        for label, pruning in policies:
            q = quality(llm, passages, args, pruning, dense_quality)
            rows.append({"policy": label, "kind": kind, "pruning": {k: v for k, v in vars(pruning).items() if v is not None},
                         "perplexity": q["perplexity"], "perplexity_ratio": q["perplexity"] / dense_quality["perplexity"],
                         "token_agreement": q["token_agreement"], "greedy_agreement": q["greedy_agreement"]})
            print(f"  {label}: {rows[-1]}", file=sys.stderr)
    for n in (int(x) for x in args.recent_only.split(",") if x):
        if not 0 < n < args.context:
            raise SystemExit(f"error: --recent-only {n} must be between 0 and --context {args.context}")
        q = quality(llm, [p[args.context - n:] for p in passages], argparse.Namespace(**{**vars(args), "context": n}),
                    None, dense_quality)
        rows.append({"policy": f"dense on the last {n} tokens", "kind": "reference", "perplexity": q["perplexity"],
                     "perplexity_ratio": q["perplexity"] / dense_quality["perplexity"],
                     "token_agreement": q["token_agreement"], "greedy_agreement": q["greedy_agreement"]})
        print(f"  {rows[-1]['policy']}: {rows[-1]}", file=sys.stderr)
    for pool in pools:
        pooled = make_llm(args, plan=length_plan(llm, folder, prefill_pool=pool, prefill_recent=args.prefill_recent))
        for label, pruning in prefill_policies:
            label = label.removesuffix(suffix)
            q = quality(pooled, passages, args, pruning, dense_quality)
            rows.append({"policy": f"{label}, pool {pool}", "kind": "prefill", "perplexity": q["perplexity"],
                         "pruning": {**{k: v for k, v in vars(pruning).items() if v is not None}, "prefill_pool": pool},
                         "perplexity_ratio": q["perplexity"] / dense_quality["perplexity"],
                         "token_agreement": q["token_agreement"], "greedy_agreement": q["greedy_agreement"]})
            print(f"  {rows[-1]['policy']}: {rows[-1]}", file=sys.stderr)
        del pooled
    by_label = {r["policy"]: r for r in rows}

    print("time to first token ...", file=sys.stderr)
    times = ttft_rounds(llm, passages[0][:args.context], [("dense", None)] + prefill_policies, args.rounds)
    for label, _ in prefill_policies:
        by_label[label]["ttft_s"] = statistics.median(times[label])
        by_label[label]["ttft_speedup"] = paired_ratio(times["dense"], times[label])
    by_label["dense"]["ttft_s"] = statistics.median(times["dense"])
    stream_prompts = passages_for(llm, args, args.streams, args.context, offset=args.passages)
    del llm

    print("decode, side by side ...", file=sys.stderr)
    # Early streams decode while later ones prefill: room for a token per step of the others' prefill.
    longest = args.context + args.decode_tokens + 2 + args.streams * -(-args.context // args.max_num_batched_tokens)
    engines = [make_llm(args, num_blocks=args.streams * -(-longest // CacheConfig.block_size) + 16)
               for _ in range(1 + len(decode_policies))]
    speeds = lockstep_speed(engines, [stream_prompts] * len(engines), args.decode_tokens,
                            pruning=[None] + [p for _, p in decode_policies], warm_up=False)
    del engines
    by_label["dense"]["decode_tok_s"] = speeds[0][1]
    for (label, _), (_, decode) in zip(decode_policies, speeds[1:]):
        by_label[label]["decode_tok_s"] = decode
        by_label[label]["decode_speedup"] = decode / speeds[0][1]

    print("admission ...", file=sys.stderr)
    dense_adm = admission(args, None, args.admission_tokens)
    by_label["dense"].update(admitted=dense_adm["peak_decoding"], blocks_per_seq=dense_adm["blocks_per_seq"])
    for label, pruning in decode_policies:
        adm = admission(args, pruning, args.admission_tokens)
        by_label[label].update(admitted=adm["peak_decoding"], blocks_per_seq=adm["blocks_per_seq"],
                               admitted_ratio=adm["peak_decoding"] / max(1, dense_adm["peak_decoding"]),
                               block_reduction=dense_adm["blocks_per_seq"] / max(adm["blocks_per_seq"], 1e-9))
    result = {"command": "python -m trident.bench.length_sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(),
              "model": args.model, "dtype": args.dtype, "context": args.context, "continuation": args.continuation,
              "passages": args.passages, "streams": args.streams, "kv_cache_blocks_admission": dense_adm["num_blocks"],
              "rows": rows}
    (args.output_dir / "length_sweep.json").write_text(json.dumps(result, indent=1))
    (args.output_dir / "length_sweep.md").write_text(markdown_table(result))
    plot(rows, args.output_dir / "length_sweep.png")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
