"""Memory plans: Mixtral-8x7B NF4 against hand-counted parameters and bits/param, tiny configs against the
bytes a real quantized checkpoint holds, and the offload split."""

import importlib

import pytest
import torch
from conftest import TINY, write_checkpoint

from mixtral_quant.checkpoint import CheckpointReader, inspect_checkpoint
from mixtral_quant.config import MixtralConfig
from mixtral_quant.plan import expert_bytes, kv_cache_bytes, plan_memory, resident_bytes

Q = importlib.import_module("mixtral_quant.quantize")
M8x7 = MixtralConfig.from_name("Mixtral-8x7B-v0.1")


def test_mixtral_8x7b_nf4_fits_the_documented_figure():
    p = plan_memory(M8x7, context=4096)
    # counted by hand: 32 layers; attention q,o 4096x4096 and k,v 1024x4096; 8 experts of 3 x 4096x14336
    attention = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096)
    experts = 32 * 8 * 3 * 4096 * 14336
    bf16_params = 2 * 32000 * 4096 + 32 * 8 * 4096 + (2 * 32 + 1) * 4096  # embed + lm_head, routers, norms
    nf4_bits = 4 + 8 / 64 + 32 / (64 * 256)  # codes, 8-bit absmax per 64, fp32 per 256 absmax
    expected = (attention + experts) * nf4_bits / 8 + 2 * bf16_params
    assert abs(p.weights_bytes - expected) / expected < 1e-4
    assert 24.3e9 < p.weights_bytes < 24.7e9  # "about 24.5 GB"
    assert p.kv_cache_bytes == 2 * 32 * 4096 * 8 * 128 * 2
    assert p.total_bytes < 27e9
    assert p.total_bytes == p.weights_bytes + p.kv_cache_bytes + p.workspace_bytes
    assert p.fits is None and not p.offload["needed"]
    d = p.to_dict()
    assert {"weights_bytes", "kv_cache_bytes", "total_bytes", "fits", "offload"} <= set(d)


def test_fits_and_offload_split():
    assert plan_memory(M8x7, gpu_memory="40GB").fits is True
    p = plan_memory(M8x7, gpu_memory="24GB")
    o = p.offload
    assert p.fits is False and o["needed"] and o["possible"]
    one = expert_bytes(M8x7, "nf4")
    assert o["expert_bytes"] == one
    assert o["experts_per_layer_on_host"] + o["experts_per_layer_on_device"] == 8
    assert o["host_bytes"] == 32 * o["experts_per_layer_on_host"] * one
    assert o["device_bytes"] <= 24e9 < o["device_bytes"] + 32 * one  # one more expert per layer would not fit
    assert o["resident_bytes"] == resident_bytes(M8x7)
    tiny_gpu = plan_memory(M8x7, gpu_memory="2GB")
    assert tiny_gpu.offload["possible"] is False and tiny_gpu.offload["experts_per_layer_on_device"] == 0


def test_resident_plus_experts_is_the_total():
    for fmt in ("nf4", "int8", "bf16"):
        p = plan_memory(M8x7, experts=fmt, attention=fmt, context=1024, batch=2)
        assert resident_bytes(M8x7, attention=fmt, context=1024, batch=2) + 32 * 8 * expert_bytes(M8x7, fmt) == \
            p.total_bytes
    assert kv_cache_bytes(M8x7, 1024, 2) == 2 * kv_cache_bytes(M8x7, 1024, 1)
    assert kv_cache_bytes(M8x7, 1024, 1, torch.float32) == 2 * kv_cache_bytes(M8x7, 1024, 1)


def test_int8_experts_double_the_expert_bytes():
    nf4 = plan_memory(M8x7, experts="nf4")
    i8 = plan_memory(M8x7, experts="int8")
    params = 32 * 8 * 3 * 4096 * 14336
    assert i8.class_bytes["experts"] == params + 32 * 8 * 4 * (14336 + 4096 + 14336)  # + fp32 row scales
    assert i8.class_bytes["attention"] == nf4.class_bytes["attention"]
    assert plan_memory(M8x7, fmt="bf16").class_bytes["experts"] == 2 * params


@pytest.mark.parametrize("recipe", [dict(fmt="nf4"), dict(experts="nf4", attention="int8"), dict(fmt="bf16")])
def test_plan_matches_a_real_quantized_checkpoint(tmp_path, recipe):
    src = write_checkpoint(tmp_path / "src")
    out = Q.quantize(src, str(tmp_path / "out"), device="cpu", progress=False, **recipe).output
    info = inspect_checkpoint(out)
    with CheckpointReader(src) as r:
        p = plan_memory(r.config, **recipe)
    for cls, c in info["classes"].items():
        assert c["params"] == p.class_params[cls], cls
        # packed_nbytes reckons ~200 bytes of JSON per NF4 weight; the real JSON is a little shorter
        slack = 200 * c["count"] if c["format"] == "nf4" else 0
        assert 0 <= p.class_bytes[cls] - c["bytes"] <= slack, cls


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="size 'forty' not understood"):
        plan_memory(M8x7, gpu_memory="forty")
    with pytest.raises(ValueError, match="unknown format 'nf2'"):
        plan_memory(M8x7, experts="nf2")
    with pytest.raises(ValueError, match="context and batch must be positive"):
        plan_memory(M8x7, context=0)


def test_kv_cache_matches_the_models_preallocated_cache():
    # the model's KVCache holds every position, sliding window or not (the window is a mask)
    from mixtral_quant.model import Transformer

    c = MixtralConfig.from_dict({"model_type": "mixtral", **TINY, "sliding_window": 64})
    m = Transformer(c)
    m.setup_caches(2, 300)
    held = sum(b.numel() * b.element_size() for layer in m.layers for b in layer.self_attn.kv_cache.buffers())
    assert kv_cache_bytes(c, 300, batch=2, kv_dtype=torch.float32) == held
