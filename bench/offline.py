"""Offline throughput: Trident against HF transformers and llama.cpp on the same weights and dtype,
in one run.

    python -m trident.bench.offline [--model smollm2-135m-instruct] [--dtype float32|bfloat16] [--json out.json]

Figures: batch-1 decode tok/s, aggregate decode tok/s with 16 concurrent requests, prefill tok/s on
a 1024-token prompt, time to ready; plus achieved GB/s of weight reads at batch 1 against a
measured memory-copy bandwidth. Decode rates subtract a 1-token run, so they exclude prefill.

llama.cpp (when `llama_cpp` is importable: `pip install -c requirements.lock -e '.[llamacpp]'`)
runs the model's GGUF converted to the same precision by llama.cpp's own quantizer (F32 for
float32, BF16 for bfloat16; `--llama-cpp-f16` adds an F16 column), written once into the cache
folder, with as many threads as torch uses.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trident.bench.datasets import WIKITEXT_FILE, default_data_dir, require_data_file, require_writable
from trident.bench.machine import machine_info
from trident.engine.config import EngineConfig, SchedulerConfig
from trident.engine.llm import LLM
from trident.engine.loader import resolve_model_path
from trident.engine.sampling_params import SamplingParams
from trident.kernels import cpu_gemm

DEFAULT_DATA = default_data_dir()


def copy_bandwidth_gbs(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Memory-copy bandwidth (bytes read + written per second), best of `repeats`."""
    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


@torch.inference_mode()
def matmul_floor_s(model, batch: int, repeats: int = 5) -> float:
    """Seconds for one pass of `batch` rows through every weight matrix of `model` and nothing
    else: the ceiling any engine on these weights reaches (no attention, norms or overhead). Each
    matrix counts with the fastest GEMM provider of kernels/cpu_gemm.py (F.linear alone where the
    dispatch does not apply), its best time over `repeats` passes."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = torch.randn(batch, max(w.shape[1] for w in weights), dtype=weights[0].dtype)
    forms = cpu_gemm.PROVIDERS.values() if cpu_gemm.applies(x, weights[0]) else [cpu_gemm.PROVIDERS["torch"]]
    best = [float("inf")] * len(weights)
    for form in forms:
        for _ in range(repeats):
            for i, w in enumerate(weights):     # one pass streams every matrix, as a forward does
                t = time.perf_counter()
                form(x[:, :w.shape[1]], w, None)
                best[i] = min(best[i], time.perf_counter() - t)
    return sum(best)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def prompts_from_wikitext(data_dir: Path, tokenizer, num: int, length: int) -> list[list[int]]:
    """`num` distinct prompts of exactly `length` tokens from WikiText-2."""
    ids = tokenizer.encode((data_dir / WIKITEXT_FILE).read_text()[: 400 * num * length // 50],
                           add_special_tokens=False)
    if len(ids) < num * length:
        raise SystemExit(f"not enough WikiText tokens for {num} prompts of {length}")
    return [ids[i * length:(i + 1) * length] for i in range(num)]


class TridentRunner:
    name = "trident"

    def __init__(self, model: str, dtype: str) -> None:
        self.ready_s = timed(lambda: setattr(self, "llm", LLM(EngineConfig(
            model=model, dtype=dtype, scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_model_len=2048)))))
        self.tokenizer = self.llm.tokenizer

    def generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        outs = self.llm.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)


class HFRunner:
    name = "transformers"

    def __init__(self, model_path: Path, dtype: str) -> None:
        from transformers import AutoModelForCausalLM

        kwargs = {"gguf_file": model_path.name} if model_path.suffix == ".gguf" else {}
        where = model_path.parent if model_path.suffix == ".gguf" else model_path

        def load():
            self.model = AutoModelForCausalLM.from_pretrained(str(where), dtype=getattr(torch, dtype), **kwargs).eval()
        self.ready_s = timed(load)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        ids = torch.tensor(prompts)   # equal lengths: no padding needed
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False)
        assert out.shape[1] == ids.shape[1] + new_tokens


LLAMA_CPP_FTYPES = {"float32": ("F32", "LLAMA_FTYPE_ALL_F32", 4), "bfloat16": ("BF16", "LLAMA_FTYPE_MOSTLY_BF16", 2),
                    "float16": ("F16", "LLAMA_FTYPE_MOSTLY_F16", 2)}


def llama_cpp_gguf(source: Path, dtype: str) -> Path:
    """`source` requantized to `dtype` by llama.cpp's quantizer (allow_requantize: the shipped file
    is already quantized), cached next to Trident's own converted weights."""
    import ctypes

    import llama_cpp
    from trident.engine.loader import cache_root

    label, ftype, _ = LLAMA_CPP_FTYPES[dtype]
    out = cache_root() / "llama-cpp" / f"{source.stem}-{label}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = getattr(llama_cpp, ftype), True, torch.get_num_threads()
        partial = out.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not convert {source} to {label}")
        partial.replace(out)
    return out


class LlamaCppRunner:
    batched = False          # llama-cpp-python generates one sequence at a time

    def __init__(self, model_path: Path, dtype: str) -> None:
        from llama_cpp import Llama

        label, _, self.bytes_per_weight = LLAMA_CPP_FTYPES[dtype]
        self.name = f"llama.cpp {label}"
        path = llama_cpp_gguf(model_path, dtype)
        threads = torch.get_num_threads()
        self.ready_s = timed(lambda: setattr(self, "llm", Llama(model_path=str(path), n_ctx=2048, n_batch=2048,
                                                                 n_threads=threads, n_threads_batch=threads,
                                                                 verbose=False)))

    def generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        for i, _ in enumerate(self.llm.generate(prompts[0], temp=0.0, reset=True)):
            if i + 1 == new_tokens:
                break


def decode_seconds(full: float, one: float) -> float:
    """The decode part of a run: its time less a 1-token run's. Not positive means the machine's
    noise exceeded the decode time, and no rate can be read from it."""
    if full <= one:
        raise SystemExit(f"timing noise exceeds the decode time ({full:.3f} s for the run, {one:.3f} s for one "
                         "token): raise --decode-tokens / --batch-tokens or use a quieter machine")
    return full - one


def measure(runner, prompts: "PromptSets", decode_tokens: int, batch_tokens: int) -> dict:
    """Every timed run uses prompts no earlier run saw, so no cache (prefix or otherwise) helps."""
    runner.generate(prompts.warmup, 4)
    one = timed(lambda: runner.generate(prompts.single[0], 1))
    full = timed(lambda: runner.generate(prompts.single[1], decode_tokens + 1))
    result = {"ready_s": runner.ready_s, "decode_b1_tok_s": decode_tokens / decode_seconds(full, one)}
    result["decode_batch_tok_s"] = None
    if getattr(runner, "batched", True):
        one16 = timed(lambda: runner.generate(prompts.batch[0], 1))
        full16 = timed(lambda: runner.generate(prompts.batch[1], batch_tokens + 1))
        result["decode_batch_tok_s"] = len(prompts.batch[0]) * batch_tokens / decode_seconds(full16, one16)
    prefill = min(timed(lambda: runner.generate([p], 1)) for p in prompts.long)
    result["prefill_tok_s"] = len(prompts.long[0]) / prefill
    return result


@dataclass
class PromptSets:
    warmup: list[list[int]]
    single: list[list[list[int]]]     # two one-prompt sets
    batch: list[list[list[int]]]      # two sets of `batch` prompts
    long: list[list[int]]             # two long prompts

    @classmethod
    def from_wikitext(cls, data_dir: Path, tokenizer, batch: int, prefill_len: int) -> "PromptSets":
        short = prompts_from_wikitext(data_dir, tokenizer, 3 + 2 * batch + 2 * prefill_len // 32, 32)
        long = [sum(short[3 + 2 * batch + i * prefill_len // 32:3 + 2 * batch + (i + 1) * prefill_len // 32], [])
                for i in range(2)]
        return cls(short[:1], [short[1:2], short[2:3]], [short[3:3 + batch], short[3 + batch:3 + 2 * batch]], long)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batch-tokens", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--llama-cpp-f16", action="store_true", help="also run llama.cpp on F16 weights")
    ap.add_argument("--json", type=Path, help="write results here")
    args = ap.parse_args(argv)
    try:                 # what can fail before minutes of loading and timing, fails first
        require_data_file(args.data_dir, WIKITEXT_FILE)
        if args.json:
            require_writable(args.json)
        model_path = resolve_model_path(args.model)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    trident = TridentRunner(args.model, args.dtype)
    prompts = PromptSets.from_wikitext(args.data_dir, trident.tokenizer, args.batch, args.prefill_len)
    runners = [trident]
    if not args.skip_hf:
        runners.append(HFRunner(model_path, args.dtype))
    if model_path.suffix == ".gguf" and importlib.util.find_spec("llama_cpp") is not None:
        runners += [LlamaCppRunner(model_path, d) for d in [args.dtype] + ["float16"] * args.llama_cpp_f16]

    results = {}
    for r in runners:
        results[r.name] = measure(r, prompts, args.decode_tokens, args.batch_tokens)
        print(f"measured {r.name}", flush=True)
    cfg = trident.llm.engine.model_config
    weight_bytes = cfg.num_params * torch.finfo(getattr(torch, args.dtype)).bits // 8
    bytes_per_weight = {r.name: getattr(r, "bytes_per_weight", weight_bytes / cfg.num_params) for r in runners}
    copy_gbs = copy_bandwidth_gbs()
    model = trident.llm.engine.model
    floor_b1, floor_batch = matmul_floor_s(model, 1), matmul_floor_s(model, args.batch)
    for name, res in results.items():             # bytes of weights read per token, per second
        res["weight_read_gb_s_b1"] = cfg.num_params * bytes_per_weight[name] * res["decode_b1_tok_s"] / 1e9
        res["weight_read_vs_copy"] = res["weight_read_gb_s_b1"] / copy_gbs
    report = {
        "command": "python -m trident.bench.offline " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "batch": args.batch, "prefill_len": args.prefill_len,
        "machine": machine_info(), "torch": torch.__version__,
        "cpu_gemm": cpu_gemm.DISPATCH.summary() if args.dtype == "float32" else None,
        "weight_bytes": weight_bytes, "copy_bandwidth_gb_s": copy_gbs, "results": results,
        # Weights-only matmul passes: decode can never beat these rates on this machine.
        "ceiling_decode_b1_tok_s": 1 / floor_b1, "ceiling_decode_batch_tok_s": args.batch / floor_batch,
        "ceiling_weight_read_gb_s": weight_bytes / floor_b1 / 1e9,
    }
    if "transformers" in results:
        base = results["transformers"]
        report["ratios_vs_transformers"] = {
            k: results["trident"][k] / base[k] for k in ("decode_b1_tok_s", "decode_batch_tok_s", "prefill_tok_s")
        }
    same = f"llama.cpp {LLAMA_CPP_FTYPES[args.dtype][0]}"
    if same in results:
        report["ratios_vs_llama_cpp"] = {k: results["trident"][k] / results[same][k]
                                         for k in ("decode_b1_tok_s", "prefill_tok_s")}
    print_table(report)
    if args.json:                              # its folder was made by require_writable
        args.json.write_text(json.dumps(report, indent=2))
    return report


def print_table(report: dict) -> None:
    rows = [("time to ready (s)", "ready_s", "{:.2f}"), ("decode batch 1 (tok/s)", "decode_b1_tok_s", "{:.1f}"),
            (f"decode {report['batch']} concurrent (tok/s)", "decode_batch_tok_s", "{:.1f}"),
            (f"prefill {report['prefill_len']} tokens (tok/s)", "prefill_tok_s", "{:.0f}"),
            ("weight reads at batch 1 (GB/s)", "weight_read_gb_s_b1", "{:.1f}"),
            ("weight reads / memory copy", "weight_read_vs_copy", "{:.2f}")]
    names = list(report["results"])
    ratios = {label: report.get(key, {}) for label, key in (("trident / transformers", "ratios_vs_transformers"),
                                                            ("trident / llama.cpp", "ratios_vs_llama_cpp"))
              if key in report}
    print(f"\n{report['model']} {report['dtype']}, {report['threads']} threads, "
          f"memory copy {report['copy_bandwidth_gb_s']:.1f} GB/s; weights-only matmul ceiling: "
          f"batch 1 {report['ceiling_decode_b1_tok_s']:.1f} tok/s ({report['ceiling_weight_read_gb_s']:.1f} GB/s), "
          f"batch {report['batch']} {report['ceiling_decode_batch_tok_s']:.0f} tok/s")
    print("| metric | " + " | ".join(names + list(ratios)) + " |")
    print("|---" * (len(names) + len(ratios) + 1) + "|")
    for label, key, fmt in rows:
        cells = [fmt.format(report["results"][n][key]) if report["results"][n].get(key) is not None else "n/a"
                 for n in names]
        cells += [f"{r[key]:.2f}x" if key in r else "" for r in ratios.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
