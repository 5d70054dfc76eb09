"""The Triton kernels against their torch references (float64) on fresh random data, and the wrappers' errors.

Without CUDA they run under Triton's interpreter: conftest.py sets TRITON_INTERPRET=1 before anything can
import the kernels (triton.jit reads it when a kernel is decorated). With CUDA the same tests run on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # already set by conftest.py; kept for running this file alone
os.environ.setdefault("MIXQ_TUNE", "0")  # on a GPU: first config, no timing; every config is checked below

from mixtral_quant.formats import NF4Weight, quantize_tensor  # noqa: E402
from mixtral_quant.kernels import fused_moe, int8_matmul, moe_align, nf4_matmul, stack_experts  # noqa: E402
from mixtral_quant.kernels import reference as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MS = [1, 3, 16, 33, 130]
# relative error (max |y - ref| / max |ref|) allowed per activation dtype: fp32 is the 1e-3; bf16/fp16
# round the dequantized weight and the output to 8/11 mantissa bits (2^-9 / 2^-12 each) before and after the dot
TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))  # fresh data, reproducible from the log


def _nf4(n, k, blocksize=64, double_quant=True, g=None) -> NF4Weight:
    w = torch.randn(n, k, generator=g) * k**-0.5
    d = quantize_tensor(w, "nf4", blocksize=blocksize, double_quant=double_quant)
    return NF4Weight.from_dict({key: t.to(DEVICE) for key, t in d.items()})


def _int8(n, k, g=None) -> tuple[torch.Tensor, torch.Tensor]:
    d = quantize_tensor(torch.randn(n, k, generator=g) * k**-0.5, "int8")
    return d["weight"].to(DEVICE), d["SCB"].to(DEVICE)


def _check(y: torch.Tensor, expect: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == expect.shape
    assert torch.isfinite(y).all(), "NaN/inf in the kernel output"
    assert torch.isfinite(expect).all() and expect.abs().max() > 0
    err = ((y.double() - expect.double()).abs().max() / expect.double().abs().max()).item()
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (64, False), (128, True)])
def test_nf4_matmul_matches_reference(m, blocksize, double_quant):
    g = _gen()
    n, k = 100, 128  # N not a multiple of any BLOCK_N
    w = _nf4(n, k, blocksize, double_quant, g)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    _check(nf4_matmul(x, w), ref.nf4_matmul_ref(x, w, torch.float64).double(), torch.float32)


@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("k,blocksize", [(96, 64), (64, 32), (256, 256)])
def test_nf4_matmul_other_layouts(m, k, blocksize):
    # K=96, blocksize 64: quant blocks straddle rows; K=64, blocksize 32: the smallest tiles
    g = _gen()
    w = _nf4(45, k, blocksize, True, g)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    _check(nf4_matmul(x, w), ref.nf4_matmul_ref(x, w, torch.float64).double(), torch.float32)


@pytest.mark.parametrize("m", [1, 16, 130])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nf4_matmul_half_precision(m, dtype):
    g = _gen()
    w = _nf4(72, 128, 64, True, g)
    x = torch.randn(m, 128, generator=g).to(DEVICE, dtype)
    _check(nf4_matmul(x, w), ref.nf4_matmul_ref(x, w, torch.float64).double(), dtype)


def test_nf4_matmul_keeps_leading_dims_and_matches_bitsandbytes():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    g = _gen()
    wf = torch.randn(40, 64, generator=g) * 0.125
    packed, state = bnbF.quantize_4bit(wf, blocksize=64, quant_type="nf4", compress_statistics=True)
    d = {"weight": packed, **{"weight." + key: v for key, v in state.as_dict(packed=True).items()}}
    w = NF4Weight.from_dict({key: t.to(DEVICE) for key, t in d.items()})
    x = torch.randn(2, 3, 64, generator=g)
    expect = x.double() @ bnbF.dequantize_4bit(packed, state).double().T  # bitsandbytes' own decoding
    _check(nf4_matmul(x.to(DEVICE), w).cpu(), expect, torch.float32)


@pytest.mark.parametrize("m", MS)
def test_int8_matmul_matches_reference(m):
    g = _gen()
    weight, scb = _int8(100, 128, g)
    x = torch.randn(m, 128, generator=g).to(DEVICE)
    _check(int8_matmul(x, weight, scb), ref.int8_matmul_ref(x, weight, scb, torch.float64).double(), torch.float32)


@pytest.mark.parametrize("m", [1, 16, 130])
def test_int8_matmul_bf16(m):
    g = _gen()
    weight, scb = _int8(72, 96, g)
    x = torch.randn(2, m, 96, generator=g).to(DEVICE, torch.bfloat16)
    _check(int8_matmul(x, weight, scb), ref.int8_matmul_ref(x, weight, scb, torch.float64).double(), torch.bfloat16)


def _experts(fmt, n_exp, d, f, double_quant=True, g=None):
    make = (lambda n, k: _nf4(n, k, 64, double_quant, g)) if fmt == "nf4" else (lambda n, k: _int8(n, k, g))
    return [make(f, d) for _ in range(n_exp)], [make(d, f) for _ in range(n_exp)], [make(f, d) for _ in range(n_exp)]


@pytest.mark.parametrize("t", [1, 5, 33])
@pytest.mark.parametrize("fmt,double_quant", [("nf4", True), ("nf4", False), ("int8", False)])
def test_fused_moe_matches_reference(t, fmt, double_quant):
    g = _gen()
    n_exp, d, f, a = 8, 64, 96, 2
    w1s, w2s, w3s = _experts(fmt, n_exp, d, f, double_quant, g)
    experts = stack_experts(w1s, w2s, w3s)
    x = torch.randn(t, d, generator=g).to(DEVICE)
    # only experts 0..4 are routed to: 5, 6, 7 get zero tokens
    ids = torch.stack([torch.randperm(5, generator=g)[:a] for _ in range(t)]).to(DEVICE)
    wts = torch.softmax(torch.randn(t, a, generator=g), -1).to(DEVICE)
    expect = ref.fused_moe_ref(x, ids, wts, w1s, w2s, w3s, torch.float64).double()
    _check(fused_moe(x, ids, wts, experts), expect, torch.float32)


def test_fused_moe_bf16_one_expert_takes_all():
    g = _gen()
    n_exp, d, f = 4, 64, 64
    w1s, w2s, w3s = _experts("nf4", n_exp, d, f, True, g)
    x = torch.randn(20, d, generator=g).to(DEVICE, torch.bfloat16)
    ids = torch.tensor([[2, 0]] * 19 + [[1, 2]]).to(DEVICE)  # expert 2 gets all 20 tokens (two blocks), 3 none
    wts = torch.rand(20, 2, generator=g).to(DEVICE, torch.bfloat16)
    expect = ref.fused_moe_ref(x, ids, wts, w1s, w2s, w3s, torch.float64).double()
    _check(fused_moe(x, ids, wts, stack_experts(w1s, w2s, w3s)), expect, torch.bfloat16)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_every_launch_config(fmt):
    """The GPU's config sets (decode GEMV, split-K, prefill tiles), each launched directly, not just the one picked."""
    from mixtral_quant.kernels import _common, int8 as k8, nf4 as k4

    g = _gen()
    n, k = 72, 256
    w = _nf4(n, k, 128, True, g) if fmt == "nf4" else _int8(n, k, g)
    max_bk = _common.largest_block_k(k, 128 if fmt == "nf4" else None)
    sets = {1: _common.gemv_configs(), 16: _common.decode_configs(), 33: _common.prefill_configs()}
    for m, configs in sets.items():
        x = torch.randn(m, k, generator=g).to(DEVICE)
        expect = (ref.nf4_matmul_ref(x, w, torch.float64) if fmt == "nf4" else ref.int8_matmul_ref(x, *w, torch.float64))
        for cfg in _common.clamp_block_k(configs, max_bk):
            out = torch.empty(m, n, device=DEVICE)
            if fmt == "nf4":
                k4._launch(x, w, out, cfg, max_bk)
            else:
                k8._launch(x, *w, out, cfg, max_bk)
            _check(out, expect.double(), torch.float32)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_every_moe_config(fmt, monkeypatch):
    from mixtral_quant.kernels import _common, moe

    g = _gen()
    n_exp, d, f, a, t = 4, 64, 128, 2, 6
    w1s, w2s, w3s = _experts(fmt, n_exp, d, f, True, g)
    experts = stack_experts(w1s, w2s, w3s)
    x = torch.randn(t, d, generator=g).to(DEVICE)
    ids = torch.stack([torch.randperm(n_exp, generator=g)[:a] for _ in range(t)]).to(DEVICE)
    wts = torch.rand(t, a, generator=g).to(DEVICE)
    expect = ref.fused_moe_ref(x, ids, wts, w1s, w2s, w3s, torch.float64).double()
    monkeypatch.setattr(moe, "interpreting", lambda: False)  # the GPU's config sets, whatever runs them
    for block_m in (16, 64):
        c13s, c2s = moe.w13_configs(block_m), moe.w2_configs(block_m)
        for i in range(max(len(c13s), len(c2s))):
            run = moe.MoeLaunch(x, ids, wts, experts, block_m)
            run.w13(c13s[i % len(c13s)])
            y = _common.sum_rows(run.w2(c2s[min(i, len(c2s) - 1)]), torch.empty_like(x))
            _check(y, expect, torch.float32)


def test_moe_align_sorts_and_pads():
    g = _gen()
    n_exp, block_m, t, a = 6, 4, 9, 2
    ids = torch.stack([torch.randperm(n_exp, generator=g)[:a] for _ in range(t)])
    ids[ids == 5] = 4  # expert 5 gets nothing
    sorted_ids, block_expert, total = moe_align(ids, n_exp, block_m)
    p, total = t * a, int(total)
    assert total % block_m == 0 and sorted_ids.numel() >= total and (sorted_ids[total:] == p).all()
    real = sorted_ids[sorted_ids < p].long()
    assert sorted(real.tolist()) == list(range(p))  # every (token, slot) pair exactly once
    flat = ids.reshape(-1)
    for b in range(total // block_m):
        run = sorted_ids[b * block_m:(b + 1) * block_m].long()
        run = run[run < p]
        assert len(run) and (flat[run] == block_expert[b]).all()  # a block holds one expert's pairs
        assert (run.diff() > 0).all()  # in token order


def test_moe_align_length_depends_on_shapes_only():
    """The routing buffers' sizes come from T, A, E and BLOCK_M alone (nothing sized from data, so a step can be
    captured in a CUDA graph): every token on one expert and tokens spread over all experts give the same length."""
    g = _gen()
    t, a, n_exp, block_m = 7, 2, 8, 4
    spread = torch.stack([torch.randperm(n_exp, generator=g)[:a] for _ in range(t)])
    one = torch.tensor([[3, 5]] * t)
    shapes = {tuple(x.shape for x in moe_align(ids, n_exp, block_m)) for ids in (spread, one)}
    assert len(shapes) == 1


# --- the wrappers' messages ---------------------------------------------------------------------------------


def _bad_weight(**kw) -> NF4Weight:
    w = _nf4(32, 64)
    for key, v in kw.items():
        setattr(w, key, v)
    return w


def _x(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, device=device).to(dtype)


@pytest.mark.parametrize("call,msg", [
    (lambda: nf4_matmul(_x(2, 48), _nf4(32, 64)), "last dimension must be the weight's in_features 64"),
    (lambda: nf4_matmul(_x(2, 64, dtype=torch.int32), _nf4(32, 64)), "float32, bfloat16 or float16"),
    (lambda: nf4_matmul(_x(64, 2).T, _nf4(32, 64)), "must be contiguous"),
    (lambda: nf4_matmul(_x(2, 80), _nf4(32, 80, blocksize=32)), "multiple of 32"),
    (lambda: nf4_matmul(_x(2, 64), {"weight": 1}), "must be a mixtral_quant.formats.NF4Weight"),
    (lambda: nf4_matmul(_x(2, 64), _bad_weight(shape=(32, 63))), "odd in_features 63"),
    (lambda: nf4_matmul(_x(2, 64), _bad_weight(shape=(64, 64))), "w.packed must be uint8 with 2048 bytes"),
    (lambda: nf4_matmul(_x(2, 64), _bad_weight(absmax=_x(32))), "w.absmax must be torch.uint8 with 32 blocks"),
    (lambda: nf4_matmul(_x(2, 64), _bad_weight(quant_map=_x(8))), "quant_map must be float32 [16]"),
    (lambda: nf4_matmul(_x(2, 64), _bad_weight(offset=0.5)), "w.offset must be a float32 tensor of one element"),
    (lambda: nf4_matmul(_x(2, 64, device="meta"), _nf4(32, 64)), "w.packed is on"),
    (lambda: int8_matmul(_x(2, 64), _int8(32, 64)[0], _x(31)), "scb must be float32 [32]"),
    (lambda: int8_matmul(_x(2, 64), _x(32, 64), _x(32)), "must be an int8 [N, K] tensor"),
    (lambda: int8_matmul(_x(2, 32), *_int8(32, 64)), "in_features 64"),
])  # fmt: skip
def test_wrapper_errors(call, msg):
    with pytest.raises(ValueError) as e:
        call()
    assert msg in str(e.value)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    if DEVICE == "cuda":
        x, w = torch.randn(2, 64), _nf4(32, 64)
        w = NF4Weight(**{**w.__dict__, **{k: getattr(w, k).cpu() for k in ("packed", "absmax", "quant_map",
                                                                           "nested_absmax", "nested_quant_map")}})
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        x, w = torch.randn(2, 64), _nf4(32, 64)
    with pytest.raises(ValueError) as e:
        nf4_matmul(x, w)
    assert "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU)" in str(e.value)


def test_moe_errors():
    w1s, w2s, w3s = _experts("nf4", 2, 64, 96)
    experts = stack_experts(w1s, w2s, w3s)
    x = torch.randn(3, 64, device=DEVICE)
    ids = torch.zeros(3, 2, dtype=torch.long, device=DEVICE)
    wts = torch.ones(3, 2, device=DEVICE)
    cases = [
        (lambda: fused_moe(x, ids.float(), wts, experts), "topk_ids must be an integer [T=3, A] tensor"),
        (lambda: fused_moe(x, ids, wts[:, :1], experts), "topk_weights must be a float tensor shaped like topk_ids"),
        (lambda: fused_moe(x[None], ids, wts, experts), "x must be [T, D]"),
        (lambda: fused_moe(x, ids, wts, w1s), "experts must be a StackedExperts"),
        (lambda: stack_experts(w1s, w2s[:1], w3s), "same non-zero number of w1, w2, w3"),
        (lambda: stack_experts(w1s, w2s, [w3s[0], _nf4(96, 64, blocksize=32)]), "must share shape and quantization"),
        (lambda: stack_experts(w1s, w2s, [w3s[0], _int8(96, 64)]), "mix of NF4 and int8 experts"),
        (lambda: stack_experts(w1s, w1s, w3s), "expected w1 = w3 = (F, D) and w2 = (D, F)"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert msg in str(e.value)


# --- the model on the triton backend -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_model_triton_backend_matches_torch_backend(tiny_checkpoint, tmp_path, fmt):
    from mixtral_quant.loader import load_quantized
    from mixtral_quant.quantize import quantize

    out = str(tmp_path / fmt)
    quantize(tiny_checkpoint, out, fmt=fmt, device="cpu", progress=False)
    ids = torch.randint(0, 512, (2, 7), generator=_gen()).to(DEVICE)
    logits = {}
    for backend in ("torch", "triton"):
        model = load_quantized(out, device=DEVICE, dtype=torch.float32, backend=backend, tokenizer=False)
        logits[backend] = model(ids)  # [2, 7, V]
        if backend == "triton" and fmt == "nf4":
            store = model.layers[0].block_sparse_moe.experts
            # the fused MoE read the loader's stacked buffers in place: no second copy of the experts
            assert store._fused.w1.packed.data_ptr() == store.w13.weight.data_ptr()
            assert store._fused.w2.packed.data_ptr() == store.w2.weight.data_ptr()
    _check(logits["triton"], logits["torch"].double(), torch.float32)


def test_stack_experts_views_equal_strided_buffers():
    g = _gen()
    w1s, w2s, w3s = _experts("nf4", 3, 64, 64, True, g)
    base = torch.stack([torch.stack([w.packed for w in w1s]), torch.stack([w.packed for w in w3s])], 1)  # [E, 2, ...]
    views = [NF4Weight(**{**w.__dict__, "packed": base[e, 0]}) for e, w in enumerate(w1s)]
    experts = stack_experts(views, w2s, w3s)
    assert experts.w1.packed.data_ptr() == base.data_ptr() and experts.w1.packed.stride(0) == base.stride(0)
    assert experts.w2.packed.data_ptr() != w2s[0].packed.data_ptr()  # separate tensors: copied
    x = torch.randn(4, 64, generator=g).to(DEVICE)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]]).to(DEVICE)
    wts = torch.full((4, 2), 0.5).to(DEVICE)
    _check(fused_moe(x, ids, wts, experts), ref.fused_moe_ref(x, ids, wts, w1s, w2s, w3s, torch.float64).double(),
           torch.float32)


# --- the tuner --------------------------------------------------------------------------------------------------


def test_tuner_times_configs_with_do_bench_and_keeps_the_fastest(monkeypatch):
    from mixtral_quant.kernels import _common

    configs = [_common.KernelConfig(1, bn, 64) for bn in (32, 64, 128)]
    ms = {32: 3.0, 64: 1.0, 128: 2.0}
    ran = []
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setenv("MIXQ_TUNE", "1")
    monkeypatch.setattr(_common.triton.testing, "do_bench", lambda fn, **kw: (fn(), ms[ran[-1].block_n])[1])
    tuner = _common.Tuner("t")
    assert tuner.pick("k", configs, ran.append) == configs[1]
    assert ran == configs
    assert tuner.pick("k", configs, ran.append) == configs[1] and len(ran) == 3  # remembered: not timed again


def test_tuner_raises_the_first_failure_when_no_config_runs(monkeypatch):
    from mixtral_quant.kernels import _common

    errors = iter([MemoryError("out of resource: shared memory, required 232448"), RuntimeError("later")])

    def launch(cfg):
        raise next(errors)

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setenv("MIXQ_TUNE", "1")
    monkeypatch.setattr(_common.triton.testing, "do_bench", lambda fn, **kw: fn())
    configs = [_common.KernelConfig(1, 32, 64), _common.KernelConfig(1, 64, 64)]
    with pytest.raises(MemoryError, match="shared memory, required 232448"):
        _common.Tuner("t").pick("k", configs, launch)
