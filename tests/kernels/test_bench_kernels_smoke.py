"""bench/kernels.py on CPU: its argument parsing and the no-GPU exit, and every benchmark body
run once on tiny problems through the Triton interpreter (timings faked), so a GPU session
spends its time measuring rather than debugging the script."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from kernel_harness import REPO_ROOT, check_verdict, run_worker, worker_main  # noqa: E402

CASES = [dict(id=op, op=op) for op in ("prefill", "decode", "exit", "fused")]


def run_case(case: dict) -> list[str]:
    import json

    import torch

    import trident.bench.kernels as bk

    bk.timed = lambda fn, rep_ms: (fn(), dict(median_ms=1.0, p20_ms=0.9, p80_ms=1.1))[1]
    problem = bk.Problem(device="cpu", dtype=torch.float16, prefill_tokens=40, prefill_heads=((16, 4, 2),),
                         decode_heads=(16, 4, 1), decode_shapes=((2, 48),), exit_hidden=32, exit_vocab=300,
                         exit_rows=(1, 3), fused_tokens=(5,), fused_sizes=(32, 48, 4, 2, 16))
    rec = bk.Recorder(dict(bf16_matmul_tflops=1.0, copy_gbps=1.0), rep_ms=1)
    bk.BENCHES[case["op"]](rec, problem, quick=False)
    json.dumps(rec.rows)                  # the rows must serialize as they are
    baselines = ("_torch", "_sdpa_flash", "_sdpa_contiguous", "_unfused")
    kernel_rows = [row for row in rec.rows if not row["op"].endswith(baselines)]
    missing = [row["op"] for row in kernel_rows if "fraction_of_peak" not in row and "time_vs_dense" not in row]
    return ([] if kernel_rows else ["no kernel rows"]) + [f"{op}: no rate against a peak or dense" for op in missing]


def test_cli_without_gpu():
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import trident.bench.kernels as bk

    assert bk.parse_args(["--ops", "decode,exit", "--quick"]).ops == ["decode", "exit"]
    with pytest.raises(SystemExit):
        bk.parse_args(["--ops", "nope"])
    if not bk.torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA GPU"):
            bk.main(["--quick"])


@pytest.fixture(scope="module")
def verdicts():
    return run_worker(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bench_body_runs(case, verdicts):
    check_verdict(verdicts, case["id"])


if __name__ == "__main__":
    worker_main(CASES, run_case)
