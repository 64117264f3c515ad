"""Decode attention kernel (split-K, grouped query heads) vs the attention twin (the CPU path) and dense SDPA."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from kernel_harness import check_verdict, run_worker, worker_main  # noqa: E402

# (Hq, Hkv) covering GQA groups 1, 3, 4, 8 and a single head.
HEADS = [(1, 1), (4, 4), (6, 2), (8, 2), (8, 1)]
# Context lengths in one batch: short next to long leaves some splits of the short ones empty.
LENS = [[7], [1, 7, 129], [129, 1], [300, 5, 64]]

CASES = []
for i, (dtype, heads, head_dim, block_size, lens, splits, kept, prune) in enumerate([
    ("f32", HEADS[0], 16, 16, LENS[0], None, "all", None),
    ("f32", HEADS[1], 32, 32, LENS[1], 1, "all", None),
    ("f32", HEADS[2], 16, 16, LENS[2], 3, "all", None),
    ("f32", HEADS[3], 64, 16, LENS[3], 8, "shuffled", None),
    ("f32", HEADS[4], 40, 32, LENS[1], 2, "all", "shuffled"),
    ("f32", HEADS[3], 16, 16, LENS[3], None, "drop_group", "sorted"),
    ("f32", HEADS[2], 16, 32, LENS[1], 3, "empty", None),
    ("f32", HEADS[1], 16, 16, LENS[3], 4, "shuffled", "empty_seq"),
    ("f16", HEADS[0], 16, 32, LENS[1], 3, "all", None),
    ("f16", HEADS[2], 32, 16, LENS[3], None, "all", None),
    ("f16", HEADS[3], 16, 16, LENS[2], 5, "shuffled", "shuffled"),
    ("f16", HEADS[4], 64, 32, LENS[3], 2, "all", None),
    ("f16", HEADS[2], 16, 16, LENS[1], 1, "drop_group", "sorted"),
    ("f16", HEADS[1], 40, 16, LENS[0], 4, "shuffled", "empty_seq"),
    ("f16", (32, 8), 128, 16, LENS[1], None, "all", None),
    ("f16", (16, 2), 64, 32, [1000, 3], None, "shuffled", "sorted"),
    ("f32", (4, 2), 256, 16, LENS[2], 3, "all", None),
]):
    CASES.append(dict(id=f"{i:02d}-{dtype}-h{heads[0]}x{heads[1]}-d{head_dim}-bs{block_size}-s{splits}-{kept}-{prune}",
                      dtype=dtype, heads=heads, head_dim=head_dim, block_size=block_size, seq_lens=lens,
                      splits=splits, kept=kept, prune=prune, q_view=i % 2 == 1, seed=100 + i))


def run_case(case: dict) -> list[str]:
    import torch

    from attention_data import DTYPES, dense_attention, kept_head_list, make_batch, prune_keys
    from kernel_harness import compare, tolerance
    from trident.kernels.attention import paged_attention, paged_attention_ref
    from trident.kernels.decode_attention import decode_attention

    dtype = DTYPES[case["dtype"]]
    num_q_heads, num_kv_heads = case["heads"]
    lens = case["seq_lens"]
    batch = make_batch(lens, [1] * len(lens), num_q_heads, num_kv_heads, case["head_dim"],
                       case["block_size"], dtype, case["seed"], case["q_view"])
    meta = batch.meta
    if case["prune"] is not None:
        empty_seq = 0 if case["prune"] == "empty_seq" else None
        meta = prune_keys(meta, 0.6, case["prune"] == "shuffled", empty_seq, case["seed"])
    kept = kept_head_list(case["kept"], num_q_heads, num_kv_heads, case["seed"])
    scale = case["head_dim"] ** -0.5
    tol = tolerance(dtype)
    initial = torch.rand(meta.key_slots.shape)               # heavy-hitter mass accumulates on this
    mass, mass_ref = initial.clone(), initial.clone()
    args = (batch.q, batch.k_cache, batch.v_cache, meta, scale, kept)
    out = decode_attention(*args, key_mass=mass, num_splits=case["splits"])
    ref = paged_attention_ref(*args, key_mass=mass_ref)
    failures = compare("out vs twin", out, ref, **tol)
    failures += compare("key_mass vs twin", mass, mass_ref, atol=1e-5, rtol=1e-4)
    failures += compare("out without key_mass", decode_attention(*args, num_splits=case["splits"]), out, atol=0, rtol=0)
    if case["kept"] == "all" and case["prune"] is None:
        failures += compare("out vs dense SDPA", out, dense_attention(batch, scale), **tol)
        failures += compare("key mass per sequence", (mass - initial).sum(1),
                            torch.full((len(lens),), float(num_q_heads)), atol=1e-4, rtol=1e-5)
    routed = paged_attention(*args[:5], kept_q_heads=kept)
    failures += compare("paged_attention dispatch", routed, decode_attention(*args), atol=0, rtol=0)
    return failures


@pytest.fixture(scope="module")
def verdicts():
    return run_worker(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_decode_attention(case, verdicts):
    check_verdict(verdicts, case["id"])


if __name__ == "__main__":
    worker_main(CASES, run_case)
