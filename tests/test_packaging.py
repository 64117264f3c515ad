"""Packaging: one `trident` namespace that shadows nobody, shipped data, and a CPU install without triton."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR, ROOT


def test_the_wheel_holds_only_the_trident_namespace_and_its_data(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("trident_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"trident", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top_level
    for module in ("engine/llm.py", "kernels/attention.py", "server/cli.py", "bench/offline.py",
                   "bench/data/wikitext2-valid.txt", "bench/data/alpaca-seed-tasks.jsonl", "bench/data/README.md"):
        assert f"trident/{module}" in names, module
    assert not [n for n in names if n.startswith("trident/bench/results/")]     # experiment records stay in the repo


def test_data_ships_inside_the_repository():
    assert DATA_DIR == ROOT / "bench" / "data"
    assert (DATA_DIR / "wikitext2-valid.txt").stat().st_size > 1_000_000
    assert len((DATA_DIR / "alpaca-seed-tasks.jsonl").read_text().splitlines()) == 175


def test_the_calibration_default_is_the_shipped_wikitext():
    from trident.server import cli

    assert cli.DEFAULT_CALIBRATION_DATA == DATA_DIR / "wikitext2-valid.txt"
    assert cli.build_parser().parse_args(["calibrate"]).data == str(cli.DEFAULT_CALIBRATION_DATA)


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"]).resolve()


@pytest.mark.parametrize("where", ["pytest", "repository root"])
def test_huggingface_kernels_is_not_shadowed(where):
    """The repository's `kernels/` folder is on sys.path under pytest and for `python -m` from the
    root; it must not hide Hugging Face's `kernels` distribution, which transformers imports."""
    code = ("import kernels, transformers; from transformers import LlamaForCausalLM; "
            "print(kernels.__file__); import trident.kernels.attention as a; print(a.__file__)")
    if where == "pytest":
        import kernels
        from transformers import LlamaForCausalLM  # noqa: F401

        import trident.kernels.attention as ours
        found = [kernels.__file__, ours.__file__]
    else:
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        found = run.stdout.split()
    assert Path(found[0]).resolve().is_relative_to(_site_packages()), found[0]
    assert Path(found[1]).resolve() == ROOT / "kernels" / "attention.py"


BLOCK_TRITON = textwrap.dedent("""
    import importlib.abc, sys

    class RefuseTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"{name} is blocked: this is an install without the triton extra")
            return None

    sys.meta_path.insert(0, RefuseTriton())
""")

WITHOUT_TRITON = BLOCK_TRITON + textwrap.dedent("""
    import torch
    from trident.engine.config import EngineConfig
    from trident.engine.llm import LLM
    from trident.engine.sampling_params import SamplingParams
    from trident.kernels.attention import paged_attention, paged_attention_ref
    from trident.kernels.metadata import AttentionMetadata
    from trident.kernels.backend import triton_available

    assert not triton_available() and "triton" not in sys.modules

    out = LLM(EngineConfig(model=sys.argv[1], device="cpu", dtype="float32")).generate(
        ["hello world"], SamplingParams(max_tokens=5, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 5, out[0]

    # The heavy-hitter path (key_mass) runs the plain-torch twins, prefill and decode.
    torch.manual_seed(0)
    num_slots, kv_heads, q_heads, head_dim = 32, 2, 4, 8
    k_cache, v_cache = torch.randn(num_slots, kv_heads, head_dim), torch.randn(num_slots, kv_heads, head_dim)
    for seq_lens, new_counts in (([5, 9], [5, 3]), ([6, 10], [1, 1])):
        meta = AttentionMetadata.build([[0, 1], [2, 3]], seq_lens, new_counts, block_size=8)
        q = torch.randn(sum(new_counts), q_heads, head_dim)
        key_mass = torch.zeros(meta.key_slots.shape)
        out = paged_attention(q, k_cache, v_cache, meta, 0.35, key_mass=key_mass)
        torch.testing.assert_close(out, paged_attention_ref(q, k_cache, v_cache, meta, 0.35))
        # each query spreads a mass of 1 per head over its keys: the last query's row sums to q_heads
        torch.testing.assert_close(key_mass.sum(dim=1), torch.full((2,), float(q_heads)))
    assert "triton" not in sys.modules
    print("ok without triton")
""")


def test_engine_and_cpu_twins_run_without_triton(tiny_model_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", WITHOUT_TRITON, str(tiny_model_dir)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "ok without triton" in run.stdout, run.stderr[-4000:]


def test_trident_serve_answers_without_triton(tiny_model_dir, tmp_path):
    import httpx

    from tests.test_server import free_port

    port = free_port()
    code = BLOCK_TRITON + textwrap.dedent(f"""
        import runpy
        sys.argv = ["trident", "serve", "--model", {str(tiny_model_dir)!r}, "--port", "{port}",
                    "--kv-cache-memory", "16MiB", "--log-level", "warning"]
        runpy.run_module("trident.server", run_name="__main__")
    """)
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 3, "temperature": 0},
                           timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3, reply.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
