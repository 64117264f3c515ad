"""kernels.linear: the weight-major form for decode-sized float32 batches equals F.linear."""
import pytest
import torch
import torch.nn.functional as F

from trident.kernels.linear import SMALL_BATCH_ROWS, Linear, uses_weight_major


@pytest.mark.parametrize("rows", [1, 7, SMALL_BATCH_ROWS, SMALL_BATCH_ROWS + 1, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear_in_value_shape_layout_and_gradient(rows, bias):
    torch.manual_seed(rows)
    layer = Linear(40, 24, bias=bias)
    wide = torch.randn(rows, 50)
    x = wide[:, 3:43].requires_grad_()          # strided rows, as a slice of a wider tensor
    out = layer(x)
    ref_x = x.detach().clone().requires_grad_()
    ref = F.linear(ref_x, layer.weight, layer.bias)
    assert out.shape == (rows, 24) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(rows, 24)
    out.backward(grad)
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    ref.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, [p.grad for p in layer.parameters()]):     # weight, and bias if any
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_small_float32_cpu_batches_take_the_weight_major_form():
    assert uses_weight_major(torch.zeros(8, 16))
    assert uses_weight_major(torch.zeros(SMALL_BATCH_ROWS, 16))
    assert not uses_weight_major(torch.zeros(SMALL_BATCH_ROWS + 1, 16))   # prefill-sized
    assert not uses_weight_major(torch.zeros(8, 16, dtype=torch.bfloat16))
    assert not uses_weight_major(torch.zeros(2, 8, 16))                   # not a [rows, in] batch
    with torch.autocast("cpu", dtype=torch.bfloat16):                     # GEMMs would run in bf16
        assert not uses_weight_major(torch.zeros(8, 16))
    layer = Linear(16, 4).to(torch.bfloat16)
    x = torch.randn(3, 2, 16, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("bias", [False, True])
def test_one_row_padded_to_two_equals_the_unpadded_product(bias):
    from trident.kernels.linear import weight_major_linear

    torch.manual_seed(0)
    weight, b = torch.randn(24, 40), (torch.randn(24) if bias else None)
    x = torch.randn(3, 40)[1:2]                  # one row, a view into a larger tensor
    padded, unpadded = weight_major_linear(x, weight, b), weight_major_linear(x, weight, b, pad_one_row=False)
    assert padded.shape == unpadded.shape == (1, 24) and padded.is_contiguous()
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
