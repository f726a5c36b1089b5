"""vLLM's prepacked CPU GEMM for the mask path (vllm_integration.cpu_gemm).

PackedLinear must compute x @ W^T (+ b) like torch does: exactly up to float32
summation order in float32, and in bfloat16 within the error torch's own
bfloat16 linear makes against float32 math (both accumulate in float32 and
round the output once)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flexdraft_vllm.vllm_integration import cpu_gemm

pytestmark = pytest.mark.skipif(not cpu_gemm.available(torch.device("cpu"), torch.float32),
                                reason="this vLLM build has no oneDNN CPU GEMM")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 8, 37])
def test_packed_linear_equals_torch(dtype, bias, rows):
    torch.manual_seed(rows)
    lin = nn.Linear(576, 192, bias=bias).to(dtype)
    packed = cpu_gemm.PackedLinear(lin.weight, lin.bias)
    x = torch.randn(rows, 3, 576).to(dtype)[:, 1]  # a strided (non-contiguous) view, as slots of a block are
    assert rows == 1 or not x.is_contiguous()
    got = packed(x)
    exact = nn.functional.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    theirs = (lin(x).double() - exact).abs().max().item()
    err = (got.double() - exact).abs().max().item()
    assert got.dtype == dtype and got.shape == (rows, 192)
    bound = 1e-4 if dtype == torch.float32 else 2 * theirs + 1e-3
    assert err <= bound, (err, theirs)


def test_packed_linear_keeps_leading_dims():
    w = torch.randn(40, 16)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(cpu_gemm.PackedLinear(w)(x), x @ w.t(), atol=1e-5, rtol=1e-5)


def test_pack_linears_replaces_every_linear_in_place():
    m = nn.Sequential(nn.Linear(8, 16), nn.Sequential(nn.Linear(16, 4, bias=False), nn.LayerNorm(4)))
    x = torch.randn(3, 8)
    want = m(x)
    assert cpu_gemm.pack_linears(m) == 2
    assert isinstance(m[0], cpu_gemm.PackedLinear) and isinstance(m[1][0], cpu_gemm.PackedLinear)
    assert isinstance(m[1][1], nn.LayerNorm)
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    assert set(m.state_dict()) == {"0.weight", "0.bias", "1.0.weight", "1.1.weight", "1.1.bias"}


def test_available_only_for_cpu_float32_and_bfloat16():
    assert cpu_gemm.available(torch.device("cpu"), torch.bfloat16)
    assert not cpu_gemm.available(torch.device("cpu"), torch.float16)
    assert not cpu_gemm.available(torch.device("cuda"), torch.float32)
