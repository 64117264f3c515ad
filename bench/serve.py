"""`trident bench serve`: load-test any OpenAI-compatible server over HTTP (streaming SSE).

Example:
    python -m trident.bench.serve --base-url http://127.0.0.1:8000 --dataset random \
        --random-input-len 128 --random-output-len 64 --num-prompts 50 --request-rate 4 \
        --extra-body '{"pruning": "balanced"}' --result-file balanced.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np

from trident.bench import datasets
from trident.bench.client import ENDPOINT_PATHS, ServerTarget, ServerTokenizer, exit_code, resolve_model
from trident.bench.metrics import BenchmarkSummary, LatencyStats, parse_goodput, summarize
from trident.bench.runner import LoadConfig, RunResult, run_load

DATASETS = ("alpaca", "random", "wikitext")


def parse_json_object(text: str, flag: str) -> dict:
    """A JSON object given on the command line, or a ValueError naming the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag}: not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag}: expected a JSON object, got {text!r}")
    return value


def recorded_command(tool: str, argv: list[str]) -> list[str]:
    """The command line to store in result files, with the --api-key value hidden."""
    command, hide = ["trident", "bench", tool], False
    for arg in argv:
        command.append("***" if hide else ("--api-key=***" if arg.startswith("--api-key=") else arg))
        hide = arg == "--api-key"
    return command


def add_target_args(parser: argparse.ArgumentParser) -> None:
    """--base-url, --model, --api-key, --data-dir: shared by the serve, quality and compare tools."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root URL")
    parser.add_argument("--model", default=None, help="model name to send (default: first id of GET /v1/models)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--data-dir", default=str(datasets.default_data_dir()),
                        help="folder with alpaca-seed-tasks.jsonl and wikitext2-valid.txt")


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """Which prompts to send and how long the answers may be."""
    parser.add_argument("--dataset", choices=DATASETS, default="alpaca")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--random-input-len", type=int, default=128)
    parser.add_argument("--random-output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="random lengths are uniform in [len*(1-r), len*(1+r)]")
    parser.add_argument("--wikitext-len", type=int, default=1000, help="words per WikiText passage")
    parser.add_argument("--wikitext-output-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=None, help="override every request's max_tokens")
    parser.add_argument("--seed", type=int, default=0)


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """Load shape and per-request parameters."""
    parser.add_argument("--endpoint", choices=sorted(ENDPOINT_PATHS), default="chat")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (Poisson), or inf")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--num-warmups", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true")
    parser.add_argument("--extra-body", default="{}", help="JSON object merged into every request body")
    parser.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    parser.add_argument("--disable-tqdm", action="store_true")


def load_config_from_args(args: argparse.Namespace, **overrides) -> LoadConfig:
    """LoadConfig from parsed flags; `overrides` replace single fields (e.g. max_concurrency)."""
    fields = dict(
        endpoint=args.endpoint, request_rate=args.request_rate, burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, num_warmups=args.num_warmups, seed=args.seed,
        temperature=args.temperature, ignore_eos=args.ignore_eos, max_tokens=args.max_tokens,
        extra_body=parse_json_object(args.extra_body, "--extra-body"),
        request_timeout_s=args.request_timeout, disable_tqdm=args.disable_tqdm,
    )
    fields.update(overrides)
    return LoadConfig(**fields)


async def build_samples(args: argparse.Namespace, target: ServerTarget) -> list[datasets.SampleRequest]:
    """The prompt set the flags ask for; token counts through the server's /tokenize if it has one."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    rng = np.random.default_rng(args.seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        model = await resolve_model(client, target)
        tokenizer = await ServerTokenizer.probe(client, target, model)
        if tokenizer is None:
            print("note: the server has no /tokenize; prompt lengths are estimated from words "
                  "and output token counts come from usage", file=sys.stderr)
        if args.dataset == "alpaca":
            tasks = datasets.load_alpaca(datasets.require_data_file(args.data_dir, datasets.ALPACA_FILE))
            return await datasets.alpaca_requests(tasks, args.num_prompts, rng, tokenizer, args.max_tokens)
        words = datasets.load_wikitext_words(datasets.require_data_file(args.data_dir, datasets.WIKITEXT_FILE))
        if args.dataset == "random":
            return await datasets.random_requests(words, args.num_prompts, args.random_input_len,
                                                  args.random_output_len, args.random_range_ratio, rng, tokenizer)
        return await datasets.wikitext_requests(words, args.num_prompts, args.wikitext_len,
                                                args.wikitext_output_len, rng, tokenizer)


def _stats_lines(title: str, name: str, stats: LatencyStats) -> list[str]:
    lines = [f"{title:-^50}", f"{'Mean ' + name + ' (ms):':<40}{stats.mean_ms:<10.2f}",
             f"{'Median ' + name + ' (ms):':<40}{stats.median_ms:<10.2f}"]
    lines += [f"{key.upper() + ' ' + name + ' (ms):':<40}{value:<10.2f}"
              for key, value in stats.percentiles_ms.items() if key != "p50"]   # p50 is the median line
    return lines


def format_summary(summary: BenchmarkSummary) -> str:
    """The printed result table (vLLM's layout)."""
    rows = [
        ("Successful requests:", summary.completed),
        ("Failed requests:", summary.failed),
        ("Benchmark duration (s):", f"{summary.duration_s:.2f}"),
        ("Total input tokens:", summary.total_input_tokens),
        ("Total generated tokens:", summary.total_output_tokens),
        ("Request throughput (req/s):", f"{summary.request_throughput:.2f}"),
    ]
    if summary.request_goodput is not None:
        rows.append(("Request goodput (req/s):", f"{summary.request_goodput:.2f}"))
    rows += [("Output token throughput (tok/s):", f"{summary.output_throughput:.2f}"),
             ("Total token throughput (tok/s):", f"{summary.total_token_throughput:.2f}")]
    lines = [f"{' Serving Benchmark Result ':=^50}"] + [f"{label:<40}{value:<10}" for label, value in rows]
    lines += _stats_lines("Time to First Token", "TTFT", summary.ttft)
    lines += _stats_lines("Time per Output Token (excl. 1st token)", "TPOT", summary.tpot)
    lines += _stats_lines("Inter-token Latency", "ITL", summary.itl)
    lines += _stats_lines("End-to-end Latency", "E2EL", summary.e2el)
    lines.append("=" * 50)
    for error, count in summary.errors.items():
        lines.append(f"failed x{count}: {error}")
    return "\n".join(lines)


def result_document(args: argparse.Namespace, argv: list[str], run: RunResult, summary: BenchmarkSummary,
                    detailed: bool) -> dict:
    """The JSON result: the command's configuration, the summary and optionally every request."""
    config = {k: v for k, v in vars(args).items() if k != "api_key"}
    config["request_rate"] = str(config["request_rate"]) if math.isinf(config["request_rate"]) else config["request_rate"]
    document = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": run.model,
                "command": recorded_command("serve", argv),
                "config": config, "summary": asdict(summary)}
    if detailed:
        document["requests"] = [asdict(r) for r in run.records]
    return document


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trident bench serve", description=__doc__.splitlines()[0])
    add_target_args(parser)
    add_dataset_args(parser)
    add_load_args(parser)
    parser.add_argument("--percentiles", default="50,90,99", help="comma-separated latency percentiles")
    parser.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:2000")
    parser.add_argument("--result-file", default=None, help="write the JSON result here")
    parser.add_argument("--save-detailed", action="store_true", help="include every request in the JSON")
    return parser


def parse_percentiles(text: str) -> list[float]:
    """"50,90,99" -> [50.0, 90.0, 99.0], each in [0, 100]."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--percentiles must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= p <= 100 for p in values):
        raise ValueError(f"--percentiles must be numbers in [0, 100], got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark the flags describe; print the summary and return 0 (1 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    def run() -> None:
        percentiles = parse_percentiles(args.percentiles)
        slos = parse_goodput(args.goodput)
        config = load_config_from_args(args)
        if args.result_file:
            datasets.require_writable(args.result_file)      # before the run, not after it
        target = ServerTarget(args.base_url, args.model, args.api_key)
        samples = asyncio.run(build_samples(args, target))
        load = asyncio.run(run_load(target, samples, config))
        summary = summarize(load.records, load.duration_s, percentiles, slos)
        print(format_summary(summary))
        if args.result_file:
            document = result_document(args, argv, load, summary, args.save_detailed)
            Path(args.result_file).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {args.result_file}")

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
