"""Fused early-exit classifier (RMSNorm + probe / LM-head statistics) vs its torch twin."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from kernel_harness import check_verdict, run_worker, worker_main  # noqa: E402

CASES = []
for i, (dtype, rows, hidden, vocab, criterion, probe) in enumerate([
    ("f32", 1, 64, 1001, "max_prob", True),
    ("f32", 7, 72, 1001, "probe", True),
    ("f32", 129, 64, 300, "margin", False),
    ("f32", 7, 48, 1, "entropy", True),
    ("f32", 33, 100, 517, "entropy", False),
    ("f32", 129, 72, None, "probe", True),
    ("f16", 1, 72, 1001, "probe", True),
    ("f16", 7, 64, 1001, "max_prob", False),
    ("f16", 129, 48, 257, "margin", True),
    ("f16", 7, 64, 17, "entropy", False),
    ("f16", 0, 64, 100, "max_prob", True),
    ("f32", 7, 64, 3001, "max_prob", False),     # several vocab tiles per program
    ("f16", 64, 32, 3001, "entropy", True),
    ("f32", 7, 32, -3001, "margin", False),      # negative: lm_head rows repeat, every max is tied
    ("f16", 40, 64, -1500, "max_prob", False),
]):
    CASES.append(dict(id=f"{i:02d}-{dtype}-r{rows}-h{hidden}-v{vocab}-{criterion}-probe{int(probe)}",
                      dtype=dtype, rows=rows, hidden=hidden, vocab=vocab, criterion=criterion,
                      probe=probe, seed=200 + i))


def _threshold(score, criterion: str) -> float:
    """A threshold in the widest gap near the middle of the twin's scores, so that rounding
    differences cannot move a row across it."""
    import torch

    values = score.sort().values
    if len(values) < 2:
        return float(values[0]) + (0.05 if criterion == "entropy" else -0.05) if len(values) else 0.5
    lo, hi = len(values) // 4, max(len(values) // 4 + 1, 3 * len(values) // 4)
    gaps = values[1:] - values[:-1]
    k = lo + int(torch.argmax(gaps[lo:hi]))
    return float(values[k] + values[k + 1]) / 2


def run_case(case: dict) -> list[str]:
    import torch

    from attention_data import DTYPES
    from kernel_harness import compare, compare_exact, tolerance
    from trident.kernels.exit_classifier import exit_classifier, exit_classifier_ref

    gen = torch.Generator().manual_seed(case["seed"])
    dtype, rows, hidden = DTYPES[case["dtype"]], case["rows"], case["hidden"]
    # Rows come strided out of a wider activation buffer, as they would from an index gather.
    x = (torch.randn(rows, hidden + 8, generator=gen) * 3).to(dtype)[:, :hidden]
    norm_weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    probe_weight = (torch.randn(hidden, generator=gen) / hidden ** 0.5).to(dtype) if case["probe"] else None
    vocab = case["vocab"]
    lm_head = None if vocab is None else (torch.randn(abs(vocab), hidden, generator=gen) * 3 / hidden ** 0.5).to(dtype)
    if vocab is not None and vocab < 0:    # ids 0..299 repeat across tiles and chunks
        lm_head = lm_head[torch.arange(-vocab) % 300].contiguous()
    kwargs = dict(criterion=case["criterion"], probe_weight=probe_weight, probe_bias=0.1, lm_head=lm_head)
    ref = exit_classifier_ref(x, norm_weight, 1e-6, 0.0, **kwargs)
    score = ref.probe_score if case["criterion"] == "probe" else getattr(ref, case["criterion"])
    threshold = _threshold(score, case["criterion"])
    ref = exit_classifier_ref(x, norm_weight, 1e-6, threshold, **kwargs)
    got = exit_classifier(x, norm_weight, 1e-6, threshold, **kwargs)

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else tolerance(dtype)
    failures = []
    for name in ("probe_score", "logsumexp", "max_prob", "margin", "entropy"):
        expected, actual = getattr(ref, name), getattr(got, name)
        if (expected is None) != (actual is None):
            failures.append(f"{name}: got {actual is not None}, expected {expected is not None}")
        elif expected is not None:
            failures += compare(name, actual, expected, **tol)
    if lm_head is not None:
        clear = ref.margin > 1e-3                        # ties within rounding may pick either id
        failures += compare_exact("argmax", got.argmax[clear], ref.argmax[clear])
    if vocab is not None and vocab < 0:
        # Ids i and i + 300 share a weight row: the kernel must land on the same row as the twin.
        # Which copy it reports, and a margin of exactly 0, rest on bit-equal logits, which the
        # interpreter's matmul (numpy) does not promise across tiles: check the row, and the margin
        # to rounding.
        failures += compare_exact("tied argmax row", got.argmax % 300, ref.argmax % 300)
        failures += compare("tied margin", got.margin, torch.zeros_like(got.margin), atol=1e-6, rtol=0)
    for name in ("exit_mask", "exit_rows", "continue_rows"):
        failures += compare_exact(name, getattr(got, name), getattr(ref, name))
    if score.unique().numel() > 1 and not 0 < len(got.exit_rows) < rows:
        failures.append(f"threshold {threshold} should split the rows, got {len(got.exit_rows)} exits of {rows}")
    return failures


@pytest.fixture(scope="module")
def verdicts():
    return run_worker(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_exit_classifier(case, verdicts):
    check_verdict(verdicts, case["id"])


if __name__ == "__main__":
    worker_main(CASES, run_case)
