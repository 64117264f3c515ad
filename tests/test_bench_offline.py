"""bench/offline.py end to end on the tiny model: Trident's figures, the weights-only ceiling, GB/s
against memory copy and the GEMM choices; llama.cpp's column where llama_cpp is installed."""
import importlib.util
import json

import pytest

from trident.bench import offline


def test_offline_reports_rates_bandwidth_and_the_gemm_dispatch(tiny_model_dir, tmp_path):
    out = tmp_path / "offline.json"
    # Enough tokens that decoding outlasts the noise of a 1-token run on a busy machine.
    report = offline.main(["--model", str(tiny_model_dir), "--skip-hf", "--decode-tokens", "48", "--batch", "2",
                           "--batch-tokens", "48", "--prefill-len", "64", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    trident = report["results"]["trident"]
    assert trident["decode_b1_tok_s"] > 0 and trident["decode_batch_tok_s"] > 0 and trident["prefill_tok_s"] > 0
    assert trident["weight_read_vs_copy"] == pytest.approx(trident["weight_read_gb_s_b1"] / report["copy_bandwidth_gb_s"])
    assert report["ceiling_decode_b1_tok_s"] > 0 and report["cpu_gemm"] == {"pinned": "torch-wm-pad"}   # conftest
    with pytest.raises(SystemExit, match="timing noise"):
        offline.decode_seconds(0.1, 0.2)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (the optional `llamacpp` extra builds it)")
def test_llama_cpp_runs_the_same_weights_at_the_same_precision(tiny_gguf, tmp_path, monkeypatch):
    from gguf import GGUFReader

    monkeypatch.setenv("TRIDENT_CACHE_DIR", str(tmp_path))
    runner = offline.LlamaCppRunner(tiny_gguf, "float32")
    converted = tmp_path / "llama-cpp" / f"{tiny_gguf.stem}-F32.gguf"
    types = {t.tensor_type.name for t in GGUFReader(converted).tensors if len(t.shape) == 2}
    assert runner.name == "llama.cpp F32" and types == {"F32"}
    runner.generate([[1, 2, 3]], 3)
