"""In-process benchmarking tools the bench scripts share: engines for plans and the prompt sets
they time. The timing itself (engines stepped side by side) is engine.calibration.timing's, which
`trident plan` also fits its cost model with.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from trident.bench.datasets import default_data_dir
from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from trident.engine.llm import LLM
from trident.engine.calibration.evaluate import token_windows

DATA_DIR = default_data_dir()


def model_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The command line an in-process sweep starts from: which model, at which dtype, reading
    its text from which data folder."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    return ap


def speed_batch_prompts(text: str, batch: int, window: int):
    """tokenizer -> the timed batch: `batch` prompts of `window` tokens from the middle of
    WikiText-2 (calibration reads its start, perplexity its end)."""
    middle = text[len(text) // 3:]
    return lambda tok: token_windows(tok, middle, batch * window, window)


def plan_runs(names: str, plans_dir: Path, model: str) -> list[tuple[str, str | None]]:
    """[(label, plan path)]: dense (no plan) first, then each comma-separated plan name (looked up
    in `plans_dir`) or .json path. Exits with a message when a plan does not exist."""
    paths = []
    for name in filter(None, names.split(",")):
        path = Path(name).expanduser() if name.endswith(".json") else plans_dir / f"{name}.json"
        if not path.exists():
            raise SystemExit(f"error: no plan {path}; run `trident calibrate --model {model}`")
        paths.append(path)
    return [("dense", None)] + labelled(paths)


def labelled(paths: list[Path]) -> list[tuple[str, str]]:
    """[(label, path)]: a plan's name, or, for plans of the same name from two calibrations,
    its folder and name."""
    stems = [p.stem for p in paths]
    return [(p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}/{p.stem}", str(p)) for p in paths]


def engine_for(model: str, plan: str | None, args, timing: bool = False) -> LLM:
    """An engine without prefix caching. `timing`: its KV cache holds just the speed batch
    (`args.speed_batch` sequences of max_model_len), so that every plan's engine fits in memory at
    once for `interleaved_speed`."""
    max_model_len = args.window + args.max_tokens + 64
    num_blocks = args.speed_batch * -(-max_model_len // CacheConfig.block_size) if timing else None
    return LLM(EngineConfig(model=model, plan=plan, dtype=args.dtype,
                            cache=CacheConfig(enable_prefix_caching=False, num_blocks=num_blocks),
                            scheduler=SchedulerConfig(max_model_len=max_model_len,
                                                      max_num_batched_tokens=args.window * 4)))
