"""The Triton NF4 kernels on int4 (compressed-tensors W4A16) weights repacked by formats.int4_as_nf4, against the
torch reference and a float64 matmul over compressed-tensors' own decompression, on fresh random data.

Without CUDA they run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1); small shapes.
Tolerances as tests/test_kernels.py: fp32 1e-3 relative to the largest output, bf16 1e-2.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # already set by conftest.py; kept for running this file alone
os.environ.setdefault("MIXQ_TUNE", "0")

from mixtral_quant.formats import NF4Weight, int4_as_nf4, quantize_int4  # noqa: E402
from mixtral_quant.kernels import fused_moe, nf4_matmul, stack_experts  # noqa: E402
from mixtral_quant.kernels import reference as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2}


def _gen():
    seed = int(torch.randint(0, 2**31, ()))
    print("seed", seed)  # fresh data, reproducible from the log
    return torch.Generator().manual_seed(seed)


def _int4(n: int, k: int, group: int, g, dtype=torch.bfloat16) -> tuple[NF4Weight, torch.Tensor]:
    """(the kernels' view of a repacked int4 weight, compressed-tensors' decompression of the same bytes in fp64)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    d = quantize_int4((torch.randn(n, k, generator=g) * k**-0.5).to(dtype), group)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                                                             strategy="group", group_size=group))
    theirs = PackedQuantizationCompressor.decompress(dict(d), scheme)["weight"]
    return NF4Weight.from_dict({key: t.to(DEVICE) for key, t in int4_as_nf4(d).items()}), theirs.double()


def _check(y: torch.Tensor, expect: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == expect.shape
    assert torch.isfinite(y).all() and expect.abs().max() > 0
    err = ((y.double().cpu() - expect.double().cpu()).abs().max() / expect.double().abs().max()).item()
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("n,k,group", [(40, 128, 128), (72, 256, 128), (45, 64, 32)])
def test_int4_matmul_matches_reference_and_library(m, n, k, group):
    g = _gen()
    w, w_lib = _int4(n, k, group, g, torch.float32)  # fp32 scales: the library's decode is exact, like ours
    x = torch.randn(m, k, generator=g).to(DEVICE)
    y = nf4_matmul(x, w)
    _check(y, ref.nf4_matmul_ref(x, w, torch.float64).double(), torch.float32)
    _check(y, x.double().cpu() @ w_lib.T, torch.float32)


@pytest.mark.parametrize("m", [1, 16])
def test_int4_matmul_bf16(m):
    g = _gen()
    w, _ = _int4(72, 128, 128, g)
    x = torch.randn(m, 128, generator=g).to(DEVICE, torch.bfloat16)
    _check(nf4_matmul(x, w), ref.nf4_matmul_ref(x, w, torch.float64).double(), torch.bfloat16)


@pytest.mark.parametrize("t", [1, 9])
def test_fused_moe_on_int4_experts(t):
    g = _gen()
    n_exp, d, f, a = 4, 64, 96, 2
    w1s, w2s, w3s = ([_int4(rows, cols, 32, g)[0] for _ in range(n_exp)] for rows, cols in ((f, d), (d, f), (f, d)))
    x = torch.randn(t, d, generator=g).to(DEVICE)
    ids = torch.stack([torch.randperm(n_exp, generator=g)[:a] for _ in range(t)]).to(DEVICE)
    wts = torch.softmax(torch.randn(t, a, generator=g), -1).to(DEVICE)
    expect = ref.fused_moe_ref(x, ids, wts, w1s, w2s, w3s, torch.float64).double()
    _check(fused_moe(x, ids, wts, stack_experts(w1s, w2s, w3s)), expect, torch.float32)
