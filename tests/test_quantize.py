"""The streaming quantizer: every output tensor is exactly formats.quantize_tensor of its source (formats.py is
itself checked against bitsandbytes), the key set and config are right, memory stays bounded, failures leave
nothing behind. Also the fast NF4 coder against torch.bucketize / bitsandbytes on adversarial values."""

import importlib
import json
import os
import weakref

import pytest
import torch
from conftest import TINY, hub_state_dict, write_checkpoint

from mixtral_quant import formats
from mixtral_quant.checkpoint import INDEX_NAME, CheckpointError, CheckpointReader, expected_shapes, tensor_class
from mixtral_quant.config import ConfigError, MixtralConfig

Q = importlib.import_module("mixtral_quant.quantize")  # the module (as `import mixtral_quant.quantize as Q`)

RECIPES = {
    "nf4": dict(fmt="nf4"),
    "int8": dict(fmt="int8"),
    "bf16": dict(fmt="bf16"),
    "mixed": dict(experts="nf4", attention="int8"),
}


def _expected_keys(config, fmts, double_quant=True):
    keys = set()
    for name in expected_shapes(config):
        fmt = fmts.get(tensor_class(name))
        if fmt is None:
            keys.add(name)
        else:
            prefix = name.removesuffix(".weight")
            keys |= {f"{prefix}.{s}" for s in formats.param_suffixes(fmt, double_quant)}
    return keys


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_quantize_matches_quantize_tensor_exactly(tmp_path, recipe):
    style = 5 if recipe == "mixed" else 4
    src = write_checkpoint(tmp_path / "src", config_style=style, seed=7)
    (tmp_path / "src" / "tokenizer.model").write_bytes(b"sentencepiece bytes")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    res = Q.quantize(src, str(tmp_path / "out"), device="cpu", max_shard_size="150KB", progress=False,
                     **RECIPES[recipe])
    out = res.output
    fmts = Q.recipe(**RECIPES[recipe])
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]
    with CheckpointReader(src) as s, CheckpointReader(out) as o:
        o.verify()
        assert set(o.keys()) == _expected_keys(s.config, fmts)
        assert len(o.shards()) > 1
        for name in s.keys():
            w = s.get(name)
            fmt = fmts.get(tensor_class(name))
            prefix = name.removesuffix(".weight")
            if fmt is None:
                assert torch.equal(o.get(name), w) and o.get(name).dtype == w.dtype, name
                continue
            ref = formats.quantize_tensor(w, fmt)
            got = o.module(prefix)
            assert set(got) == set(ref), name
            for k in ref:
                assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), (name, k)
            assert torch.equal(formats.dequantize_tensor(got), formats.dequantize_tensor(ref))
        qc = o.quantization_config()
        assert {k: qc[k] for k in ("formats", "blocksize", "double_quant", "source_dtype")} == {
            "formats": fmts, "blocksize": 64, "double_quant": True, "source_dtype": "bfloat16"}
        used = set(fmts.values()) & {"nf4", "int8"}  # the bitsandbytes block beside ours (tests/test_bnb.py)
        assert qc["quant_method"] == ("bitsandbytes" if used else "mixtral-quant")
        # the rest of config.json is the source's (4.x or 5.x keys kept), and it still parses
        assert o.config.rope_theta == TINY["rope_theta"]
        assert ("rope_parameters" in o.config.raw) == (style == 5)
    for f in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(src, f), "rb").read()
    idx = json.load(open(os.path.join(out, INDEX_NAME)))
    assert idx["metadata"]["total_size"] == res.output_bytes
    assert res.input_bytes == sum(v.numel() * 2 for v in hub_state_dict(TINY).values())
    assert res.params == res.input_bytes // 2
    assert res.bits_per_param["embeddings"] == 16.0


def test_quantize_without_double_quant_and_fp16_source(tmp_path):
    src = write_checkpoint(tmp_path / "src", dtype=torch.float16, shards=1)
    res = Q.quantize(src, str(tmp_path / "out"), blocksize=128, double_quant=False, device="cpu", progress=False)
    with CheckpointReader(src) as s, CheckpointReader(res.output) as o:
        name = "model.layers.1.self_attn.o_proj"
        ref = formats.quantize_tensor(s.get(name + ".weight"), "nf4", blocksize=128, double_quant=False)
        got = o.module(name)
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
        assert o.get("model.embed_tokens.weight").dtype == torch.float16
        assert o.quantization_config()["source_dtype"] == "float16"
        assert set(o.keys()) == _expected_keys(s.config, {"attention": "nf4", "experts": "nf4"}, double_quant=False)


def test_streaming_holds_one_tensor_and_one_shard(tmp_path, monkeypatch):
    """Peak host memory: source tensors alive at once (tracked with weakrefs) and the writer's buffer."""
    src = write_checkpoint(tmp_path / "src")
    live, peak = [0], [0]
    real_get = CheckpointReader.get

    def tracking_get(self, name, device="cpu"):
        t = real_get(self, name, device)
        n = t.numel() * t.element_size()
        live[0] += n
        peak[0] = max(peak[0], live[0])
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - n))
        return t

    writers = []
    real_writer = Q.ShardWriter

    def recording_writer(*a, **kw):
        writers.append(real_writer(*a, **kw))
        return writers[-1]

    monkeypatch.setattr(CheckpointReader, "get", tracking_get)
    monkeypatch.setattr(Q, "ShardWriter", recording_writer)
    max_shard = 60_000
    Q.quantize(src, str(tmp_path / "out"), device="cpu", max_shard_size=max_shard, progress=False)
    sd = hub_state_dict(TINY)
    largest = max(v.numel() * v.element_size() for v in sd.values())
    assert peak[0] <= largest  # never two source tensors at once
    # a buffer never exceeds one shard, unless a single tensor is bigger than a shard
    assert 0 < writers[0].max_buffered_bytes <= max(max_shard, largest)
    assert writers[0].max_buffered_bytes < sum(v.numel() * 2 for v in sd.values()) / 4


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "src")
    calls = [0]
    real = formats.quantize_tensor

    def flaky(*a, **kw):
        calls[0] += 1
        if calls[0] == 20:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(Q.formats, "quantize_tensor", flaky)
    with pytest.raises(KeyboardInterrupt):
        Q.quantize(src, str(tmp_path / "out"), device="cpu", max_shard_size="50KB", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_refuses_existing_output_and_overwrites_when_asked(tmp_path):
    src = write_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="out: output directory exists and is not empty"):
        Q.quantize(src, str(out), device="cpu", progress=False)
    assert os.listdir(out) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["out", "src"]
    Q.quantize(src, str(out), device="cpu", progress=False, overwrite=True)
    assert "notes.txt" not in os.listdir(out) and INDEX_NAME in os.listdir(out)
    with pytest.raises(ValueError, match="the output directory is the source"):
        Q.quantize(src, src, device="cpu", progress=False, overwrite=True)


def test_refuses_when_disk_is_too_small(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "src")

    class Usage:
        total, used, free = 10**9, 10**9 - 1000, 1000

    monkeypatch.setattr(Q.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(OSError, match=r"GB free, the output needs about .* GB; free some space"):
        Q.quantize(src, str(tmp_path / "out"), device="cpu", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def _bad_shape(tmp_path):
    sd = hub_state_dict(TINY)
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 65, dtype=torch.bfloat16)
    return write_checkpoint(tmp_path / "src", state_dict=sd)


def _nan_weight(tmp_path):
    sd = hub_state_dict(TINY)
    sd["model.layers.1.block_sparse_moe.experts.5.w3.weight"][7, 3] = float("nan")
    return write_checkpoint(tmp_path / "src", state_dict=sd)


def _quantized(tmp_path):
    src = write_checkpoint(tmp_path / "orig")
    return Q.quantize(src, str(tmp_path / "src"), device="cpu", progress=False).output


@pytest.mark.parametrize("make, kwargs, exc, message", [
    (lambda p: str(p / "missing"), {}, CheckpointError, "missing: no such directory"),
    (lambda p: write_checkpoint(p / "src"), {"fmt": "nf3"}, ValueError, "unknown format 'nf3'"),
    (lambda p: write_checkpoint(p / "src"), {"experts": "q4"}, ValueError, "unknown format 'q4'"),
    (lambda p: write_checkpoint(p / "src"), {"blocksize": 48}, ValueError, "blocksize must be a power of two"),
    (lambda p: write_checkpoint(p / "src"), {"max_shard_size": "lots"}, ValueError, "size 'lots' not understood"),
    (lambda p: write_checkpoint(p / "src"), {"device": "tpu"}, ValueError, "device 'tpu': choose auto, cpu or cuda"),
    (_bad_shape, {}, CheckpointError, "q_proj.weight has shape [64, 65], config.json expects [64, 64]"),
    (_quantized, {}, CheckpointError, "already quantized"),
    (_nan_weight, {}, ValueError, "experts.5.w3.weight: the weight holds NaN or Inf values"),
], ids=["missing", "format", "experts-format", "blocksize", "shard-size", "device", "shape", "already-quantized",
        "nan"])
def test_bad_input_writes_nothing(tmp_path, make, kwargs, exc, message):
    src = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(exc) as e:
        Q.quantize(src, str(tmp_path / "out"), progress=False, **{"device": "cpu", **kwargs})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == before


def test_model_type_refused(tmp_path):
    src = write_checkpoint(tmp_path / "src")
    conf = json.load(open(os.path.join(src, "config.json")))
    json.dump({**conf, "model_type": "mistral"}, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(ConfigError, match=r"config.json: model_type is 'mistral', expected 'mixtral'"):
        Q.quantize(src, str(tmp_path / "out"), device="cpu", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_estimate_matches_the_output(tmp_path, tiny_checkpoint):
    with CheckpointReader(tiny_checkpoint) as r:
        todo = Q.plan_tensors(r, Q.recipe("nf4"))
        estimate = Q.estimate_output_bytes(r, todo, 64, True)
    res = Q.quantize(tiny_checkpoint, str(tmp_path / "out"), device="cpu", progress=False)
    assert abs(estimate - res.output_bytes) < 200 * len(todo)  # packed_nbytes guesses the JSON at 200 bytes


# ---- the fast NF4 coder -----------------------------------------------------------------------------------------

def _ulps_around(values, k=3):
    t = torch.tensor(values, dtype=torch.float32)
    out = [t]
    up, down = t.clone(), t.clone()
    for _ in range(k):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        out += [up, down]
    return torch.cat(out)


def test_nf4_cells_are_exact_at_every_midpoint_and_cell_edge():
    """Scaled values at the NF4 midpoints and the grid's cell edges, +-3 ulps: codes equal bucketize's."""
    mids = formats._tables("cpu")[1]
    edges = [c / formats._NF4_GRID - 1 for c in range(int(2 * formats._NF4_GRID) + 1)]
    x = _ulps_around(mids.tolist() + edges + [0.0, 1.0, -1.0])
    x = x[(x >= -1) & (x <= 1)]
    g = torch.Generator().manual_seed(1)
    x = torch.cat([x, torch.rand(100_000, generator=g) * 2 - 1])
    x = torch.cat([x, torch.zeros((-x.numel()) % 63)])
    # blocks of 63 values plus a 1.0 that sets absmax = 1, so the scaled values are exactly x
    blocks = torch.cat([x.view(-1, 63), torch.ones(x.numel() // 63, 1)], dim=1)
    d = formats.quantize_tensor(blocks, "nf4", double_quant=False)
    packed = d["weight"].view(-1)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)
    ref = torch.bucketize(blocks.view(-1), mids)  # bitsandbytes' own rule (backends/default/ops.py)
    assert torch.equal(codes.long(), ref)


@pytest.mark.parametrize("shape", [(4100, 64), (37, 129), (3, 7)])
def test_nf4_chunked_coder_matches_bitsandbytes(shape, monkeypatch):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    monkeypatch.setitem(formats._CHUNK_ELEMENTS, "cpu", 1024)  # many chunks, a partial last one
    g = torch.Generator().manual_seed(sum(shape))
    w = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
    w.view(-1)[:64] = 0  # an all-zero block
    q, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    d = formats.quantize_tensor(w, "nf4", double_quant=False)
    assert torch.equal(d["weight"], q) and torch.equal(d["weight.absmax"], state.absmax)


def test_nf4_refuses_non_finite():
    w = torch.randn(64, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        formats.quantize_tensor(w, "nf4")
