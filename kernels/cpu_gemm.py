"""CPU GEMM providers for the model's linear layers, chosen by measurement on each machine.

On a CPU a decode step is a pass over the weights, so its speed is the rate at which the GEMMs read
them, and the fastest GEMM form differs between CPUs and BLAS builds: torch's MKL reads the weights
at half the rate of numpy's OpenBLAS on some AMD processors and is the faster one on others, and a
one-row product padded to two rows is faster on one machine and slower on the next. No rule holds on
every CPU, so `GemmDispatch.measure` times every provider on the model's own weight shapes and the
row counts decode uses, and the fastest one serves each (shape class, row bucket) from then on.

Providers, each computing y = x @ W^T (+ b) as a contiguous [rows, out] tensor:

    torch              F.linear
    torch-wm           torch.mm(W, x^T), transposed: W's rows are the GEMM's long first dimension
    torch-wm-pad       the same, with one row padded to two (BLAS would run a matrix-vector product)
    openblas           numpy's OpenBLAS on the same memory (zero-copy views), single-threaded, x @ W^T
    openblas-wm        numpy's OpenBLAS, W @ x^T

The measurement covers float32 CPU inputs of up to MAX_ROWS rows (decode steps); larger inputs
(prefill) and other dtypes and devices always take F.linear. A choice is kept per shape class (both
dimensions rounded to a power of sqrt(2), so a width-pruned model's ragged shapes share the
measurements of their neighbours) and per row bucket (1, 2, 4, ... 64). Choices are cached in a JSON
file per machine (CPU model and flags), torch and numpy versions and thread count, so later starts
read them instead of measuring.

Threads: torch's OpenMP pool owns the cores (set its size with OMP_NUM_THREADS or
torch.set_num_threads before the engine starts), and OpenBLAS runs single-threaded in the calling
thread (`configure` limits it through threadpoolctl). Two pools on the same cores oversubscribe
them: OpenBLAS's workers spin for a while after each call, and torch's next parallel region waits
on cores they hold. With both pools at two threads on a 2-core AMD EPYC, a decode step took 360 ms
with OpenBLAS products against 31 ms without; single-threaded, no step slows the other provider.

A pinned provider (`--cpu-gemm torch-wm-pad`, or TRIDENT_CPU_GEMM in the environment) serves every
decode-sized product with one form, so a result is the same bit for bit on any batch composition;
the test suite pins one for that reason.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("trident.gemm")

MAX_ROWS = 64                       # decode-sized inputs; prefill chunks take F.linear
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
COLD_BYTES = 64 << 20               # weight copies per timing: past the L3 caches, as a forward streams
REPEATS = 3
DEFAULT_PROVIDER = "torch-wm-pad"   # before (or without) a measurement: the form measured fastest on
                                    # the AVX-512 machine this dispatch was first written on
MODES = ("auto", "torch", "torch-wm", "torch-wm-pad", "openblas", "openblas-wm")

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


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight^T is a product the dispatch serves: a float32 CPU batch of at most MAX_ROWS
    rows, in inference (numpy's products do not record gradients)."""
    return (x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.dtype == torch.float32
            and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")      # autocast: bf16 GEMMs
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def row_bucket(rows: int) -> int:
    return 1 << max(0, rows - 1).bit_length()


def size_class(n: int) -> int:
    """n rounded to the nearest power of sqrt(2), as an integer."""
    return round(2 ** (round(2 * math.log2(n)) / 2))


def shape_class(out_features: int, in_features: int) -> tuple[int, int]:
    return size_class(out_features), size_class(in_features)


def machine_key() -> str:
    """What a measurement depends on: CPU model and flags, torch, numpy, OpenBLAS and thread count."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    parts = [*lines, torch.__version__, np.__version__, str(torch.get_num_threads())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def single_threaded_blas() -> None:
    """OpenBLAS computes in the calling thread and keeps no pool (see the module docstring)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


@dataclass
class Measurement:
    provider: str
    gb_s: dict[str, float]          # provider -> weight bytes read per second


@dataclass
class GemmDispatch:
    """The provider of every decode-sized float32 CPU product: one pinned provider, or the fastest
    measured one per (shape class, row bucket)."""
    pinned: str | None = DEFAULT_PROVIDER
    choices: dict[tuple[int, int, int], Measurement] = field(default_factory=dict)

    def provider_for(self, x: torch.Tensor, weight: torch.Tensor) -> Provider:
        if self.pinned is not None:
            return PROVIDERS[self.pinned]
        key = (*shape_class(*weight.shape), row_bucket(x.shape[0]))
        choice = self.choices.get(key)
        return PROVIDERS[choice.provider if choice is not None else DEFAULT_PROVIDER]

    def pin(self, provider: str) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"unknown CPU GEMM provider {provider!r} (known: {', '.join(PROVIDERS)})")
        self.pinned = provider

    def measure(self, shapes: Iterable[tuple[int, int]], max_rows: int = MAX_ROWS,
                cache_file: Path | None = None) -> None:
        """Choose by measurement for every shape class of `shapes` ((out, in) of the weights) and
        every row bucket up to max_rows; reads and extends `cache_file`."""
        self.pinned = None
        cached = _read_cache(cache_file)
        classes: dict[tuple[int, int], tuple[int, int]] = {}
        for shape in shapes:                            # the first shape seen stands for its class
            classes.setdefault(shape_class(*shape), shape)
        buckets = [b for b in ROW_BUCKETS if b <= row_bucket(max(1, min(max_rows, MAX_ROWS)))]
        started, measured = time.perf_counter(), 0
        for cls, shape in classes.items():
            for rows in buckets:
                key = (*cls, rows)
                if key not in cached:
                    cached[key] = time_providers(shape, rows)
                    measured += 1
                self.choices[key] = cached[key]
        if measured:
            _write_cache(cache_file, cached)
            log.info("CPU GEMM: measured %d shape x row cases in %.1fs%s", measured, time.perf_counter() - started,
                     f"; cached in {cache_file}" if cache_file else "")
        for cls, shape in classes.items():             # one line per weight shape: choice and why
            cases = [f"{rows} rows {m.provider} {m.gb_s[m.provider]:.1f} GB/s (next {_runner_up(m)})"
                     for rows in buckets for m in [self.choices[(*cls, rows)]]]
            log.info("CPU GEMM %dx%d: %s", *shape, "; ".join(cases))

    def summary(self) -> dict:
        """The choices as JSON-ready rows (for bench reports)."""
        if self.pinned is not None:
            return {"pinned": self.pinned}
        return {"choices": [{"shape_class": [o, i], "rows": r, "provider": m.provider, "gb_s": m.gb_s}
                            for (o, i, r), m in sorted(self.choices.items())]}


def _runner_up(m: Measurement) -> str:
    others = sorted(((g, p) for p, g in m.gb_s.items() if p != m.provider), reverse=True)
    return f"{others[0][1]} {others[0][0]:.1f}" if others else "none"


def time_providers(shape: tuple[int, int], rows: int) -> Measurement:
    """Median weight-read rate of each provider for x [rows, in] @ W^T over cold copies of W. The
    providers take turns pass by pass, so a passing load on the machine hits them alike."""
    out_features, in_features = shape
    nbytes = out_features * in_features * 4
    weights = [torch.rand(out_features, in_features) for _ in range(max(2, min(COLD_BYTES // nbytes, 512)))]
    x = torch.rand(rows, in_features)
    names = [p for p in PROVIDERS if not (p == "torch-wm-pad" and rows > 1)]   # padding only changes 1 row
    passes: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(REPEATS + 1):                   # the first pass of each is a warm-up
        for name in names:
            fn = PROVIDERS[name]
            start = time.perf_counter()
            for w in weights:
                fn(x, w, None)
            if repeat:
                passes[name].append((time.perf_counter() - start) / len(weights))
    gb_s = {name: nbytes / statistics.median(times) / 1e9 for name, times in passes.items()}
    return Measurement(max(gb_s, key=gb_s.get), gb_s)


def _read_cache(path: Path | None) -> dict[tuple[int, int, int], Measurement]:
    if path is None or not path.exists():
        return {}
    try:
        rows = json.loads(path.read_text())["choices"]
        return {(r["out"], r["in"], r["rows"]): Measurement(r["provider"], r["gb_s"]) for r in rows
                if r["provider"] in PROVIDERS}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("CPU GEMM: ignoring unreadable cache %s (%s); measuring again", path, e)
        return {}


def _write_cache(path: Path | None, choices: dict[tuple[int, int, int], Measurement]) -> None:
    if path is None:
        return
    rows = [{"out": o, "in": i, "rows": r, "provider": m.provider, "gb_s": m.gb_s}
            for (o, i, r), m in sorted(choices.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"torch": torch.__version__, "numpy": np.__version__,
                               "threads": torch.get_num_threads(), "choices": rows}, indent=1))
    tmp.replace(path)                                   # atomic: concurrent starts never read half a file


DISPATCH = GemmDispatch()
"""The process's dispatch: engines in one process share the CPU, so they share its choices."""


def configure(mode: str, shapes: Iterable[tuple[int, int]], max_rows: int, cache_dir: Path) -> None:
    """Set the process's dispatch for an engine: `auto` measures (or reads the cache), a provider
    name pins it."""
    if mode not in MODES:
        raise ValueError(f"cpu_gemm must be one of {', '.join(MODES)}, got {mode!r}")
    single_threaded_blas()
    if mode == "auto":
        DISPATCH.measure(shapes, max_rows, cache_dir / "cpu-gemm" / f"{machine_key()}.json")
    else:
        DISPATCH.pin(mode)
        log.info("CPU GEMM: %s for every decode-sized product (pinned)", mode)
