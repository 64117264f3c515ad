"""`trident bench compare`: Trident dense, Trident per pruning profile, and llama.cpp where
available, under the same load in one run; throughput and latency with ratios to Trident dense,
and perplexity on a short WikiText slice next to them.

Example:
    python -m trident.bench.compare --model smollm2-135m-instruct --profiles dense,balanced,aggressive \
        --num-prompts 16 --max-concurrency 4 --max-tokens 64
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from trident.bench import datasets
from trident.bench.client import ServerTarget, exit_code, resolve_model
from trident.bench.launch import free_port, launched_server, llama_cpp_command, trident_command
from trident.bench.metrics import BenchmarkSummary, summarize
from trident.bench.perplexity import Windows, build_windows, perplexity
from trident.bench.runner import run_load
from trident.bench.serve import add_dataset_args, add_load_args, build_samples, load_config_from_args, recorded_command

BASELINE = "trident dense"


@dataclass(frozen=True)
class Target:
    label: str
    command: list[str] | None     # launched on `port` when set; otherwise already running at base_url
    port: int = 0
    base_url: str = ""


@dataclass
class Row:
    label: str
    base_url: str
    summary: BenchmarkSummary
    perplexity: float | None


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python's server module can be imported here."""
    try:
        return importlib.util.find_spec("llama_cpp.server") is not None
    except ModuleNotFoundError:
        return False


def llama_cpp_gguf(args: argparse.Namespace) -> str | None:
    """The GGUF llama.cpp should serve: --gguf, or Trident's --model when it resolves to a GGUF."""
    if args.gguf or not args.model:
        return args.gguf
    from trident.engine.loader import resolve_model_path   # the same alias table `trident serve` uses

    try:
        path = resolve_model_path(args.model)
    except ValueError:
        return None
    return str(path) if path.suffix == ".gguf" else None


def plan_targets(args: argparse.Namespace) -> list[Target]:
    """Trident dense first (the baseline and tokenizer source), then profiles, --target, llama.cpp."""
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    targets: list[Target] = []
    if profiles:
        if not args.model:
            raise ValueError("--model is needed to launch `trident serve` for --profiles (or pass --profiles '')")
        for profile in ["dense"] + [p for p in dict.fromkeys(profiles) if p != "dense"]:
            port = free_port()
            targets.append(Target(f"trident {profile}", trident_command(args.model, port, profile, args.server_arg), port))
    for item in args.target:
        label, sep, url = item.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            raise ValueError(f"--target {item!r} must look like LABEL=http://host:port")
        targets.append(Target(label, None, base_url=url))
    gguf = llama_cpp_gguf(args) if not args.llama_cpp_url and not args.no_llama_cpp and llama_cpp_available() else None
    if args.llama_cpp_url:
        targets.append(Target("llama.cpp", None, base_url=args.llama_cpp_url))
    elif gguf:
        port = free_port()
        targets.append(Target("llama.cpp", llama_cpp_command(gguf, port), port))
    elif not args.no_llama_cpp:
        print("note: llama.cpp skipped (needs --llama-cpp-url, or llama_cpp.server importable and a GGUF "
              "via --gguf or --model)", file=sys.stderr)
    if not targets:
        raise ValueError("nothing to compare: give --model with --profiles, --target or --llama-cpp-url")
    return targets


async def measure(args: argparse.Namespace, target: Target, base_url: str, shared: dict) -> Row:
    """One target under the shared load; the first call builds the prompts and perplexity windows."""
    server = ServerTarget(base_url, None, args.api_key)
    if "samples" not in shared:
        shared["samples"] = await build_samples(args, server)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=30.0)) as client:
        model = await resolve_model(client, server)
        ppl = None
        if not args.skip_ppl:
            if "windows" not in shared:
                text = datasets.require_data_file(args.data_dir, datasets.WIKITEXT_FILE).read_text(encoding="utf-8")
                shared["windows"] = await build_windows(client, server, model, text, args.ppl_window, args.ppl_windows)
            windows: Windows = shared["windows"]
            ppl = (await perplexity(client, server, model, windows)).perplexity
    run = await run_load(server, shared["samples"], load_config_from_args(args))
    return Row(target.label, base_url, summarize(run.records, run.duration_s, [50.0, 99.0]), ppl)


def _with_ratio(value: float, base: float | None, spec: str) -> str:
    text = format(value, spec)
    return f"{text} ({value / base:.2f}x)" if base else text


def markdown_table(rows: list[Row]) -> str:
    """Throughput and latency percentiles, each with its ratio to the baseline row, and perplexity."""
    base = next((r for r in rows if r.label == BASELINE), rows[0])
    header = ("| target | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) "
              "| ITL p50 (ms) | E2E p50 (ms) | E2E p99 (ms) | failed | perplexity |")
    lines = [f"Ratios are to `{base.label}`.", "", header, "|---|" + "---:|" * 11]
    b = base.summary
    for row in rows:
        s = row.summary
        cells = [
            _with_ratio(s.request_throughput, b.request_throughput, ".2f"),
            _with_ratio(s.output_throughput, b.output_throughput, ".1f"),
            _with_ratio(s.ttft.median_ms, b.ttft.median_ms, ".1f"),
            _with_ratio(s.ttft.percentiles_ms["p99"], b.ttft.percentiles_ms["p99"], ".1f"),
            _with_ratio(s.tpot.median_ms, b.tpot.median_ms, ".1f"),
            _with_ratio(s.tpot.percentiles_ms["p99"], b.tpot.percentiles_ms["p99"], ".1f"),
            _with_ratio(s.itl.median_ms, b.itl.median_ms, ".1f"),
            _with_ratio(s.e2el.median_ms, b.e2el.median_ms, ".1f"),
            _with_ratio(s.e2el.percentiles_ms["p99"], b.e2el.percentiles_ms["p99"], ".1f"),
            str(s.failed),
            "-" if row.perplexity is None else f"{row.perplexity:.3f}",
        ]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_targets(args: argparse.Namespace, targets: list[Target]) -> list[Row]:
    """Measure the targets one after another; launched servers are stopped before the next starts."""
    rows, shared = [], {}
    for target in targets:
        print(f"== {target.label}", file=sys.stderr)
        context = (launched_server(target.command, target.port, args.startup_timeout) if target.command
                   else nullcontext(target.base_url))
        with context as base_url:
            rows.append(asyncio.run(measure(args, target, base_url, shared)))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trident bench compare", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="GGUF file, HF folder or alias for `trident serve` (default %(default)s)")
    parser.add_argument("--profiles", default="dense", help="comma-separated plans, each its own server")
    parser.add_argument("--server-arg", action="append", default=[], help="extra argument for every `trident serve`")
    parser.add_argument("--target", action="append", default=[], metavar="LABEL=URL", help="an already running server")
    parser.add_argument("--llama-cpp-url", default=None, help="a running llama.cpp server")
    parser.add_argument("--gguf", default=None, help="GGUF for a launched llama.cpp server (default: --model)")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /health")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--data-dir", default=str(datasets.default_data_dir()))
    parser.add_argument("--ppl-window", type=int, default=256, help="tokens per perplexity window")
    parser.add_argument("--ppl-windows", type=int, default=4, help="perplexity windows (a short slice)")
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--output", default="bench/results/compare.md", help="markdown table; JSON beside it")
    add_dataset_args(parser)
    add_load_args(parser)
    parser.set_defaults(num_prompts=16, max_tokens=64, max_concurrency=4)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print and write the table; 0 on success, 1 with a message on failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    def run() -> None:
        datasets.require_writable(args.output)               # before the measurements, not after them
        rows = run_targets(args, plan_targets(args))
        table = markdown_table(rows)
        print(table)
        out = Path(args.output)                    # its folder was made by require_writable
        out.write_text(table, encoding="utf-8")
        document = {"command": recorded_command("compare", argv), "rows": [asdict(r) for r in rows]}
        out.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out} and {out.with_suffix('.json')}")

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
