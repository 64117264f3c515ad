"""The `trident` command (also `python -m trident.server`).

    trident serve --model PATH|ALIAS [options]    OpenAI-compatible server (uvicorn)
    trident calibrate --model M [--data FILE]     statistics + pruning plan profiles
    trident bench serve|quality|compare|soak [...]   load generator, quality sweeps, side by side, soak
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from trident.engine.calibration.depth import DEPTH_COMPENSATIONS
from trident.engine.calibration.candidates import Settings
from trident.engine.calibration.planner import WORKLOADS
from trident.engine.pruning.plan import HEAD_UNITS
from trident.engine.pruning.profiles import PROFILES
from trident.engine.calibration.reconstruct import COMPENSATIONS
from trident.kernels.cpu_gemm import MODES as CPU_GEMM_MODES

DEFAULT_MODEL = "smollm2-135m-instruct"
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Bytes from a size such as "1GiB", "512MiB", "2G" or "1048576"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1GiB, 512MiB or a byte count)")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    # Engine options default to None: unset flags keep the config dataclasses' defaults.
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help="GGUF file, HF-style folder, or alias (default %(default)s)")
    add("--served-model-name", help="name clients send as `model` (default: derived from --model)")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--api-key", default=os.environ.get("TRIDENT_API_KEY"),
        help="require `Authorization: Bearer KEY` (default: $TRIDENT_API_KEY; unset = open)")
    add("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and KV cache dtype (default auto: bfloat16 on CUDA and on CPUs with bf16 matrix units, else float32)")
    add("--plan", help="pruning plan: a profile (dense, lossless, balanced, aggressive, long-context) or a plan "
        "JSON file")
    add("--plans", help="several plans served side by side, comma-separated profiles or files; a request picks one "
        "with {\"pruning\": {\"profile\": NAME}} (default: the first). They share one scheduler and KV cache")
    add("--speculative-draft", help="lossless self-speculative decoding: the draft skips the layers a depth plan "
        "drops (a profile such as depth-4 from `trident calibrate`, or a plan file) or comma-separated layer indices "
        "(default: off)")
    add("--num-draft-tokens", type=int, help="tokens drafted per step with --speculative-draft (default 3)")
    add("--device", help="cpu or cuda (default: cuda when available)")
    add("--cpu-gemm", choices=CPU_GEMM_MODES,
        help="GEMM provider of float32 CPU decode steps: auto times each on this machine's CPU and the model's "
             "shapes at first start (cached) and takes the fastest; a name pins one (default: $TRIDENT_CPU_GEMM "
             "or auto)")
    add("--seed", type=int)
    add("--max-model-len", type=int, help="prompt + output tokens per sequence (default: the model's context)")
    add("--max-num-seqs", type=int, help="sequences running per step")
    add("--max-num-batched-tokens", type=int, help="tokens per step (prefill chunks + decodes)")
    add("--max-waiting", type=int, help="waiting-queue bound; beyond it requests get 429")
    add("--block-size", type=int, help="tokens per KV block")
    add("--kv-cache-memory", type=parse_size, help="KV cache size, e.g. 1GiB (ignored with --num-kv-blocks; default "
        "1GiB, or room for 4 sequences of --max-model-len if that is more)")
    add("--num-kv-blocks", type=int, help="explicit KV block count")
    add("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
        help="do not share KV blocks of identical prompt prefixes across requests")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add("--shutdown-timeout", type=float, default=30.0,
        help="on SIGTERM/SIGINT, seconds running requests get to finish before they are ended (default %(default)s)")
    add("--max-request-bytes", type=parse_size, default="4MiB",
        help="larger request bodies get 413 before parsing (default 4MiB)")
    add("--allowed-origins", default="",
        help="comma-separated browser origins allowed by CORS, or * for any (default: none)")
    add("--message-special-tokens", choices=["text", "parse"], default="text",
        help="special-token text inside chat messages: `text` tokenizes it as plain characters, so user "
             "content cannot open a system turn (default); `parse` reads it as control tokens")


def build_parser() -> argparse.ArgumentParser:
    """The `trident` parser; `bench serve` arguments are forwarded untouched (see main)."""
    parser = argparse.ArgumentParser(prog="trident", description="Trident: a pruning-aware LLM server")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    _add_serve_args(serve)
    serve.set_defaults(handler=serve_command)
    calibrate = commands.add_parser("calibrate", help="collect pruning statistics and write plan profiles")
    calibrate.add_argument("--model", default=DEFAULT_MODEL)
    calibrate.add_argument("--data", default=str(DEFAULT_CALIBRATION_DATA),
                           help="calibration text (default %(default)s)")
    calibrate.add_argument("--tokens", type=int, default=32768, help="calibration tokens (default %(default)s)")
    calibrate.add_argument("--eval-tokens", type=int, default=4096,
                           help="held-out tokens, from the end of --data, that choose the profiles")
    calibrate.add_argument("--out", help="output folder (default: where --plan PROFILE looks)")
    calibrate.add_argument("--compensation", choices=COMPENSATIONS, default="least-squares",
                           help="how the kept o_proj/down_proj columns make up for the removed ones: refit by "
                                "least squares on the calibration moments, or only the removed mean as a bias")
    calibrate.add_argument("--head-unit", choices=HEAD_UNITS, default="head",
                           help="what width pruning drops from attention: single query heads, or whole KV groups "
                                "(a KV head with its query heads: equal groups and a smaller KV cache)")
    calibrate.add_argument("--heal-steps", type=int, default=0,
                           help="distillation steps that heal each plan of --heal-budgets (default 0: compensation "
                                "only; 6-8 s a step on 2 CPU cores for a 135M model)")
    calibrate.add_argument("--heal-budgets", help="comma-separated width budgets to heal (default 0.2,0.25)")
    calibrate.add_argument("--depth-compensation", choices=DEPTH_COMPENSATIONS, default="least-squares",
                           help="how the kept layer before a run of dropped layers makes up for them: refit its "
                                "down_proj by least squares, add the run's mean contribution as a bias, or none")
    calibrate.add_argument("--heal-depths", help="comma-separated depth budgets (layers dropped) to heal with "
                                                 "--heal-steps (default: none)")
    calibrate.add_argument("--heal-lr", type=float, default=2e-4, help="healing learning rate (default %(default)s)")
    calibrate.add_argument("--exit-layers", help="comma-separated layers after which exit.json lets tokens exit "
                           "(default: from half the depth on); `none` writes no exit plan")
    calibrate.add_argument("--exit-agreement", type=float, default=0.95,
                           help="held-out agreement with the full model that exits must keep (default %(default)s)")
    calibrate.set_defaults(handler=calibrate_command)
    plan = commands.add_parser("plan", help="search one plan across depth, width and length for a target")
    plan.add_argument("--model", default=DEFAULT_MODEL)
    target = plan.add_mutually_exclusive_group(required=True)
    target.add_argument("--max-perplexity-increase", type=float, help="the fastest plan within this increase "
                        "(0.05: +5%% held-out perplexity)")
    target.add_argument("--target-speedup", type=float, help="the best-quality plan at least this much faster")
    target.add_argument("--flops-budget", type=float, help="the best-quality plan within this fraction of "
                        "dense FLOPs")
    plan.add_argument("--workload", choices=sorted(WORKLOADS), default="decode",
                      help="what speed means: batch decode, time to first token, or long-context decode with "
                           "KV budgets (default %(default)s)")
    plan.add_argument("--data", default=str(DEFAULT_CALIBRATION_DATA), help="text: statistics from its start, "
                      "held-out passages from its end (default %(default)s)")
    plan.add_argument("--out", help="output folder (default: where --plan PROFILE looks)")
    plan.add_argument("--context", type=int, help="prompt tokens of each quality passage and timed sequence "
                      "(default: 1024, 4096 for long-context)")
    plan.add_argument("--continuation", type=int, default=Settings.continuation,
                      help="teacher-forced tokens scored after each prompt (default %(default)s)")
    plan.add_argument("--passages", type=int, default=Settings.passages,
                      help="held-out passages (default %(default)s)")
    plan.add_argument("--tokens", type=int, default=Settings.calibration_tokens,
                      help="calibration tokens (default %(default)s)")
    plan.add_argument("--batch", type=int, default=Settings.batch,
                      help="sequences of a timed decode step (default %(default)s)")
    plan.set_defaults(handler=plan_command)
    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for name, text in BENCH_COMMANDS.items():
        bench_commands.add_parser(name, help=text)
    return parser


BENCH_COMMANDS = {"serve": "load generator against a running server (trident.bench.serve)",
                  "soak": "mixed hostile load for N minutes, then leak checks (trident.bench.soak)",
                  "quality": "perplexity, greedy agreement and quality/speed sweeps (trident.bench.quality)",
                  "compare": "Trident profiles and peers side by side under the same load (trident.bench.compare)"}
DEFAULT_CALIBRATION_DATA = Path(__file__).resolve().parents[1] / "bench" / "data" / "wikitext2-valid.txt"


def calibrate_command(args: argparse.Namespace) -> int:
    from trident.engine.calibration.calibrate import calibrate

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(args.data).is_file():
        print(f"trident calibrate: no such file {args.data}", file=sys.stderr)
        return 2
    try:
        budgets = {} if args.heal_budgets is None else \
            {"heal_budgets": tuple(float(b) for b in args.heal_budgets.split(",") if b.strip())}
        if budgets and (not budgets["heal_budgets"] or args.heal_steps <= 0):
            raise ValueError
    except ValueError:
        print(f"trident calibrate: --heal-budgets must be numbers like 0.15,0.2 and needs --heal-steps N > 0, "
              f"got {args.heal_budgets!r} with --heal-steps {args.heal_steps}", file=sys.stderr)
        return 2
    try:
        if args.heal_depths is not None:
            budgets["heal_depths"] = tuple(int(n) for n in args.heal_depths.split(",") if n.strip())
            if not budgets["heal_depths"] or args.heal_steps <= 0:
                raise ValueError
    except ValueError:
        print(f"trident calibrate: --heal-depths must be layer counts like 4,6 and needs --heal-steps N > 0, "
              f"got {args.heal_depths!r} with --heal-steps {args.heal_steps}", file=sys.stderr)
        return 2
    try:
        if args.exit_layers is not None:
            budgets["exit_layers"] = () if args.exit_layers == "none" else \
                tuple(int(n) for n in args.exit_layers.split(",") if n.strip())
    except ValueError:
        print(f"trident calibrate: --exit-layers must be layer indices like 14,19 or none, got {args.exit_layers!r}",
              file=sys.stderr)
        return 2
    try:
        report = calibrate(args.model, Path(args.data), args.tokens, args.eval_tokens,
                           out_dir=Path(args.out) if args.out else None, heal_steps=args.heal_steps,
                           heal_lr=args.heal_lr, compensation=args.compensation,
                           head_unit=args.head_unit, depth_compensation=args.depth_compensation,
                           exit_agreement=args.exit_agreement, **budgets)
    except (ValueError, OSError) as e:
        print(f"trident calibrate: {e}", file=sys.stderr)
        return 2
    print(f"dense perplexity {report['dense_perplexity']:.3f} on {report['eval_tokens']} held-out tokens")
    for point in report["sweep"]:
        healed = f"  (healed {point['healing']['steps']} steps)" if "healing" in point else ""
        print(f"  {point['plan']:<12} width {point['width_fraction']:.2f}  perplexity {point['perplexity']:.3f}{healed}")
    for point in report["depth_sweep"]:
        healed = f"  (healed {point['healing']['steps']} steps)" if "healing" in point else ""
        print(f"  {point['plan']:<12} drops layers {point['dropped']}  perplexity {point['perplexity']:.3f}{healed}")
    for layer, point in report["exits"].items():
        print(f"  exit after layer {layer}: threshold {point['threshold']:.3f}, exits {point['exit_rate']:.1%} of "
              f"held-out tokens at {point['agreement']:.1%} agreement (all tokens: {point['base_agreement']:.1%})")
    print(f"profiles: {report['profiles']}; plans in {report['out_dir']}")
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from trident.engine.calibration.planner import WORKLOAD_CONTEXT, Target, run

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    target = Target(args.max_perplexity_increase, args.target_speedup, args.flops_budget)
    if args.context is None:
        args.context = WORKLOAD_CONTEXT[args.workload]
    sizes = {"context": args.context, "continuation": args.continuation, "passages": args.passages,
             "tokens": args.tokens, "batch": args.batch}
    small = [f"--{k}" for k, v in sizes.items() if v < 1]
    if small:
        print(f"trident plan: {', '.join(small)} must be at least 1", file=sys.stderr)
        return 2
    settings = Settings(context=args.context, continuation=args.continuation, passages=args.passages,
                        calibration_tokens=args.tokens, batch=args.batch)
    try:
        report = run(args.model, Path(args.data), Path(args.out) if args.out else None, target, args.workload,
                     settings)
    except (ValueError, OSError) as e:
        print(f"trident plan: {e}", file=sys.stderr)
        return 2
    phase = report["phase"]
    print(f"dense perplexity {report['dense_perplexity']:.3f}; {report['search']['measured_points']} plans measured")
    print(f"{'plan':<40} {'ppl ratio':>9} {'agreement':>9} {phase + ' speedup':>16} (predicted / timed)")
    for name, row in [("chosen", report["chosen"])] + list(report["profiles"].items()):
        if row is None:
            print(f"{name}: no plan on the front meets the target")
            continue
        timed = row.get(f"measured_{phase}_speedup")
        print(f"{name + ': ' + row['plan']:<40} {row['perplexity_ratio']:>9.3f} {row['token_agreement']:>9.3f} "
              f"{row[f'predicted_{phase}_speedup']:>8.2f}x / {timed:.2f}x")
    print(f"plans and plan-report.json in {report['out_dir']}")
    return 0 if report["chosen"] is not None else 1


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from `serve` flags; flags left unset keep the dataclass defaults."""

    def given(**values):
        return {key: value for key, value in values.items() if value is not None}

    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = CacheConfig(enable_prefix_caching=args.enable_prefix_caching,
                        **given(block_size=args.block_size, num_blocks=args.num_kv_blocks,
                                kv_cache_memory=args.kv_cache_memory))
    scheduler = SchedulerConfig(**given(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                        max_num_batched_tokens=args.max_num_batched_tokens,
                                        max_waiting=args.max_waiting))
    if args.num_draft_tokens is not None and args.speculative_draft is None:
        raise ValueError("--num-draft-tokens needs --speculative-draft")
    speculative = None if args.speculative_draft is None else \
        SpeculativeConfig(args.speculative_draft, **given(num_draft_tokens=args.num_draft_tokens))
    if args.plan and args.plans:
        raise ValueError("give --plan or --plans, not both")
    plans = tuple(p.strip() for p in (args.plans or "").split(",") if p.strip())
    return EngineConfig(model=args.model, device=device, cache=cache, scheduler=scheduler, plan=args.plan, plans=plans,
                        speculative=speculative, **given(dtype=args.dtype, seed=args.seed, cpu_gemm=args.cpu_gemm))


def _draining_server(config, app, shutdown_timeout: float):
    """A uvicorn.Server whose first SIGTERM/SIGINT drains the app (server/limits.py) before exiting;
    a second signal falls back to uvicorn's own handling (exit now, cancelling what runs)."""
    import asyncio

    import uvicorn

    class DrainingServer(uvicorn.Server):
        drain_task: asyncio.Task | None = None

        async def startup(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig, frame) -> None:
            if self.drain_task is not None or not hasattr(self, "loop"):
                return super().handle_exit(sig, frame)
            # Not recorded as a captured signal: uvicorn would re-raise it at exit, and the
            # process would die of it instead of exiting 0 after a clean drain.
            self.loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            async def run() -> None:
                try:
                    await app.state.drain(shutdown_timeout)
                finally:
                    self.should_exit = True

            self.drain_task = self.loop.create_task(run())

    return DrainingServer(config)


def serve_command(args: argparse.Namespace) -> int:
    """Builds the engine and app, then serves until interrupted. Exits 2 on bad flags or a plan
    file that does not parse, 1 when the engine fails to start (a plan that does not fit the model)."""
    import uvicorn

    from trident.engine.async_engine import AsyncEngine
    from trident.engine.loader import resolve_model_path
    from trident.engine.pruning.plan import PruningPlan
    from trident.server.app import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = engine_config_from_args(args)
        resolve_model_path(args.model)                  # a missing path or package: exit 2 now
        for flag, plan in [("--plan", args.plan)] * bool(args.plan) + [("--plans", p) for p in config.plans]:
            if plan not in PROFILES:
                if not Path(plan).is_file():
                    raise ValueError(f"{flag} {plan!r} is neither a profile ({', '.join(PROFILES)}) nor a file")
                PruningPlan.load(Path(plan))           # PlanError (a ValueError) before the model loads
    except ValueError as exc:
        print(f"trident serve: {exc}", file=sys.stderr)
        return 2
    failure: list[str] = []

    def stop(reason: str) -> None:
        failure.append(reason)
        server.should_exit = True

    origins = [origin.strip() for origin in args.allowed_origins.split(",") if origin.strip()]
    app = build_app(AsyncEngine(config), api_key=args.api_key, served_model_name=args.served_model_name,
                    on_start_failure=stop, max_request_bytes=args.max_request_bytes, allowed_origins=origins,
                    parse_message_special_tokens=args.message_special_tokens == "parse")
    # The drain has already ended every request when uvicorn's own graceful wait begins.
    server = _draining_server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                             timeout_graceful_shutdown=5), app, args.shutdown_timeout)
    server.run()
    if failure:
        print(f"trident serve: the engine failed to start: {failure[0]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `trident` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and argv[1:2] and argv[1] in BENCH_COMMANDS:
        import importlib
        return importlib.import_module(f"trident.bench.{argv[1]}").main(argv[2:]) or 0
    args = build_parser().parse_args(argv)
    return args.handler(args)
