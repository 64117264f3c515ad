"""Run kernel test cases in a child process under Triton's interpreter and report per case.

A test module lists its cases as plain data (`CASES`, each a dict with an "id") and a
`run_case(case) -> list[str]` that returns failure messages. Run as a script, the module is the
worker: it executes the cases (or the ids given on the command line) and prints one verdict line
per case as it finishes, so a crash (an out-of-bounds load can kill the process) still leaves the
verdicts of the cases before it. Under pytest, a module-scoped fixture starts that worker once
and each parametrized test reads its own verdict.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
VERDICT = "VERDICT "
SKIP = "skipped: "


def run_worker(test_file: str, interpret: bool = True, timeout_s: float = 600) -> dict[str, str | None]:
    """Run `test_file` as a worker, with TRITON_INTERPRET=1 (or 0) set before anything imports
    triton. Returns {case id: None if it passed, else the failure text}; a missing id means the
    worker died first, and "__worker__" holds its exit status and stderr tail."""
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, test_file], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout_s)
    verdicts: dict[str, str | None] = {}
    for line in proc.stdout.splitlines():
        if line.startswith(VERDICT):
            record = json.loads(line[len(VERDICT):])
            verdicts[record["id"]] = record["error"]
    verdicts["__worker__"] = f"worker exit status {proc.returncode}; stderr tail:\n{proc.stderr[-4000:]}"
    return verdicts


class SkipCase(Exception):
    """Raised by a case that cannot run on this machine; reported as a pytest skip."""


def check_verdict(verdicts: dict[str, str | None], case_id: str) -> None:
    import pytest

    if case_id not in verdicts:
        raise AssertionError(f"no verdict for {case_id}: the worker died before it finished.\n"
                             f"{verdicts['__worker__']}")
    verdict = verdicts[case_id]
    if verdict is not None and verdict.startswith(SKIP):
        pytest.skip(verdict[len(SKIP):])
    if verdict is not None:
        raise AssertionError(verdict)


def worker_main(cases: list[dict], run_case: Callable[[dict], list[str]], interpret: bool = True) -> None:
    """Entry point of a worker process: run the selected cases, one verdict line each."""
    if (os.environ.get("TRITON_INTERPRET") == "1") != interpret:
        sys.exit(f"this worker needs TRITON_INTERPRET={int(interpret)} in the environment before triton is imported")
    import numpy

    numpy.seterr(all="ignore")  # the interpreter also computes masked-off lanes (inf - inf, log 0)
    wanted = set(sys.argv[1:])
    for case in cases:
        if wanted and case["id"] not in wanted:
            continue
        try:
            failures = run_case(case)
            error = "\n".join(failures) if failures else None
        except SkipCase as skip:
            error = SKIP + str(skip)
        except Exception:  # a failing case must not hide the verdicts of the others
            error = traceback.format_exc()
        print(VERDICT + json.dumps({"id": case["id"], "error": error}), flush=True)


def compare(name: str, got, expected, atol: float, rtol: float) -> list[str]:
    """[] if |got - expected| <= atol + rtol |expected| everywhere (NaNs must match), else one
    message naming the worst element: index, got, expected."""
    import torch

    if got.shape != expected.shape:
        return [f"{name}: shape {tuple(got.shape)} != expected {tuple(expected.shape)}"]
    if got.numel() == 0:
        return []
    got64, exp64 = got.detach().double().cpu(), expected.detach().double().cpu()
    excess = (got64 - exp64).abs() - (atol + rtol * exp64.abs())
    excess = torch.where(got64.isnan() & exp64.isnan(), -1.0, excess.nan_to_num(float("inf")))
    worst = int(excess.argmax())
    if excess.view(-1)[worst] <= 0:
        return []
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), got.shape))
    bad = int((excess > 0).sum())
    return [f"{name}: {bad}/{got.numel()} elements off (atol {atol}, rtol {rtol}); worst at {index}: "
            f"got {got64.view(-1)[worst].item():.6g}, expected {exp64.view(-1)[worst].item():.6g}"]


def compare_exact(name: str, got, expected) -> list[str]:
    """[] if equal; else the first differing element."""
    if got.shape != expected.shape:
        return [f"{name}: shape {tuple(got.shape)} != expected {tuple(expected.shape)}"]
    diff = (got.cpu() != expected.cpu()).nonzero()
    if len(diff) == 0:
        return []
    index = tuple(int(i) for i in diff[0])
    return [f"{name}: {len(diff)}/{got.numel()} elements differ; first at {index}: "
            f"got {got.cpu()[index].item()}, expected {expected.cpu()[index].item()}"]


def tolerance(dtype) -> dict[str, float]:
    """Per-dtype tolerance for outputs rounded to dtype."""
    import torch

    return {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}[dtype]
