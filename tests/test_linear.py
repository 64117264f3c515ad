"""kernels.linear and kernels.cpu_gemm: every GEMM provider equals F.linear; the dispatch measures,
chooses per shape class and row bucket, caches its choices and sizes OpenBLAS's threads to torch's."""
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from trident.kernels import cpu_gemm
from trident.kernels.cpu_gemm import MAX_ROWS, PROVIDERS, GemmDispatch, Measurement
from trident.kernels.linear import Linear


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("rows", [1, 7, MAX_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_every_provider_equals_f_linear(provider, rows, bias):
    torch.manual_seed(rows)
    weight, b = torch.randn(24, 40), (torch.randn(24) if bias else None)
    x = torch.randn(rows, 50)[:, 3:43]          # strided rows, as a slice of a wider tensor
    out = PROVIDERS[provider](x, weight, b)
    assert out.shape == (rows, 24) and out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_linear_goes_through_the_pinned_provider(dispatch, provider, monkeypatch):
    calls = []
    real = PROVIDERS[provider]
    monkeypatch.setitem(PROVIDERS, provider, lambda *a: calls.append(1) or real(*a))
    dispatch.pin(provider)
    layer = Linear(16, 8)
    with torch.no_grad():
        layer(torch.randn(3, 16))
        layer(torch.randn(MAX_ROWS + 1, 16))   # prefill-sized: F.linear
    assert calls == [1]


def test_gradients_and_other_inputs_take_f_linear(dispatch):
    dispatch.pin("openblas")                    # numpy would not record a gradient
    torch.manual_seed(0)
    layer = Linear(40, 24)
    x = torch.randn(5, 40, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    F.linear(ref_x, layer.weight, layer.bias).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    w = torch.zeros(4, 16)
    assert cpu_gemm.applies(torch.zeros(8, 16), w)
    assert not cpu_gemm.applies(torch.zeros(MAX_ROWS + 1, 16), w)            # prefill-sized
    assert not cpu_gemm.applies(torch.zeros(8, 16, dtype=torch.bfloat16), w)
    assert not cpu_gemm.applies(torch.zeros(2, 8, 16), w)                  # not a [rows, in] batch
    with torch.autocast("cpu", dtype=torch.bfloat16):                      # GEMMs would run in bf16
        assert not cpu_gemm.applies(torch.zeros(8, 16), w)
    bf16 = Linear(16, 4).to(torch.bfloat16)
    x = torch.randn(3, 2, 16, dtype=torch.bfloat16)
    assert torch.equal(bf16(x), F.linear(x, bf16.weight, bf16.bias))


def test_choices_apply_per_row_bucket(dispatch):
    dispatch.pinned = None
    dispatch.choices = {1: Measurement("openblas", {"openblas": 2.0}), 8: Measurement("torch-wm", {"torch-wm": 2.0})}
    assert dispatch.provider_for(torch.zeros(1, 40)) is PROVIDERS["openblas"]
    assert dispatch.provider_for(torch.zeros(5, 40)) is PROVIDERS["torch-wm"]      # bucket 8
    assert dispatch.provider_for(torch.zeros(3, 40)) is PROVIDERS[cpu_gemm.DEFAULT_PROVIDER]   # unmeasured
    assert [cpu_gemm.row_bucket(r) for r in (1, 2, 3, 5, 9, 64)] == [1, 2, 4, 8, 16, 64]


def test_measure_times_model_passes_chooses_the_fastest_and_caches(dispatch, tmp_path, monkeypatch, caplog):
    weights = [torch.rand(24, 40), torch.rand(40, 24), torch.rand(23, 40)]      # a ragged shape among them
    cache = tmp_path / "gemm.json"
    with caplog.at_level(logging.INFO, logger="trident.gemm"):
        dispatch.measure(weights, max_rows=3, cache_file=cache)
    assert dispatch.pinned is None and set(dispatch.choices) == {1, 2, 4}
    for m in dispatch.choices.values():          # the winner is the fastest measured, every rate positive
        assert m.gb_s[m.provider] == max(m.gb_s.values()) and min(m.gb_s.values()) > 0
    assert set(dispatch.choices[1].gb_s) == set(PROVIDERS) and "torch-wm-pad" not in dispatch.choices[2].gb_s
    assert "measured 3 row counts" in caplog.text and "GB/s" in caplog.text
    assert len(json.loads(cache.read_text())["choices"]) == 3

    # A later start reads the cache and times nothing.
    monkeypatch.setattr(cpu_gemm, "time_providers", lambda *a: pytest.fail("measured again"))
    again = GemmDispatch()
    again.measure(weights, max_rows=3, cache_file=cache)
    assert again.choices == dispatch.choices
    # An unreadable cache is measured again (and rewritten), with a warning.
    cache.write_text("{not json")
    monkeypatch.setattr(cpu_gemm, "time_providers", lambda *a: Measurement("torch", {"torch": 1.0}))
    with caplog.at_level(logging.WARNING, logger="trident.gemm"):
        GemmDispatch().measure(weights, max_rows=1, cache_file=cache)
    assert "unreadable cache" in caplog.text and json.loads(cache.read_text())["choices"][0]["provider"] == "torch"


def test_cache_key_follows_the_model_shapes():
    assert cpu_gemm.cache_key([(24, 40)]) == cpu_gemm.cache_key([(24, 40)]) != cpu_gemm.cache_key([(23, 40)])


def test_engine_measures_at_start_and_a_flag_pins(dispatch, tiny_model_dir, tmp_path, monkeypatch):
    from trident.engine.config import EngineConfig, SchedulerConfig
    from trident.engine.llm import LLM
    from trident.engine.sampling_params import SamplingParams
    from threadpoolctl import threadpool_info

    monkeypatch.setenv("TRIDENT_CACHE_DIR", str(tmp_path))
    llm = LLM(EngineConfig(model=str(tiny_model_dir), dtype="float32", cpu_gemm="auto",
                           scheduler=SchedulerConfig(max_num_seqs=4)))
    assert dispatch.pinned is None and set(dispatch.choices) == {1, 2, 4}
    blas = [p for p in threadpool_info() if p["user_api"] == "blas"]        # no second pool on the cores
    assert blas and all(p["num_threads"] == 1 for p in blas)
    assert len(list((tmp_path / "cpu-gemm").glob("*.json"))) == 1
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    measured = [o.outputs[0].token_ids for o in llm.generate(["hello world", "1 2 3"], params)]
    LLM(EngineConfig(model=str(tiny_model_dir), dtype="float32", cpu_gemm="torch"))
    assert dispatch.pinned == "torch"
    pinned = [o.outputs[0].token_ids for o in llm.generate(["hello world", "1 2 3"], params)]
    assert measured == pinned                    # rounding differs at most in the last bits
    with pytest.raises(ValueError, match="cpu_gemm must be one of"):
        EngineConfig(model="x", cpu_gemm="mkl")
