"""CPU GEMM providers for the model's linear layers, chosen by measurement on each machine.

On a CPU a decode step is a pass over the weights, so its speed is the rate at which the GEMMs read
them, and the fastest GEMM form differs between CPUs and BLAS builds: torch's MKL reads the weights
at half the rate of numpy's OpenBLAS on some AMD processors and is the faster one on others, and a
one-row product padded to two rows is faster on one machine and slower on the next. No rule holds on
every CPU, so at engine start `GemmDispatch.measure` times every provider on the model's own weights
and the row counts decode uses, and the fastest one serves each row count from then on.

Providers, each computing y = x @ W^T (+ b) as a contiguous [rows, out] tensor:

    torch              F.linear
    torch-wm           torch.mm(W, x^T), transposed: W's rows are the GEMM's long first dimension
    torch-wm-pad       the same, with one row padded to two (BLAS would run a matrix-vector product)
    openblas           numpy's OpenBLAS on the same memory (zero-copy views), single-threaded, x @ W^T
    openblas-wm        numpy's OpenBLAS, single-threaded, W @ x^T

What is timed is a pass of x through every weight matrix of the model in forward order (pruned and
ragged shapes included, as the model holds them), per provider and row bucket (1, 2, 4, ... up to
the engine's batch), the providers taking turns pass by pass: a forward streams hundreds of
megabytes of differently shaped matrices, and timing one shape over and over measured caches and
thread wake-ups instead (per-shape choices made that way were slower in the engine than any single
provider). Inputs of more than MAX_ROWS rows (prefill chunks), other dtypes and devices, and
products that record gradients always take F.linear. Choices are cached in a JSON file per machine
(CPU model and flags), torch and numpy versions, thread count and model shapes, so later starts
read them instead of measuring. The last engine configured sets the process's dispatch.

Threads: torch's OpenMP pool owns the cores (set its size with OMP_NUM_THREADS or
torch.set_num_threads before the engine starts), and OpenBLAS runs single-threaded in the calling
thread (`configure` limits it through threadpoolctl). Two pools on the same cores oversubscribe
them: OpenBLAS's workers spin for a while after each call, and torch's next parallel region waits
on cores they hold. With both pools at two threads on a 2-core AMD EPYC, a decode step took 360 ms
with OpenBLAS products against 31 ms without; single-threaded, neither slows the other.

A pinned provider (`--cpu-gemm torch-wm-pad`, or TRIDENT_CPU_GEMM in the environment) serves every
decode-sized product with one form, so a result is the same bit for bit on any batch composition;
the test suite pins one for that reason.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trident.kernels.backend import cpu_info

log = logging.getLogger("trident.gemm")

MAX_ROWS = 64                       # decode-sized inputs; prefill chunks take F.linear
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
REPEATS = 5                         # timed passes per provider; the median counts
DEFAULT_PROVIDER = "torch-wm-pad"   # for a row count not measured (or before a measurement): the
                                    # form that leads at 1 row on the AVX-512 EPYC of bench/results

Provider = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _torch(x, w, b):
    return F.linear(x, w, b)


def _torch_wm(x, w, b, pad: bool = False):
    rows = x.shape[0]
    if rows == 1 and pad:
        x = F.pad(x, (0, 0, 0, 1))
    out = torch.mm(w, x.t()) if b is None else torch.addmm(b.unsqueeze(1), w, x.t())   # [out, rows]
    return out[:, :rows].t().contiguous()


def _torch_wm_pad(x, w, b):
    return _torch_wm(x, w, b, pad=True)


def _add_bias(y: torch.Tensor, b):
    return y if b is None else y.add_(b)


def _openblas(x, w, b):
    return _add_bias(torch.from_numpy(np.matmul(x.detach().numpy(), w.detach().numpy().T)), b)


def _openblas_wm(x, w, b):
    y = np.matmul(w.detach().numpy(), x.detach().numpy().T)            # [out, rows]
    return _add_bias(torch.from_numpy(np.ascontiguousarray(y.T)), b)


PROVIDERS: dict[str, Provider] = {"torch": _torch, "torch-wm": _torch_wm, "torch-wm-pad": _torch_wm_pad,
                                  "openblas": _openblas, "openblas-wm": _openblas_wm}
MODES = ("auto", *PROVIDERS)        # what --cpu-gemm accepts: measure, or pin one provider


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight^T is a product the dispatch serves: a float32 CPU batch of at most MAX_ROWS
    rows, in inference (numpy's products do not record gradients)."""
    return (x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.dtype == torch.float32
            and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")      # autocast: bf16 GEMMs
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def row_bucket(rows: int) -> int:
    return 1 << max(0, rows - 1).bit_length()


def cache_key(shapes: list[tuple[int, int]]) -> str:
    """What a measurement depends on: CPU model and flags, torch, numpy, thread count, model shapes."""
    cpu = cpu_info()
    parts = [cpu.model, " ".join(sorted(cpu.flags)), torch.__version__, np.__version__,
             str(torch.get_num_threads()), repr(shapes)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def single_threaded_blas() -> None:
    """OpenBLAS computes in the calling thread and keeps no pool (see the module docstring)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


@dataclass
class Measurement:
    provider: str
    gb_s: dict[str, float]          # provider -> weight bytes read per second over a model pass


@dataclass
class GemmDispatch:
    """The provider of every decode-sized float32 CPU product: one pinned provider, or the one
    measured fastest for the row count's bucket."""
    pinned: str | None = DEFAULT_PROVIDER
    choices: dict[int, Measurement] = field(default_factory=dict)     # row bucket -> measurement

    def provider_for(self, x: torch.Tensor) -> Provider:
        if self.pinned is not None:
            return PROVIDERS[self.pinned]
        choice = self.choices.get(row_bucket(x.shape[0]))
        return PROVIDERS[choice.provider if choice is not None else DEFAULT_PROVIDER]

    def pin(self, provider: str) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"unknown CPU GEMM provider {provider!r} (known: {', '.join(PROVIDERS)})")
        self.pinned = provider

    def measure(self, weights: list[torch.Tensor], max_rows: int = MAX_ROWS, cache_file: Path | None = None) -> None:
        """Choose by measurement for every row bucket up to max_rows, over passes through `weights`
        (the model's matrices in forward order); reads and extends `cache_file`."""
        self.pinned = None
        cached = _read_cache(cache_file)
        buckets = [b for b in ROW_BUCKETS if b <= row_bucket(max(1, min(max_rows, MAX_ROWS)))]
        started = time.perf_counter()
        missing = [b for b in buckets if b not in cached]
        for rows in missing:
            cached[rows] = time_providers(weights, rows)
        if missing:
            _write_cache(cache_file, cached)
            log.info("CPU GEMM: measured %d row counts in %.1fs%s", len(missing), time.perf_counter() - started,
                     f"; cached in {cache_file}" if cache_file else "")
        self.choices = {rows: cached[rows] for rows in buckets}
        log.info("CPU GEMM, weight-read rate of a model pass: %s", "; ".join(
            f"{rows} rows {m.provider} {m.gb_s[m.provider]:.1f} GB/s (next {_runner_up(m)})"
            for rows, m in self.choices.items()))

    def summary(self) -> dict:
        """The choices as JSON-ready rows (for bench reports)."""
        if self.pinned is not None:
            return {"pinned": self.pinned}
        return {"choices": [{"rows": r, "provider": m.provider, "gb_s": m.gb_s} for r, m in sorted(self.choices.items())]}


def _runner_up(m: Measurement) -> str:
    others = sorted(((g, p) for p, g in m.gb_s.items() if p != m.provider), reverse=True)
    return f"{others[0][1]} {others[0][0]:.1f}" if others else "none"


@torch.inference_mode()
def time_providers(weights: list[torch.Tensor], rows: int) -> Measurement:
    """Median weight-read rate of each provider over passes of x [rows, in] through every matrix of
    `weights` in order. The providers take turns pass by pass, so a passing load on the machine
    hits them alike."""
    xs = {in_features: torch.rand(rows, in_features) for in_features in {w.shape[1] for w in weights}}
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    names = [p for p in PROVIDERS if not (p == "torch-wm-pad" and rows > 1)]   # padding only changes 1 row
    passes: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(REPEATS + 1):                   # the first pass of each is a warm-up
        for name in names:
            fn = PROVIDERS[name]
            start = time.perf_counter()
            for w in weights:
                fn(xs[w.shape[1]], w, None)
            if repeat:
                passes[name].append(time.perf_counter() - start)
    gb_s = {name: nbytes / statistics.median(times) / 1e9 for name, times in passes.items()}
    return Measurement(max(gb_s, key=gb_s.get), gb_s)


def _read_cache(path: Path | None) -> dict[int, Measurement]:
    if path is None or not path.exists():
        return {}
    try:
        rows = json.loads(path.read_text())["choices"]
        return {int(r["rows"]): Measurement(r["provider"], r["gb_s"]) for r in rows if r["provider"] in PROVIDERS}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("CPU GEMM: ignoring unreadable cache %s (%s); measuring again", path, e)
        return {}


def _write_cache(path: Path | None, choices: dict[int, Measurement]) -> None:
    if path is None:
        return
    rows = [{"rows": r, "provider": m.provider, "gb_s": m.gb_s} for r, m in sorted(choices.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"torch": torch.__version__, "numpy": np.__version__,
                               "threads": torch.get_num_threads(), "choices": rows}, indent=1))
    tmp.replace(path)                                   # atomic: concurrent starts never read half a file


DISPATCH = GemmDispatch()
"""The process's dispatch: engines in one process share the CPU, so they share its choices."""


def configure(mode: str, weights: list[torch.Tensor], max_rows: int, cache_dir: Path) -> None:
    """Set the process's dispatch for an engine whose matrices are `weights` (forward order): `auto`
    measures (or reads the cache), a provider name pins it."""
    if mode not in MODES:
        raise ValueError(f"cpu_gemm must be one of {', '.join(MODES)}, got {mode!r}")
    single_threaded_blas()
    if mode == "auto":
        key = cache_key([tuple(w.shape) for w in weights])
        DISPATCH.measure(weights, max_rows, cache_dir / "cpu-gemm" / f"{key}.json")
    else:
        DISPATCH.pin(mode)
        log.info("CPU GEMM: %s for every decode-sized product (pinned)", mode)
