"""`trident bench quality`: perplexity and greedy agreement of any OpenAI-compatible server, and
quality-versus-speed sweeps over pruning settings.

Examples:
    # dense reference, then a pruned run compared with it
    python -m trident.bench.quality --base-url http://127.0.0.1:8000 --reference dense.json --save-reference
    python -m trident.bench.quality --base-url http://127.0.0.1:8001 --reference dense.json
    # one server, per-request profiles; or one server per plan (label=URL)
    python -m trident.bench.quality --sweep dense='{"pruning": "dense"}' balanced='{"pruning": "balanced"}' \
        --output-dir sweep/
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np

from trident.bench import datasets
from trident.bench.agreement import AgreementResult, compare_outputs, greedy_outputs, load_reference, save_reference
from trident.bench.client import ENDPOINT_PATHS, ServerTarget, exit_code, resolve_model
from trident.bench.metrics import summarize
from trident.bench.pareto import SweepPoint, markdown_table, plot_sweep
from trident.bench.perplexity import PerplexityResult, Windows, build_windows, perplexity
from trident.bench.runner import LoadConfig, run_load
from trident.bench.serve import add_target_args, parse_json_object, recorded_command

HTTP_TIMEOUT = httpx.Timeout(3600.0, connect=30.0)


def alpaca_prompts(data_dir: str, num_prompts: int) -> list[str]:
    """The first `num_prompts` alpaca seed prompts in file order (the same set on every run)."""
    tasks = datasets.load_alpaca(datasets.require_data_file(data_dir, datasets.ALPACA_FILE))
    if not 1 <= num_prompts <= len(tasks):
        raise ValueError(f"--num-prompts must be in [1, {len(tasks)}], got {num_prompts}")
    return [t.prompt for t in tasks[:num_prompts]]


def read_text(args: argparse.Namespace) -> str:
    """The perplexity text: --text, or WikiText-2 validation from --data-dir."""
    path = Path(args.text) if args.text else datasets.require_data_file(args.data_dir, datasets.WIKITEXT_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"--text {path} not found")
    return path.read_text(encoding="utf-8")


def parse_sweep(items: list[str], base_url: str) -> list[tuple[str, str, dict]]:
    """["label={json}", "label=http://host:port"] -> [(label, base_url, extra_body)]."""
    points = []
    for item in items:
        label, sep, value = item.partition("=")
        value = value.strip()
        if not sep or not label:
            raise ValueError(f"--sweep {item!r} must look like LABEL=JSON or LABEL=URL")
        if value.startswith(("http://", "https://")):
            points.append((label, value, {}))
        elif value.startswith("{"):
            points.append((label, base_url, parse_json_object(value, f"--sweep {label}")))
        else:
            raise ValueError(f"--sweep {item!r}: the value must be a JSON object or an http(s) URL")
    labels = [p[0] for p in points]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--sweep labels must be unique, got {labels}")
    return points


def _print_quality(label: str, ppl: PerplexityResult | None, agreement: AgreementResult | None) -> None:
    if ppl is not None:
        print(f"[{label}] perplexity {ppl.perplexity:.4f} over {ppl.num_scored_tokens} tokens "
              f"in {ppl.num_windows} windows ({ppl.window_unit})")
    if agreement is not None:
        print(f"[{label}] greedy agreement {agreement.mean_prefix_agreement:.4f}, exact match "
              f"{agreement.exact_match_rate:.2f} over {agreement.num_prompts} prompts ({agreement.unit})")


async def evaluate(args: argparse.Namespace) -> dict:
    """Single-server mode: perplexity, then greedy outputs saved as or compared with --reference."""
    target = ServerTarget(args.base_url, args.model, args.api_key)
    extra = parse_json_object(args.extra_body, "--extra-body")
    result: dict = {"base_url": args.base_url, "extra_body": extra}
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
        model = await resolve_model(client, target)
        result["model"] = model
        ppl = agreement = None
        if not args.skip_ppl:
            windows = await build_windows(client, target, model, read_text(args), args.window, args.num_windows)
            ppl = await perplexity(client, target, model, windows, extra)
            result["perplexity"] = asdict(ppl)
        if not args.skip_agreement and args.reference:
            prompts = alpaca_prompts(args.data_dir, args.num_prompts)
            outputs = await greedy_outputs(client, target, model, prompts, args.endpoint, args.max_tokens, extra,
                                           args.concurrency)
            if args.save_reference:
                meta = {"model": model, "endpoint": args.endpoint, "max_tokens": args.max_tokens, "extra_body": extra}
                save_reference(args.reference, meta, outputs)
                print(f"wrote reference {args.reference} ({len(outputs)} prompts)")
            else:
                agreement = compare_outputs(load_reference(args.reference, args.endpoint, args.max_tokens), outputs)
                result["agreement"] = asdict(agreement)
        elif not args.skip_agreement:
            print("note: no --reference given; greedy agreement skipped", file=sys.stderr)
    _print_quality(model, ppl, agreement)
    return result


async def sweep(args: argparse.Namespace) -> list[SweepPoint]:
    """Perplexity, agreement and a fixed-concurrency throughput run for every sweep point.

    The reference is --reference when given (and not being saved), else the first point's outputs.
    """
    base_extra = parse_json_object(args.extra_body, "--extra-body")
    points = [(label, url, {**base_extra, **extra}) for label, url, extra in parse_sweep(args.sweep, args.base_url)]
    text = None if args.skip_ppl else read_text(args)
    prompts = alpaca_prompts(args.data_dir, args.num_prompts)
    tasks = datasets.load_alpaca(datasets.require_data_file(args.data_dir, datasets.ALPACA_FILE))
    samples = await datasets.alpaca_requests(tasks, args.throughput_prompts, np.random.default_rng(args.seed),
                                             None, args.max_tokens)
    reference = None
    if args.reference and not args.save_reference and not args.skip_agreement:
        reference = load_reference(args.reference, args.endpoint, args.max_tokens)
    windows: Windows | None = None
    results = []
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
        for label, base_url, extra in points:
            target = ServerTarget(base_url, args.model, args.api_key)
            model = await resolve_model(client, target)
            ppl = agreement = None
            if text is not None:
                # windows come from the first point's tokenizer so every point scores the same tokens
                windows = windows or await build_windows(client, target, model, text, args.window, args.num_windows)
                ppl = await perplexity(client, target, model, windows, extra)
            if not args.skip_agreement:
                outputs = await greedy_outputs(client, target, model, prompts, args.endpoint, args.max_tokens, extra,
                                               args.concurrency)
                if reference is None:
                    reference = outputs
                    print(f"[{label}] is the agreement reference")
                    if args.save_reference and args.reference:
                        save_reference(args.reference, {"model": model, "endpoint": args.endpoint,
                                                        "max_tokens": args.max_tokens, "extra_body": extra}, outputs)
                agreement = compare_outputs(reference, outputs)
            # warm-up requests first, so that no point pays for another's cold start
            config = LoadConfig(endpoint=args.endpoint, max_concurrency=args.throughput_concurrency,
                                num_warmups=args.throughput_concurrency, max_tokens=args.max_tokens,
                                extra_body=extra, seed=args.seed, disable_tqdm=True)
            run = await run_load(target, samples, config)
            summary = summarize(run.records, run.duration_s)
            _print_quality(label, ppl, agreement)
            print(f"[{label}] {summary.output_throughput:.2f} output tok/s, {summary.failed} failed")
            for error, count in summary.errors.items():
                print(f"[{label}] failed x{count}: {error}", file=sys.stderr)
            results.append(SweepPoint(
                label=label, base_url=base_url, extra_body=extra,
                perplexity=ppl.perplexity if ppl else None,
                agreement=agreement.mean_prefix_agreement if agreement else None,
                exact_match=agreement.exact_match_rate if agreement else None,
                output_throughput=summary.output_throughput, request_throughput=summary.request_throughput,
                tpot_median_ms=summary.tpot.median_ms, ttft_median_ms=summary.ttft.median_ms, failed=summary.failed,
                errors=summary.errors,
            ))
    return results


def write_sweep(points: list[SweepPoint], output_dir: str, command: list[str]) -> None:
    """sweep.md, sweep.json and sweep.png in `output_dir`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(points)
    (out / "sweep.md").write_text(table, encoding="utf-8")
    document = {"command": command, "points": [asdict(p) for p in points]}
    (out / "sweep.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    plot_sweep(points, out / "sweep.png")
    print(table)
    print(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'sweep.png'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trident bench quality", description=__doc__.splitlines()[0])
    add_target_args(parser)
    parser.add_argument("--text", default=None, help="perplexity text file (default: WikiText-2 validation)")
    parser.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--num-windows", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=16, help="alpaca prompts for greedy agreement")
    parser.add_argument("--max-tokens", type=datasets.positive_int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINT_PATHS), default="chat")
    parser.add_argument("--concurrency", type=datasets.positive_int, default=4, help="greedy requests in flight")
    parser.add_argument("--reference", default=None, help="greedy reference JSON to compare with (or write)")
    parser.add_argument("--save-reference", action="store_true", help="write this run's outputs to --reference")
    parser.add_argument("--extra-body", default="{}",
                        help="JSON object merged into every request body (under each sweep point's own)")
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--result-file", default=None, help="single mode: write the JSON result here")
    parser.add_argument("--sweep", nargs="+", default=None, metavar="LABEL=JSON|LABEL=URL",
                        help="sweep points: an extra body on --base-url, or a server URL each")
    parser.add_argument("--throughput-prompts", type=datasets.positive_int, default=16, help="sweep: requests per throughput run")
    parser.add_argument("--throughput-concurrency", type=datasets.positive_int, default=4, help="sweep: fixed concurrency")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="bench/results/sweep", help="sweep: where the table, JSON and plot go")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run single-server quality or a sweep; return 0, or 1 with a message on bad input or server errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["width-sweep"]:            # in-process, no server: bench/width_sweep.py
        from trident.bench.width_sweep import main as width_sweep_main
        return width_sweep_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.save_reference and not args.reference:
        print("error: --save-reference needs --reference FILE", file=sys.stderr)
        return 1

    def run() -> None:
        # Where results go is checked before the measurements, which take minutes.
        if args.sweep:
            datasets.require_writable(Path(args.output_dir) / "sweep.json")
            write_sweep(asyncio.run(sweep(args)), args.output_dir, recorded_command("quality", argv))
        else:
            if args.result_file:
                datasets.require_writable(args.result_file)
            result = asyncio.run(evaluate(args))
            if args.result_file:
                Path(args.result_file).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
                print(f"wrote {args.result_file}")

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
