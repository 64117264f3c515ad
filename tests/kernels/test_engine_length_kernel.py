"""The engine's own length-axis call shapes through the Triton kernels (interpreter), against the
same engine on the torch twins: prefill dropping and KV budgets pass kept-slot metadata and a key
mass buffer to prefill_attention and decode_attention, and the outputs agree."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from kernel_harness import check_verdict, compare, run_worker, worker_main  # noqa: E402

PROMPT = "Once upon a time there was a dragon who liked to read books in the library. The quick brown fox"
CASES = [
    {"id": "prefill_keep", "pruning": {"prefill_keep": [[1, 0.5]]}},
    {"id": "kv_budget", "pruning": {"kv_budget": 12}},
    {"id": "chunked_both", "pruning": {"kv_budget": 10, "prefill_keep": [[0, 0.6]]}, "max_batched": 16},
]


def generate(model_dir: Path, case: dict, on_kernels: bool):
    from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from trident.engine.llm import LLM
    from trident.engine.pruning.length import RequestPruning
    from trident.engine.sampling_params import SamplingParams

    # use_triton() reads TRITON_INTERPRET per call: "0" routes the same process to the twins.
    os.environ["TRITON_INTERPRET"] = "1" if on_kernels else "0"
    try:
        llm = LLM(EngineConfig(model=str(model_dir), dtype="float32", cache=CacheConfig(num_blocks=64, block_size=4),
                               scheduler=SchedulerConfig(max_model_len=128,
                                                         max_num_batched_tokens=case.get("max_batched", 512))))
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0,
                                pruning=RequestPruning(**case["pruning"]))
        return llm.generate([PROMPT], params)[0]
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


def run_case(case: dict) -> list[str]:
    import torch

    import trident.kernels.decode_attention as decode_module
    import trident.kernels.prefill_attention as prefill_module
    from tests.tiny_model import build_tiny_hf_model

    model_dir = build_tiny_hf_model(Path(tempfile.mkdtemp()) / "tiny", seed=1)
    calls = []

    def spy(module, name):
        kernel = getattr(module, name)

        def wrapped(q, k_cache, v_cache, meta, scale, kept_q_heads=None, key_mass=None, *rest):
            calls.append((name, key_mass is not None, meta.key_slots.shape))
            return kernel(q, k_cache, v_cache, meta, scale, kept_q_heads, key_mass, *rest)
        setattr(module, name, wrapped)

    spy(prefill_module, "prefill_attention")
    spy(decode_module, "decode_attention")
    kernels = generate(model_dir, case, on_kernels=True)
    twins = generate(model_dir, case, on_kernels=False)
    failures = []
    if not any(name == "prefill_attention" and mass for name, mass, _ in calls):
        failures.append(f"prefill_attention never got a key-mass buffer: {calls[:4]}")
    if "kv_budget" in case["pruning"] and not any(name == "decode_attention" and mass for name, mass, _ in calls):
        failures.append("decode_attention never got a key-mass buffer")
    got, expected = kernels.outputs[0], twins.outputs[0]
    if got.token_ids != expected.token_ids:
        failures.append(f"tokens on the kernels {got.token_ids} != on the twins {expected.token_ids}")
    else:
        chosen = lambda c: torch.tensor([lp[t] for lp, t in zip(c.logprobs, c.token_ids)])
        failures += compare("chosen logprobs", chosen(got), chosen(expected), atol=1e-4, rtol=1e-4)
    if kernels.pruning["length"] != twins.pruning["length"]:
        failures.append(f"length decisions differ: {kernels.pruning['length']} vs {twins.pruning['length']}")
    return failures


@pytest.fixture(scope="module")
def verdicts():
    return run_worker(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_engine_length_path_on_the_kernels(case, verdicts):
    check_verdict(verdicts, case["id"])


if __name__ == "__main__":
    worker_main(CASES, run_case)
