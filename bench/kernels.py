"""Kernel benchmarks on CUDA: each Triton op against the device's measured peak and a torch baseline.

    python -m trident.bench.kernels                      # every op, full sweeps
    python -m trident.bench.kernels --ops prefill,decode --quick

Per configuration: median and p20-p80 spread of the time (triton.testing.do_bench), achieved
TFLOP/s (attention, dense-equivalent for pruned runs) or GB/s (decode, exit classifier, fused
elementwise ops) as a fraction of the peak measured here (a large bf16 matmul, a large copy), and
the torch baseline's time. The pruning sweeps vary the kept fraction of query heads and of tokens
and report time against the dense run. Results go to bench/results/kernels-<device>-<time>.json
with the device, library versions and the exact command.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

RESULTS_DIR = Path(__file__).resolve().parent / "results"
OPS = ("prefill", "decode", "exit", "fused")
FRACTIONS = (1.0, 0.75, 0.5, 0.25)


@dataclass(frozen=True)
class Problem:
    """Problem sizes; the defaults are the targets' (Llama-3-8B-like heads, 128k vocabulary)."""
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    prefill_tokens: int = 4096
    prefill_heads: tuple = ((64, 32, 8), (128, 32, 8))           # (head_dim, Hq, Hkv)
    decode_heads: tuple = (128, 32, 8)
    decode_shapes: tuple = ((32, 32768), (64, 16384), (8, 131072))  # (batch, context): >= 1M keys
    exit_hidden: int = 4096
    exit_vocab: int = 128256
    exit_rows: tuple = (1, 8, 32, 64)
    fused_tokens: tuple = (64, 4096)
    fused_sizes: tuple = (4096, 14336, 32, 8, 128)                # hidden, ffn, Hq, Hkv, head_dim


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--quick", action="store_true", help="fewer configurations and shorter timing runs")
    parser.add_argument("--out", type=Path, default=None, help="result file (default under bench/results/)")
    args = parser.parse_args(argv)
    args.ops = [op for op in args.ops.split(",") if op]
    unknown = set(args.ops) - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    return args


def timed(fn, rep_ms: int) -> dict:
    """Median and p20/p80 of fn's time in ms (CUDA events, L2 flushed between runs)."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return dict(median_ms=median, p20_ms=p20, p80_ms=p80)


def measure_peaks(rep_ms: int) -> dict:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul_ms = timed(lambda: a @ b, rep_ms)["median_ms"]
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src), rep_ms)["median_ms"]
    return dict(bf16_matmul_tflops=2 * n ** 3 / matmul_ms / 1e9, copy_gbps=2 * src.numel() / copy_ms / 1e6)


class Recorder:
    """Times runs and collects result rows with their achieved rates."""

    def __init__(self, peaks: dict, rep_ms: int):
        self.peaks, self.rep_ms, self.rows = peaks, rep_ms, []

    def run(self, op: str, config: dict, fn, *, flops: float = 0.0, bytes_moved: float = 0.0,
            baseline: dict | None = None, dense: dict | None = None) -> dict:
        t = timed(fn, self.rep_ms)
        row = dict(op=op, config=config, **t)
        if flops:
            row["tflops"] = flops / t["median_ms"] / 1e9
            row["fraction_of_peak"] = row["tflops"] / self.peaks["bf16_matmul_tflops"]
        if bytes_moved:
            row["gbps"] = bytes_moved / t["median_ms"] / 1e6
            row["fraction_of_peak"] = row["gbps"] / self.peaks["copy_gbps"]
        if baseline is not None:
            row["baseline_median_ms"] = baseline["median_ms"]
            row["speedup_vs_baseline"] = baseline["median_ms"] / t["median_ms"]
        if dense is not None:
            row["time_vs_dense"] = t["median_ms"] / dense["median_ms"]
        self.rows.append(row)
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "config"}
        print(op, config, shown, flush=True)
        return t


def paged_problem(p: Problem, seq_lens: list[int], new_counts: list[int], num_q_heads: int,
                  num_kv_heads: int, head_dim: int, block_size: int = 16):
    """Caches whose sequences sit in consecutive blocks (so they also view as contiguous [S, L])."""
    from trident.kernels.metadata import AttentionMetadata

    tables, next_block = [], 0
    for n in seq_lens:
        count = -(-n // block_size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    meta = AttentionMetadata.build(tables, seq_lens, new_counts, block_size, device=p.device)
    shape = (next_block * block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, device=p.device, dtype=p.dtype) for _ in range(2))
    q = torch.randn(sum(new_counts), num_q_heads, head_dim, device=p.device, dtype=p.dtype)
    return q, k_cache, v_cache, meta


def keep_tokens(meta, fraction: float, prefill: bool):
    """Metadata where each sequence keeps a random `fraction` of its keys (original positions);
    in prefill the dropped tokens are dropped as queries too, as in the deeper layers."""
    from trident.kernels.metadata import AttentionMetadata, keep_keys

    gen = torch.Generator().manual_seed(0)
    width = max(1, round(fraction * meta.key_slots.shape[1]))
    kept = keep_keys(meta, [torch.randperm(meta.key_slots.shape[1], generator=gen)[:width].sort().values
                            for _ in range(meta.num_seqs)])
    if not prefill:
        return kept
    assert meta.num_seqs == 1, "token-dropped prefill is benchmarked on one sequence"
    return AttentionMetadata(kept.key_slots[0], kept.key_positions[0], [0, width], kept.key_slots,
                             kept.key_positions, False)


def kept_heads(num_q_heads: int, fraction: float, device: str, group_size: int = 1) -> torch.Tensor:
    """A random `fraction` of the query heads, taken in whole groups of `group_size` (decode only
    reads less when every query head of a KV head goes)."""
    num_groups = num_q_heads // group_size
    count = max(1, round(fraction * num_groups))
    groups = torch.randperm(num_groups, generator=torch.Generator().manual_seed(0))[:count]
    return (groups[:, None] * group_size + torch.arange(group_size)).flatten().to(device)


def bench_prefill(rec: Recorder, p: Problem, quick: bool) -> None:
    from trident.kernels.prefill_attention import prefill_attention

    tokens = p.prefill_tokens
    for head_dim, num_q_heads, num_kv_heads in p.prefill_heads:
        q, k_cache, v_cache, meta = paged_problem(p, [tokens], [tokens], num_q_heads, num_kv_heads, head_dim)
        scale, group = head_dim ** -0.5, num_q_heads // num_kv_heads
        dense_flops = 4 * num_q_heads * head_dim * tokens * (tokens + 1) / 2   # causal: half of QK^T and PV
        config = dict(tokens=tokens, q_heads=num_q_heads, kv_heads=num_kv_heads, head_dim=head_dim)
        qc = q.transpose(0, 1).unsqueeze(0)                                  # [1, Hq, T, D]
        kc, vc = (c[:tokens].transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0) for c in (k_cache, v_cache))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            base = rec.run("prefill_sdpa_flash", config, flops=dense_flops,
                           fn=lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale))
        dense = rec.run("prefill", config, lambda: prefill_attention(q, k_cache, v_cache, meta, scale),
                        flops=dense_flops, baseline=base)
        for heads in FRACTIONS if not quick else (1.0, 0.5):
            for kept_tokens in FRACTIONS if not quick else (1.0, 0.5):
                if heads == kept_tokens == 1.0:
                    continue
                pruned = keep_tokens(meta, kept_tokens, prefill=True) if kept_tokens < 1 else meta
                kept = kept_heads(num_q_heads, heads, p.device)
                q_run = q[pruned.query_positions] if kept_tokens < 1 else q
                rec.run("prefill_pruned", dict(config, kept_heads=heads, kept_tokens=kept_tokens),
                        lambda: prefill_attention(q_run, k_cache, v_cache, pruned, scale, kept),
                        flops=dense_flops, baseline=base, dense=dense)


def bench_decode(rec: Recorder, p: Problem, quick: bool) -> None:
    from trident.kernels.decode_attention import decode_attention

    head_dim, num_q_heads, num_kv_heads = p.decode_heads
    group, scale = num_q_heads // num_kv_heads, head_dim ** -0.5
    for batch, context in p.decode_shapes[:1] if quick else p.decode_shapes:
        q, k_cache, v_cache, meta = paged_problem(p, [context] * batch, [1] * batch, num_q_heads, num_kv_heads,
                                                  head_dim)
        config = dict(batch=batch, context=context, q_heads=num_q_heads, kv_heads=num_kv_heads, head_dim=head_dim)
        # K and V, plus the int64 slot and position of every key.
        kv_bytes = batch * context * (2 * num_kv_heads * head_dim * k_cache.element_size() + 16)
        kc, vc = (c.view(batch, context, num_kv_heads, head_dim).transpose(1, 2) for c in (k_cache, v_cache))
        qc = q.unsqueeze(2)                                                  # [S, Hq, 1, D]
        base = rec.run("decode_sdpa_contiguous", config, bytes_moved=kv_bytes,
                       fn=lambda: F.scaled_dot_product_attention(qc, kc, vc, scale=scale, enable_gqa=True))
        dense = rec.run("decode", config, lambda: decode_attention(q, k_cache, v_cache, meta, scale),
                        bytes_moved=kv_bytes, baseline=base)
        mass = torch.zeros(meta.key_slots.shape, device=p.device)
        rec.run("decode_key_mass", config, lambda: decode_attention(q, k_cache, v_cache, meta, scale, key_mass=mass),
                bytes_moved=kv_bytes, dense=dense)
        for heads in FRACTIONS[1:] if not quick else (0.5,):
            kept = kept_heads(num_q_heads, heads, p.device, group)
            rec.run("decode_pruned", dict(config, kept_heads=heads, kept_tokens=1.0),
                    lambda: decode_attention(q, k_cache, v_cache, meta, scale, kept),
                    bytes_moved=kv_bytes * kept.numel() / num_q_heads, dense=dense)
        for kept_tokens in FRACTIONS[1:] if not quick else (0.5,):
            pruned = keep_tokens(meta, kept_tokens, prefill=False)
            rec.run("decode_pruned", dict(config, kept_heads=1.0, kept_tokens=kept_tokens),
                    lambda: decode_attention(q, k_cache, v_cache, pruned, scale),
                    bytes_moved=kv_bytes * kept_tokens, dense=dense)


def exit_baseline(hidden, norm_weight, lm_head):
    """Unfused torch: norm, full logits, softmax statistics."""
    x = hidden.float()
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_weight.float()).to(hidden.dtype)
    logits = (normed @ lm_head.t()).float()
    lse = torch.logsumexp(logits, -1)
    top = logits.topk(2, -1)
    return lse, top, (torch.exp(logits - lse[:, None]) * logits).sum(-1)


def bench_exit(rec: Recorder, p: Problem, quick: bool) -> None:
    from trident.kernels.exit_classifier import exit_classifier

    hidden_size, vocab = p.exit_hidden, p.exit_vocab
    lm_head = torch.randn(vocab, hidden_size, device=p.device, dtype=p.dtype) * hidden_size ** -0.5
    norm_weight = torch.ones(hidden_size, device=p.device, dtype=p.dtype)
    probe_weight = torch.randn(hidden_size, device=p.device, dtype=p.dtype)
    for rows in p.exit_rows[-2:] if quick else p.exit_rows:
        hidden = torch.randn(rows, hidden_size, device=p.device, dtype=p.dtype)
        config = dict(rows=rows, hidden=hidden_size, vocab=vocab)
        weight_bytes = lm_head.numel() * lm_head.element_size()
        base = rec.run("exit_torch_unfused", config, lambda: exit_baseline(hidden, norm_weight, lm_head),
                       bytes_moved=weight_bytes)
        rec.run("exit_lm_head_stats", config, bytes_moved=weight_bytes, baseline=base,
                fn=lambda: exit_classifier(hidden, norm_weight, 1e-6, 0.9, "max_prob", lm_head=lm_head))
        rec.run("exit_probe", config, bytes_moved=2 * hidden.numel() * hidden.element_size(),
                fn=lambda: exit_classifier(hidden, norm_weight, 1e-6, 0.5, "probe", probe_weight=probe_weight))


def bench_fused(rec: Recorder, p: Problem, quick: bool) -> None:
    from trident.kernels.fused_norm import add_rms_norm, add_rms_norm_ref
    from trident.kernels.rope import rope_cos_sin, rope_write_kv, rope_write_kv_ref
    from trident.kernels.swiglu import swiglu, swiglu_ref

    hidden, ffn, heads, kv_heads, head_dim = p.fused_sizes
    new = dict(device=p.device, dtype=p.dtype)
    for tokens in p.fused_tokens[-1:] if quick else p.fused_tokens:
        x, res = (torch.randn(tokens, hidden, **new) for _ in range(2))
        w = torch.ones(hidden, **new)
        base = rec.run("add_rms_norm_torch", dict(tokens=tokens, hidden=hidden),
                       lambda: add_rms_norm_ref(x, res, w, 1e-6))
        rec.run("add_rms_norm", dict(tokens=tokens, hidden=hidden), lambda: add_rms_norm(x, res, w, 1e-6),
                bytes_moved=4 * x.numel() * x.element_size(), baseline=base)
        gate_up = torch.randn(tokens, 2 * ffn, **new)
        base = rec.run("swiglu_torch", dict(tokens=tokens, ffn=ffn), lambda: swiglu_ref(gate_up))
        rec.run("swiglu", dict(tokens=tokens, ffn=ffn), lambda: swiglu(gate_up),
                bytes_moved=3 * tokens * ffn * gate_up.element_size(), baseline=base)
        qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, **new)
        inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, device=p.device) / head_dim)
        cos, sin = rope_cos_sin(inv_freq, tokens)
        caches = [torch.empty(tokens, kv_heads, head_dim, **new) for _ in range(2)]
        args = (qkv, heads, cos, sin, *caches, torch.arange(tokens, device=p.device))
        config = dict(tokens=tokens, q_heads=heads, kv_heads=kv_heads, head_dim=head_dim)
        base = rec.run("rope_write_kv_torch", config, lambda: rope_write_kv_ref(*args))
        rec.run("rope_write_kv", config, lambda: rope_write_kv(*args), baseline=base,
                bytes_moved=2 * qkv.numel() * qkv.element_size())


BENCHES = dict(prefill=bench_prefill, decode=bench_decode, exit=bench_exit, fused=bench_fused)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.kernels measures the Triton kernels on a CUDA GPU; none is available here. "
                 "The kernels are tested on CPU by `pytest tests/kernels` (Triton interpreter).")
    import triton

    rep_ms = 50 if args.quick else 200
    peaks = measure_peaks(rep_ms)
    print("peaks", peaks, flush=True)
    rec, problem = Recorder(peaks, rep_ms), Problem()
    for op in args.ops:
        BENCHES[op](rec, problem, args.quick)
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    out = args.out or RESULTS_DIR / f"kernels-{device.replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        device=device, capability=list(torch.cuda.get_device_capability()), torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        command=shlex.join(sys.orig_argv), peaks=peaks, results=rec.rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
