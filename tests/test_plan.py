"""Memory plans: Mixtral-8x7B NF4 against hand-counted parameters and bits/param, tiny configs against the
bytes a loaded model holds, and the offload split; the plan and the loader's placement agree (one memory model)
for the builtin model and for Mixtral-8x7B / 8x22B checkpoints that exist only as headers (sparse files)."""

import importlib
import json
import math
import os
import struct

import pytest
import torch
from conftest import TINY, write_checkpoint

from mixtral_quant import formats, load_quantized, memory
from mixtral_quant.checkpoint import CheckpointReader, expected_shapes, inspect_checkpoint, tensor_class
from mixtral_quant.config import MixtralConfig
from mixtral_quant.loader import placement_for, tracked_bytes
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
    # one 4096-token prompt runs flash attention, no mask: one fp32 log-sum-exp per query row and head (0.5 MB),
    # not the math path's fp32 scores and softmax (4.3 GB); the total is the README's "~27 GB at 4k context"
    attn = memory.attention_workspace_bytes(M8x7, 4096, 1)
    assert attn == 32 * 4096 * 4 and p.total_bytes < 27e9
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
    ks = o["slots_per_layer"]
    assert len(ks) == 32 and min(ks) == o["experts_per_layer_on_device"] and max(ks) - min(ks) <= 1
    assert ks == sorted(ks, reverse=True)  # the remainder goes to the lowest layers
    assert o["host_bytes"] == sum(k < 8 for k in ks) * 8 * o["slot_bytes"]  # an offloaded layer: all 8 in host rows
    assert o["device_bytes"] <= 24e9 < o["device_bytes"] + o["slot_bytes"]  # one more slot would not fit
    assert o["resident_bytes"] == resident_bytes(M8x7)
    tiny_gpu = plan_memory(M8x7, gpu_memory="2GB")
    assert tiny_gpu.offload["possible"] is False and tiny_gpu.offload["experts_per_layer_on_device"] == 0
    # the minimum: the reservation + 2 slots (top-2) per layer; one byte less is not possible
    least = o["minimum_bytes"]
    assert plan_memory(M8x7, gpu_memory=least).offload["possible"] is True
    assert plan_memory(M8x7, gpu_memory=least).offload["slots_per_layer"] == [2] * 32
    assert plan_memory(M8x7, gpu_memory=least - 1).offload["possible"] is False


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


def _class_bytes_held(model) -> dict[str, int]:
    """Bytes of the distinct storages a loaded model holds per tensor class (views counted once)."""
    seen: dict[int, tuple[str, int]] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        cls = "rotary" if name == "inv_freq" else tensor_class(name if name.startswith("lm_head") else "model." + name)
        s = t.untyped_storage()
        seen[s.data_ptr()] = (cls, max(seen.get(s.data_ptr(), ("", 0))[1], s.nbytes()))
    out: dict[str, int] = {}
    for cls, n in seen.values():
        out[cls] = out.get(cls, 0) + n
    return out


@pytest.mark.parametrize("recipe", [dict(fmt="nf4"), dict(experts="nf4", attention="int8"), dict(fmt="bf16"),
                                    dict(experts="int8", attention="nf4", double_quant=False)])
def test_plan_matches_a_real_quantized_checkpoint(tmp_path, recipe):
    """Device bytes per class: the plan (config + recipe), the checkpoint's headers and the loaded model (the
    oracle: its storages counted) agree exactly; the file holds the nf4 JSON where the device holds 4 bytes."""
    src = write_checkpoint(tmp_path / "src")
    out = Q.quantize(src, str(tmp_path / "out"), device="cpu", progress=False, **recipe).output
    info = inspect_checkpoint(out)
    with CheckpointReader(src) as r:
        p = plan_memory(r.config, dtype=torch.float32, device_type="cpu", **recipe)
    with CheckpointReader(out) as r:
        fp = memory.footprint_from_checkpoint(r, torch.float32)
    model = load_quantized(out, device="cpu", tokenizer=False)  # float32 on the CPU
    held = _class_bytes_held(model)
    assert held == p.class_bytes == fp.class_bytes
    assert fp.expert_bytes == p.offload["expert_bytes"] and fp.slot_bytes == p.offload["slot_bytes"]
    assert p.weights_bytes == tracked_bytes(model)
    for cls, c in info["classes"].items():
        assert c["params"] == p.class_params[cls] == fp.class_params[cls], cls
        qp = {"attention": "attention", "experts": "experts"}.get(cls)
        fmt = (recipe.get("fmt") or recipe.get(qp)) if qp else None
        if fmt == "nf4":  # each weight: its JSON (~170 bytes) on disk, a float32 offset on the device
            assert 0 < c["bytes"] - held[cls] * 1 <= 200 * c["count"], cls
        elif fmt == "int8":
            assert c["bytes"] == held[cls], cls
        else:  # bf16 on disk, float32 on the device
            assert 2 * c["bytes"] == held[cls], cls


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="size 'forty' not understood"):
        plan_memory(M8x7, gpu_memory="forty")
    with pytest.raises(ValueError, match="unknown format 'nf2'"):
        plan_memory(M8x7, experts="nf2")
    with pytest.raises(ValueError, match="context and batch must be positive"):
        plan_memory(M8x7, context=0)
    with pytest.raises(ValueError, match="workload 'train': choose one of generate, eval"):
        plan_memory(M8x7, workload="train")


def test_kv_cache_matches_the_models_preallocated_cache():
    # the model's KVCache holds every position, sliding window or not (the window is a mask)
    from mixtral_quant.model import Transformer

    c = MixtralConfig.from_dict({"model_type": "mixtral", **TINY, "sliding_window": 64})
    m = Transformer(c)
    m.setup_caches(2, 300)
    held = sum(b.numel() * b.element_size() for layer in m.layers for b in layer.self_attn.kv_cache.buffers())
    assert kv_cache_bytes(c, 300, batch=2, kv_dtype=torch.float32) == held


# ---- one memory model: the plan and the loader's placement agree ------------------------------------------------
_ST = {torch.uint8: "U8", torch.int8: "I8", torch.float32: "F32", torch.bfloat16: "BF16"}


def _weight_specs(shape, fmt, qs_template: dict, blocksize: int = 64) -> list[tuple[str, torch.dtype, list, bytes]]:
    """(key suffix, dtype, shape, data or b'') of one weight as the quantizer stores it (rules checked against
    formats.quantize_tensor below)."""
    n = math.prod(shape)
    if fmt == "nf4":
        blocks = -(-n // blocksize)
        qs = formats.pack_quant_state({**qs_template, "shape": list(shape)}).numpy().tobytes()
        return [("weight", torch.uint8, [n // 2, 1], b""), ("weight.absmax", torch.uint8, [blocks], b""),
                ("weight.quant_map", torch.float32, [16], b""),
                ("weight.nested_absmax", torch.float32, [-(-blocks // 256)], b""),
                ("weight.nested_quant_map", torch.float32, [256], b""),
                (f"weight.{formats.QUANT_STATE_KEY}", torch.uint8, [len(qs)], qs)]  # fmt: skip
    if fmt == "int8":
        return [("weight", torch.int8, list(shape), b""), ("SCB", torch.float32, [shape[0]], b"")]
    return [("weight", torch.bfloat16, list(shape), b"")]


def header_only_checkpoint(path, config: MixtralConfig, fmts: dict[str, str]) -> str:
    """A packed checkpoint whose tensors exist only as safetensors headers: the data is a hole of a sparse file
    (nothing allocated, ~nothing written) except the nf4 JSON blobs, which the headers-only paths read."""
    small = {f: formats.quantize_tensor(torch.randn(64, 512, generator=torch.Generator().manual_seed(0)), f)
             for f in ("nf4", "int8")}  # fmt: skip
    qs_template = formats.unpack_quant_state(small["nf4"][f"weight.{formats.QUANT_STATE_KEY}"])
    for f, d in small.items():  # the rules above are the quantizer's
        got = {k: (v.dtype, list(v.shape)) for k, v in d.items() if "quant_state" not in k}
        assert got == {k: (dt, sh) for k, dt, sh, _ in _weight_specs((64, 512), f, qs_template) if "quant_state" not in k}
    shards: list[tuple[dict, list, int]] = [({}, [], 0)]  # (header, blobs, size); <= 4 GB each (mmap limits)
    for name, shape in expected_shapes(config).items():
        base = name.removesuffix(".weight")
        specs = _weight_specs(shape, fmts.get(tensor_class(name)), qs_template)
        size = sum(math.prod(sh) * dt.itemsize for _, dt, sh, _ in specs)
        if shards[-1][2] and shards[-1][2] + size > 4 * 10**9:
            shards.append(({}, [], 0))
        header, blobs, off = shards[-1]
        for suffix, dtype, sh, data in specs:
            nb = math.prod(sh) * dtype.itemsize
            header[f"{base}.{suffix}"] = {"dtype": _ST[dtype], "shape": sh, "data_offsets": [off, off + nb]}
            if data:
                blobs.append((off, data))
            off += nb
        shards[-1] = (header, blobs, off)
    os.makedirs(path, exist_ok=True)
    weight_map = {}
    for i, (header, blobs, off) in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        h = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
        h += b" " * (-len(h) % 8)
        with open(os.path.join(path, fname), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            for o, data in blobs:
                f.seek(8 + len(h) + o)
                f.write(data)
            f.truncate(8 + len(h) + off)
        weight_map.update(dict.fromkeys(header, fname))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config.to_dict(), "torch_dtype": "bfloat16", "quantization_config": {"formats": fmts}}, f)
    return str(path)


def _agree(reader, config, fmts, budget: int, *, context: int, batch: int, dtype, device: str) -> bool:
    """plan_memory(gpu_memory=budget) against the placement load_quantized(max_memory=budget) would use."""
    p = plan_memory(config, experts=fmts["experts"], attention=fmts["attention"], context=context, batch=batch,
                    gpu_memory=budget, dtype=dtype, device_type=device)  # fmt: skip
    o = p.offload
    try:
        pl = placement_for(reader, device, dtype, budget, context=context, batch=batch)
    except ValueError as e:
        assert not o["possible"], budget
        assert f"({o['minimum_bytes']:,} bytes)" in str(e)
        return False
    assert o["possible"], budget
    assert p.fits == (not pl.offloaded), budget
    assert o["slots_per_layer"] == pl.slots, budget
    assert o["device_bytes"] == pl.device_bytes + pl.workspace_bytes <= budget, budget
    assert (o["expert_bytes"], o["slot_bytes"], o["minimum_bytes"]) == (pl.expert_bytes, pl.slot_bytes,
                                                                       pl.minimum_bytes)  # fmt: skip
    assert (p.kv_cache_bytes, p.workspace_bytes) == (pl.kv_cache_bytes, pl.workspace_bytes)
    return True


@pytest.mark.parametrize("name,fmts,context,batch", [
    ("Mixtral-8x7B-v0.1", {"experts": "nf4", "attention": "nf4"}, None, 1),
    ("Mixtral-8x7B-v0.1", {"experts": "int8", "attention": "nf4"}, 1024, 2),
    ("Mixtral-8x22B-v0.1", {"experts": "nf4", "attention": "nf4"}, None, 1),
    ("Mixtral-8x22B-v0.1", {"experts": "nf4", "attention": "bf16"}, 16384, 1),
])  # fmt: skip
def test_plan_and_loader_agree_on_big_configs(tmp_path, name, fmts, context, batch):
    """Over budgets from below the minimum to above the whole model: fits, experts per layer, device bytes."""
    config = MixtralConfig.from_name(name)
    path = header_only_checkpoint(tmp_path / "ckpt", config, fmts)
    total = plan_memory(config, experts=fmts["experts"], attention=fmts["attention"], context=context,
                        batch=batch).total_bytes  # fmt: skip
    least = plan_memory(config, experts=fmts["experts"], attention=fmts["attention"], context=context, batch=batch,
                        gpu_memory=total - 1).offload["minimum_bytes"]  # fmt: skip
    budgets = [least - 1, least, least + 1] + [int(least + (total - least) * f) for f in (0.1, 0.3, 0.5, 0.7, 0.97)]
    budgets += [total - 1, total, total + 2**30, 16 * 2**30, 24 * 10**9, 80 * 10**9]
    with CheckpointReader(path) as r:
        outcomes = [_agree(r, config, fmts, b, context=context or 4096, batch=batch, dtype=torch.bfloat16,
                           device="cuda") for b in budgets]  # fmt: skip
    assert outcomes[:3] == [False, True, True] and all(outcomes[1:-3])


def test_plan_and_loader_agree_on_the_builtin_model(tmp_path):
    """The embedded model (bf16 experts) and its NF4 quantization, loaded for real on the CPU at budgets from the
    minimum up: the placement is the plan's and the device never holds more than the plan said fits."""
    from mixtral_quant.checkpoint import resolve_source

    src = resolve_source("builtin:tiny-mixtral")
    nf4 = Q.quantize(src, str(tmp_path / "nf4"), device="cpu", progress=False, fmt="nf4").output
    for path, fmts in ((src, {"experts": "bf16", "attention": "bf16"}), (nf4, {"experts": "nf4", "attention": "nf4"})):
        config = MixtralConfig.from_file(path)
        p = plan_memory(config, **fmts, dtype=torch.float32, device_type="cpu", context=128)
        least = plan_memory(config, **fmts, dtype=torch.float32, device_type="cpu", context=128,
                            gpu_memory=p.total_bytes - 1).offload["minimum_bytes"]  # fmt: skip
        loaded = 0
        with CheckpointReader(path) as r:
            for b in (least - 1, least, (least + p.total_bytes) // 2, p.total_bytes - 1, p.total_bytes):
                if not _agree(r, config, fmts, b, context=128, batch=1, dtype=torch.float32, device="cpu"):
                    continue
                loaded += 1
                model = load_quantized(path, device="cpu", tokenizer=False, max_memory=b, context=128)
                pl = model.expert_placement
                assert pl.slots == plan_memory(config, **fmts, dtype=torch.float32, device_type="cpu", context=128,
                                               gpu_memory=b).offload["slots_per_layer"]  # fmt: skip
                model.setup_caches(1, 128)
                assert tracked_bytes(model) == pl.device_bytes <= b - pl.workspace_bytes
        assert loaded == 4  # all but the budget one byte below the minimum


def test_workspace_counts_what_the_run_needs():
    """Generation reserves logits of the last position, an evaluation of every position; the reservation scales
    with context and batch; the default context is min(max_position_embeddings, 4096)."""
    V = M8x7.vocab_size
    gen = memory.workspace_bytes(M8x7, 4096, 1)
    ev = memory.workspace_bytes(M8x7, 4096, 1, workload="eval")
    assert ev - gen == (4096 - 1) * V * 4
    assert plan_memory(M8x7, workload="eval").workspace_bytes == ev
    assert memory.workspace_bytes(M8x7, 4096, 1, device_type="cpu") == gen - memory.CUDA_CONTEXT_BYTES
    assert memory.attention_workspace_bytes(M8x7, 4096, 1) == 32 * 4096 * 4  # flash: a log-sum-exp per row
    # a batch may be left-padded: a mask (bool + its bf16 copy) and K/V expanded to 32 heads for memory-efficient
    assert memory.attention_workspace_bytes(M8x7, 4096, 2) == 2 * (32 * 4096 * 4 + 2 * 32 * 4096 * 128 * 2
                                                                   + 4096 * 4096 * 3)
    assert memory.workspace_bytes(M8x7, 512, 2) < gen
    assert plan_memory(M8x7).context == 4096
    small = MixtralConfig.from_dict({"model_type": "mixtral", **TINY})
    assert memory.default_context(small) == TINY["max_position_embeddings"] == plan_memory(small).context


def test_mixq_plan_for_eval_reserves_every_positions_logits():
    from click.testing import CliRunner

    from mixtral_quant.cli.main import cli

    runs = {w: CliRunner().invoke(cli, ["plan", "Mixtral-8x7B-v0.1", "--context", "2048", "--for", w, "--json"])
            for w in ("generate", "eval")}  # fmt: skip
    assert all(r.exit_code == 0 for r in runs.values()), [r.output for r in runs.values()]
    gen, ev = (json.loads(runs[w].output)["workspace_bytes"] for w in ("generate", "eval"))
    assert gen == memory.workspace_bytes(M8x7, 2048, 1) and ev - gen == (2048 - 1) * M8x7.vocab_size * 4
    text = CliRunner().invoke(cli, ["plan", "Mixtral-8x7B-v0.1", "--for", "eval"]).output
    assert text.splitlines()[0].endswith("context 4096 x batch 1 (for mixq eval)")
    bad = CliRunner().invoke(cli, ["plan", "Mixtral-8x7B-v0.1", "--for", "train"])
    assert bad.exit_code == 2 and "'train' is not one of 'generate', 'eval'" in bad.output
