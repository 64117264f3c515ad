"""Prefill / extend attention kernel vs the attention twin (the CPU path) and dense SDPA, in Triton's interpreter."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from kernel_harness import check_verdict, run_worker, worker_main  # noqa: E402

# (Hq, Hkv) covering GQA groups 1, 3, 4, 8 and a single head.
HEADS = [(1, 1), (4, 4), (6, 2), (8, 2), (8, 1)]
# (seq_lens, new_counts): full prefill, chunked prefill onto cached keys, single-token rows.
BATCHES = [([7], [7]), ([1, 7, 129], [1, 7, 129]), ([129, 7, 1], [50, 1, 1]), ([40, 129], [33, 17])]


def _case(i, dtype, heads, head_dim, block_size, batch, kept, prune, window=5, q_view=False, check="twin"):
    return dict(id=f"{i:02d}-{dtype}-h{heads[0]}x{heads[1]}-d{head_dim}-bs{block_size}-{kept}-{prune}"
                   f"-w{window}{'-qview' if q_view else ''}{'' if check == 'twin' else '-' + check}",
                dtype=dtype, heads=heads, head_dim=head_dim, block_size=block_size, seq_lens=batch[0],
                new_counts=batch[1], kept=kept, prune=prune, window=window, q_view=q_view, check=check, seed=i)


CASES = [_case(i, *spec[:7], **spec[7] if len(spec) > 7 else {}) for i, spec in enumerate([
    ("f32", HEADS[0], 16, 16, BATCHES[0], "all", None),
    ("f32", HEADS[1], 32, 32, BATCHES[1], "all", None),
    ("f32", HEADS[2], 16, 16, BATCHES[2], "all", None, dict(window=40)),
    ("f32", HEADS[3], 64, 16, BATCHES[3], "shuffled", None),
    ("f32", HEADS[2], 40, 32, BATCHES[1], "drop_group", "shuffled"),
    ("f32", HEADS[2], 16, 16, BATCHES[2], "shuffled", "sorted", dict(q_view=True)),
    ("f32", HEADS[3], 16, 32, BATCHES[1], "empty", None),
    ("f32", HEADS[1], 16, 16, BATCHES[3], "all", "empty_seq"),
    ("f32", (4, 2), 256, 32, ([129], [129]), "shuffled", None),
    ("f16", HEADS[0], 16, 32, BATCHES[1], "all", None),
    ("f16", HEADS[2], 32, 16, BATCHES[3], "all", None),
    ("f16", HEADS[3], 16, 16, BATCHES[2], "shuffled", "shuffled", dict(window=40)),
    ("f16", HEADS[4], 64, 32, BATCHES[2], "all", None),
    ("f16", HEADS[3], 16, 16, BATCHES[1], "drop_group", "sorted"),
    ("f16", HEADS[1], 40, 16, BATCHES[0], "shuffled", "empty_seq"),
    ("f16", (32, 8), 128, 16, BATCHES[3], "all", None, dict(window=40, q_view=True)),
    ("f16", (16, 2), 64, 32, BATCHES[2], "all", "shuffled"),
    ("f32", HEADS[2], 16, 16, BATCHES[2], "all", None, dict(check="reassign")),
    ("f32", HEADS[3], 16, 16, BATCHES[3], "shuffled", None, dict(check="cpu_dispatch")),
])]


def _vs_twin(case, batch, meta, kept, scale, tol) -> list[str]:
    import torch

    from attention_data import dense_attention
    from kernel_harness import compare
    from trident.kernels.attention import paged_attention, paged_attention_ref
    from trident.kernels.prefill_attention import prefill_attention

    window = case["window"]
    initial = torch.rand(meta.key_slots.shape)               # mass accumulates on top of this
    mass, mass_ref = initial.clone(), initial.clone()
    args = (batch.q, batch.k_cache, batch.v_cache, meta, scale, kept)
    out = prefill_attention(*args, mass, window)
    ref = paged_attention_ref(*args, mass_ref, window)
    failures = compare("out vs twin", out, ref, **tol)
    failures += compare("key_mass vs twin", mass, mass_ref, atol=1e-4, rtol=1e-4)
    failures += compare("out without key_mass", prefill_attention(*args), out, atol=0, rtol=0)
    if case["kept"] == "all" and case["prune"] is None:
        failures += compare("out vs dense SDPA", out, dense_attention(batch, scale), **tol)
        # Every query sees at least its own key, so each adds exactly 1 per head to the total.
        expected_total = sum(min(window, n) for n in case["new_counts"]) * batch.q.shape[1]
        failures += compare("total key mass", (mass - initial).sum(), torch.tensor(float(expected_total)),
                            atol=1e-3, rtol=1e-5)
    if not meta.is_decode:   # the engine entry point routes here under the interpreter
        routed = paged_attention(*args[:5], kept_q_heads=kept)
        failures += compare("paged_attention dispatch", routed, out, atol=0, rtol=0)
    return failures


def _reassign(case, batch, meta, kept, scale, tol) -> list[str]:
    """Per-step tensors cached on the metadata follow a reassigned key list (token pruning)."""
    from attention_data import prune_keys
    from kernel_harness import compare
    from trident.kernels.attention import paged_attention_ref
    from trident.kernels.prefill_attention import prefill_attention

    args = (batch.q, batch.k_cache, batch.v_cache)
    failures = compare("before", prefill_attention(*args, meta, scale, kept),
                       paged_attention_ref(*args, meta, scale, kept), **tol)
    pruned = prune_keys(meta, 0.5, True, None, case["seed"])
    meta.key_slots, meta.key_positions = pruned.key_slots, pruned.key_positions
    return failures + compare("after reassigning key lists", prefill_attention(*args, meta, scale, kept),
                              paged_attention_ref(*args, meta, scale, kept), **tol)


def _cpu_dispatch(case, batch, meta, kept, scale, tol) -> list[str]:
    """Without the interpreter flag, paged_attention runs the twin, whose kept-heads and key-mass
    paths agree with plain attention over every head."""
    import os

    import torch

    from attention_data import make_batch
    from kernel_harness import compare
    from trident.kernels.attention import paged_attention, paged_attention_ref

    decode = make_batch([7, 129], [1, 1], *batch.q.shape[1:2], batch.k_cache.shape[1], batch.q.shape[2],
                        16, batch.q.dtype, case["seed"])
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        args = (batch.q, batch.k_cache, batch.v_cache, meta, scale)
        everything = paged_attention(*args)
        failures = compare("plain", everything, paged_attention_ref(*args), atol=0, rtol=0)
        # Kept heads in prefill: SDPA over the kept heads only, each reading its own KV head,
        # which agrees with every head then a selection (within tolerance: other SDPA kernels).
        failures += compare("kept heads vs all heads", paged_attention(*args, kept_q_heads=kept),
                            everything[:, kept], **tol)
        d_args = (decode.q, decode.k_cache, decode.v_cache, decode.meta, scale)
        mass = torch.zeros(decode.meta.key_slots.shape)
        with_mass = paged_attention(*d_args, key_mass=mass)
        failures += compare("decode with key_mass vs without", with_mass, paged_attention(*d_args),
                            atol=0, rtol=0)
        # The mass, from the probabilities written out: per sequence, softmax over its keys, summed over heads.
        group = decode.q.shape[1] // decode.k_cache.shape[1]
        expected = torch.zeros_like(mass)
        for s, n in enumerate(decode.seq_lens):
            keys = decode.k_cache[decode.meta.key_slots[s, :n]].float().repeat_interleave(group, 1)  # [n, Hq, D]
            scores = scale * torch.einsum("hd,nhd->hn", decode.q[s].float(), keys)
            expected[s, :n] = scores.softmax(-1).sum(0)
        return failures + compare("decode key_mass", mass, expected, atol=1e-5, rtol=1e-5)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


def run_case(case: dict) -> list[str]:
    from attention_data import DTYPES, kept_head_list, make_batch, prune_keys
    from kernel_harness import tolerance

    dtype = DTYPES[case["dtype"]]
    num_q_heads, num_kv_heads = case["heads"]
    batch = make_batch(case["seq_lens"], case["new_counts"], num_q_heads, num_kv_heads,
                       case["head_dim"], case["block_size"], dtype, case["seed"], case["q_view"])
    meta = batch.meta
    if case["prune"] is not None:
        empty_seq = 0 if case["prune"] == "empty_seq" else None
        meta = prune_keys(meta, 0.6, case["prune"] == "shuffled", empty_seq, case["seed"])
    kept = kept_head_list(case["kept"], num_q_heads, num_kv_heads, case["seed"])
    check = {"twin": _vs_twin, "reassign": _reassign, "cpu_dispatch": _cpu_dispatch}[case["check"]]
    return check(case, batch, meta, kept, case["head_dim"] ** -0.5, tolerance(dtype))


@pytest.fixture(scope="module")
def verdicts():
    return run_worker(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_prefill_attention(case, verdicts):
    check_verdict(verdicts, case["id"])


if __name__ == "__main__":
    worker_main(CASES, run_case)
