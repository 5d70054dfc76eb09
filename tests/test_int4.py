"""int4 in the compressed-tensors "pack-quantized" W4A16 format, against the compressed-tensors library (the one vLLM
and llm-compressor use) and transformers, both ways:
- our bytes are the library's (pack_to_int32, calculate_qparams + quantize), and the library decompresses every
  weight of our checkpoint to exactly our dequantized values;
- a checkpoint the library itself compressed loads here with logits equal, within 1e-4 relative in fp32, to
  transformers' MixtralForCausalLM holding the library's decompressed weights;
- bad input: one-line errors, nothing written.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import TINY, hub_state_dict, write_checkpoint
from mixtral_quant import formats, load_quantized
from mixtral_quant.checkpoint import CheckpointError, CheckpointReader
from mixtral_quant.cli.main import cli
from mixtral_quant.loader import tracked_bytes
from mixtral_quant.quantize import quantize

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
RTOL = 1e-4


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _seed() -> int:
    seed = int(torch.randint(0, 2**31, ()))
    print("seed", seed)  # fresh data, reproducible from the log
    return seed


def _scheme(group: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                                                           strategy="group", group_size=group))


def _int4_dir(tmp_path, group=32, dtype=torch.bfloat16, **kw) -> str:
    src = write_checkpoint(tmp_path / "src", SMALL, dtype=dtype, seed=_seed() % 1000)
    out = str(tmp_path / "int4")
    quantize(src, out, **({"fmt": "int4"} if not kw else kw), group_size=group, device="cpu", progress=False)
    return out


def _transformers_model(sd: dict, cfg: dict, tmp_path):
    from transformers import MixtralForCausalLM

    ref = write_checkpoint(tmp_path / "oracle", cfg, state_dict={k: v.float() for k, v in sd.items()},
                           dtype=torch.float32, shards=1)  # fmt: skip
    return MixtralForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()


# ---- the bytes ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(16, 256), (3, 64), (5, 8)])
def test_pack_is_the_librarys(shape):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    q = torch.randint(-8, 8, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(_seed()))
    packed = formats.pack_int4(q)
    assert torch.equal(packed, pack_to_int32(q, 4))
    assert torch.equal(formats.unpack_int4(packed, shape), q)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size(shape)), q)


@pytest.mark.parametrize("group", [32, 128])
def test_quantize_is_the_librarys_rtn(group):
    """fp32: scales equal calculate_qparams and codes equal the library's quantize exactly. bf16: the library
    divides in bf16 before rounding; where its code differs ours is the nearer one (round to nearest in fp32)."""
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    g = torch.Generator().manual_seed(_seed())
    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(48, 256, generator=g) * 0.05).to(dtype)
        w[3, :group] = 0  # an all-zero group: scale eps, codes 0
        ours = formats.quantize_int4(w, group)
        args = _scheme(group).weights
        grouped = w.view(48, -1, group)
        scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        assert torch.equal(ours["weight_scale"], scale) and ours["weight_scale"].dtype == dtype
        theirs = ct_quantize(w, scale, zp, args, dtype=torch.int8)
        q = formats.unpack_int4(ours["weight_packed"], w.shape)
        assert ours["weight_shape"].tolist() == [48, 256] and ours["weight_shape"].dtype == torch.int64
        if dtype == torch.float32:
            assert torch.equal(q, theirs)
            continue
        s = scale.float().repeat_interleave(group, dim=1)
        differ = q != theirs
        mine, lib = (w.float() - q.float() * s).abs(), (w.float() - theirs.float() * s).abs()
        assert (mine[differ] <= lib[differ]).all()
        # they differ only by one step, next to a tie: |w/s| < 8 rounds to bf16 within half an ulp, at most 2^-6
        exact = w.double() / s.double()
        assert ((q - theirs)[differ].abs() == 1).all()
        tie = (q[differ].double() + theirs[differ].double()) / 2
        assert ((exact[differ] - tie).abs() <= 2**-6 + 1e-9).all()


def test_repack_decodes_to_the_same_values():
    """int4_as_nf4: the NF4 view (code table -8..7, fp32 absmax = scale, group = block, bnb nibble order) decodes
    to exactly dequantize_int4's values, with the packed bytes' count unchanged."""
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(_seed())).to(torch.bfloat16)
    d = formats.quantize_int4(w, 64)
    nf = formats.int4_as_nf4(d)
    assert nf["weight"].dtype == torch.uint8 and nf["weight"].numel() == d["weight_packed"].numel() * 4
    assert nf["weight.quant_map"].tolist() == list(range(-8, 8)) and nf["weight.absmax"].dtype == torch.float32
    meta = formats.unpack_quant_state(nf["weight." + formats.QUANT_STATE_KEY])
    assert meta["blocksize"] == 64 and "nested_offset" not in meta
    assert torch.equal(formats.dequantize_nf4(nf), formats.dequantize_int4(d))
    assert torch.equal(formats.dequantize_tensor(d), formats.dequantize_int4(d))


# ---- our checkpoint, read by the library ------------------------------------------------------------------------

def test_library_reads_our_checkpoint(tmp_path):
    from compressed_tensors.compressors import ModelCompressor, PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out = _int4_dir(tmp_path)
    conf = json.load(open(os.path.join(out, "config.json")))
    qc = conf["quantization_config"]
    # the config parses as the library's and as transformers' (what vLLM and from_pretrained go through)
    parsed = QuantizationConfig.model_validate(qc)
    ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(dict(qc)))
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    (group,) = parsed.config_groups.values()
    assert group.targets == ["Linear"] and group.input_activations is None
    w = group.weights
    assert (w.num_bits, w.type, w.symmetric, w.strategy, w.group_size) == (4, "int", True, "group", 32)
    L = SMALL["num_hidden_layers"]
    assert parsed.ignore == ["lm_head"] + [f"model.layers.{i}.block_sparse_moe.gate" for i in range(L)]

    sd = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(out, f)))
    prefixes = sorted(k.removesuffix(".weight_packed") for k in sd if k.endswith(".weight_packed"))
    assert len(prefixes) == L * (4 + 3 * TINY["num_local_experts"])  # q/k/v/o + w1/w2/w3 per expert
    assert "model.layers.1.block_sparse_moe.experts.7.w2" in prefixes  # the Hub's per-expert names
    with CheckpointReader(out) as r:
        for p in prefixes:
            mine = {k: sd[f"{p}.{k}"] for k in formats.INT4_KEYS}
            theirs = PackedQuantizationCompressor.decompress(dict(mine), group)["weight"]
            ours = formats.dequantize_tensor(mine)
            assert theirs.dtype == ours.dtype == torch.bfloat16
            assert torch.equal(theirs, ours), p
            assert torch.equal(formats.dequantize_tensor(r.module(p)), ours), p  # the repacked view at load


# ---- the library's checkpoint, read by us -----------------------------------------------------------------------

def _library_checkpoint(path, cfg: dict, group: int, dtype, seed: int) -> tuple[str, dict]:
    """A tiny Mixtral compressed by compressed-tensors itself (apply_quantization_config, calculate_qparams,
    ModelCompressor.compress_model + update_config) from nn.Linear modules under the Hub's names; returns
    (directory, the library's decompressed state dict)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams
    from torch import nn

    sd = hub_state_dict(cfg, dtype, seed)
    root = nn.Module()
    for k, t in sd.items():
        *parents, leaf = k.removesuffix(".weight").split(".")
        m = root
        for p in parents:
            if not hasattr(m, p):
                m.add_module(p, nn.Module())
            m = getattr(m, p)
        if t.dim() == 2 and not k.startswith("model.embed_tokens"):
            mod = nn.Linear(t.shape[1], t.shape[0], bias=False, dtype=dtype)
        else:
            mod = nn.Module()
            mod.weight = nn.Parameter(torch.empty_like(t))
        mod.weight.data.copy_(t)
        m.add_module(leaf, mod)
    ignore = ["lm_head"] + [f"model.layers.{i}.block_sparse_moe.gate" for i in range(cfg["num_hidden_layers"])]
    apply_quantization_config(root, QuantizationConfig(config_groups={"group_0": _scheme(group)}, ignore=ignore))
    for name, m in root.named_modules():
        if hasattr(m, "quantization_scheme"):  # round-to-nearest: min/max observed over each group of the weight
            grouped = m.weight.data.view(m.weight.shape[0], -1, group)
            scale, _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), m.quantization_scheme.weights)
            m.weight_scale.data.copy_(scale)
    compressor = ModelCompressor.from_pretrained_model(root, "pack-quantized")
    compressor.compress_model(root)
    packed = {k: v.contiguous() for k, v in root.state_dict().items()}
    assert sum(k.endswith("weight_packed") for k in packed) == cfg["num_hidden_layers"] * (4 + 3 * 8)
    d = write_checkpoint(path, cfg, state_dict=packed, dtype=dtype, shards=2)
    compressor.update_config(d)  # the library writes config.json's quantization_config
    compressor.decompress_model(root)
    dense = {k: v for k, v in root.state_dict().items() if k.endswith(".weight")}
    return d, dense


@pytest.mark.parametrize("group, intermediate", [(32, 96), (64, 128)])
def test_library_checkpoint_logits_match_transformers(tmp_path, group, intermediate):
    cfg = {**TINY, **SMALL, "intermediate_size": intermediate}
    path, dense = _library_checkpoint(tmp_path / "ct", cfg, group, torch.float32, _seed() % 1000)
    assert json.load(open(os.path.join(path, "config.json")))["quantization_config"]["quant_method"] == \
        "compressed-tensors"
    model = load_quantized(path, device="cpu", tokenizer=False)
    ref = _transformers_model(dense, cfg, tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(_seed()))
    with torch.no_grad():
        assert rel_err(model(ids), ref(ids).logits) < RTOL


def test_library_bf16_checkpoint_logits(tmp_path):
    """A bf16 checkpoint (the Hub's case: bf16 scales). The library decompresses to bf16, rounding each q * scale to
    8 bits; our fp32 compute keeps the exact product, as does the library's own dequantize given the scale in fp32:
    against that, the same 1e-4."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    cfg = {**TINY, **SMALL}
    path, dense = _library_checkpoint(tmp_path / "ct", cfg, 32, torch.bfloat16, _seed() % 1000)
    args = _scheme(32).weights
    sd = {}
    with CheckpointReader(path) as r:
        for k in r.keys():
            if k.endswith(".weight_packed"):
                p = k.removesuffix(".weight_packed")
                shape = torch.Size(r.get(p + ".weight_shape").tolist())
                q = unpack_from_int32(r.get(k), 4, shape)
                sd[p + ".weight"] = dequantize(q, r.get(p + ".weight_scale").float(), args=args)
                assert torch.equal(sd[p + ".weight"].to(torch.bfloat16), dense[p + ".weight"])  # the same q, scale
            elif k.endswith(".weight"):
                sd[k] = r.get(k)
    model = load_quantized(path, device="cpu", tokenizer=False)
    ref = _transformers_model(sd, cfg, tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(_seed()))
    with torch.no_grad():
        assert rel_err(model(ids), ref(ids).logits) < RTOL


def test_library_checkpoint_runs_offloaded_and_through_the_cli(tmp_path):
    """A bf16 library checkpoint: every command reads it; offloaded greedy decoding equals resident."""
    cfg = {**TINY, **SMALL}
    path, _ = _library_checkpoint(tmp_path / "ct", cfg, 32, torch.bfloat16, _seed() % 1000)
    ids = torch.randint(3, SMALL["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(_seed()))
    resident = load_quantized(path, device="cpu", tokenizer=False)
    held = {"attention": sum(tracked_bytes(b.self_attn) for b in resident.layers),  # before a KV cache exists
            "experts": sum(tracked_bytes(b.block_sparse_moe.experts) for b in resident.layers)}
    offloaded = load_quantized(path, device="cpu", tokenizer=False, max_memory=_budget_for_some_slots(path))
    assert offloaded.expert_placement is not None and min(offloaded.expert_placement.slots) < 8
    assert torch.equal(resident.generate(ids, 8), offloaded.generate(ids, 8))
    r = CliRunner().invoke(cli, ["inspect", path, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["classes"]["experts"]["format"] == "int4" and info["classes"]["router"]["format"] == "bf16"
    r = CliRunner().invoke(cli, ["plan", path, "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["formats"] == {"attention": "int4", "experts": "int4"}
    # the plan counts what a loaded model holds (memory.py): the stored bytes with fp32 instead of bf16 scales,
    # a 16-entry code table and the 4-byte nested-offset buffer QuantLinear keeps for nf4, less the weight_shape
    for c in ("attention", "experts"):
        n = info["classes"][c]["count"]
        assert held[c] == plan["class_bytes"][c], (c, held[c], plan["class_bytes"][c])
        scales = info["classes"][c]["params"] // 32
        assert plan["class_bytes"][c] - info["classes"][c]["bytes"] == 2 * scales + (64 + 4 - 16) * n


def _budget_for_some_slots(path: str) -> int:
    from mixtral_quant.loader import placement_for

    with CheckpointReader(path) as r:
        full = placement_for(r, torch.device("cpu"), torch.float32, 2**40)
        return full.fixed_bytes + len(full.slots) * full.table_bytes + 12 * full.slot_bytes


# ---- our checkpoint: every command and the model ----------------------------------------------------------------

def test_our_int4_logits_match_transformers_and_commands_run(tmp_path):
    out = _int4_dir(tmp_path, group=32, dtype=torch.float32)
    with CheckpointReader(out) as r:
        sd = {}
        for p in r.modules_index():
            t = r.module(p)
            sd[p + ".weight"] = formats.dequantize_tensor(t, torch.float32) if len(t) > 1 else t["weight"].float()
    ref = _transformers_model(sd, {**TINY, **SMALL}, tmp_path)
    model = load_quantized(out, device="cpu", tokenizer=False)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(_seed()))
    with torch.no_grad():
        assert rel_err(model(ids), ref(ids).logits) < RTOL


def test_every_command_on_the_builtin_model(tmp_path):
    """quantize -> inspect, plan, generate, chat, eval on the embedded tiny model (it has a tokenizer)."""
    out = str(tmp_path / "tiny-int4")

    def ok(*args, input=None):
        r = CliRunner().invoke(cli, [str(a) for a in args], input=input)
        assert r.exit_code == 0, r.output
        return r.output

    ok("quantize", "builtin:tiny-mixtral", "-o", out, "--format", "int4", "--group-size", "64", "--json")
    assert "compressed-tensors pack-quantized int4 group 64" in ok("inspect", out)
    assert "attention int4, experts int4" in ok("plan", out)
    gen = json.loads(ok("generate", out, "-p", "def f(x):", "-n", "4", "--json"))
    model = load_quantized(out, device="cpu")
    ids = torch.tensor([model.tokenizer.encode("def f(x):")])
    assert gen["tokens"] == model.generate(ids, 4)[0, ids.shape[1]:].tolist()
    assert "/exit" not in ok("chat", out, "-n", "3", input="Hi\n/exit\n")
    ev = json.loads(ok("eval", out, "-r", "builtin:tiny-mixtral", "--max-tokens", "300", "--context", "64", "--json"))
    assert ev["windows"] == 4 and 0.5 < ev["top1_agreement"] <= 1


def test_int4_experts_with_bf16_attention(tmp_path):
    out = _int4_dir(tmp_path, group=32, experts="int4", attention="bf16")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert "model.layers.1.self_attn.o_proj" in qc["ignore"] and "lm_head" in qc["ignore"]
    r = CliRunner().invoke(cli, ["inspect", out, "--json"])
    info = json.loads(r.output)
    assert info["classes"]["attention"]["format"] == "bf16" and info["classes"]["experts"]["format"] == "int4"
    r = CliRunner().invoke(cli, ["plan", out, "--json"])
    assert json.loads(r.output)["formats"] == {"attention": "bf16", "experts": "int4"}
    assert load_quantized(out, device="cpu", tokenizer=False) is not None


def test_int4_attention_with_bf16_experts_names_every_expert_in_ignore(tmp_path):
    """The config alone must say the experts stay 16-bit: vLLM and the compressed-tensors library read it, and so
    does `mixq plan` on a Hub id (config.json only)."""
    from mixtral_quant import compressed
    from mixtral_quant.config import MixtralConfig

    out = _int4_dir(tmp_path, group=32, experts="bf16", attention="int4")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    c = MixtralConfig.from_file(os.path.join(out, "config.json"))
    experts = {f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}" for i in range(c.num_hidden_layers)
               for e in range(c.num_local_experts) for w in ("w1", "w2", "w3")}  # fmt: skip
    assert experts <= set(qc["ignore"]) and not any("self_attn" in n for n in qc["ignore"])
    assert compressed.recipe_from_config(qc) == {"attention": "int4", "experts": "bf16"}
    r = CliRunner().invoke(cli, ["inspect", out, "--json"])
    info = json.loads(r.output)
    assert info["classes"]["attention"]["format"] == "int4" and info["classes"]["experts"]["format"] == "bf16"


def test_plan_int4_bytes():
    from mixtral_quant.config import MixtralConfig
    from mixtral_quant.plan import plan_memory

    c = MixtralConfig.from_name("Mixtral-8x7B-v0.1")
    p = plan_memory(c, fmt="int4", group_size=128)
    D, F = c.hidden_size, c.intermediate_size
    one = F * D // 2 + 4 * (F * D // 128) + 64 + 4  # packed nibbles + fp32 scales + code table + offset, loaded
    assert p.class_bytes["experts"] == 3 * one * c.num_local_experts * c.num_hidden_layers
    stored = F * D // 2 + 2 * (F * D // 128) + 16  # on disk: bf16 scales + weight_shape
    assert formats.packed_nbytes("int4", (F, D), group_size=128) == stored
    r = CliRunner().invoke(cli, ["plan", "Mixtral-8x7B-v0.1", "--format", "int4", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["class_bytes"] == p.class_bytes


# ---- bad input ------------------------------------------------------------------------------------------------

def _one_line(r) -> str:
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mixq: error: ") and "Traceback" not in r.output, r.output
    return lines[0]


def test_group_size_that_does_not_divide_writes_nothing(tmp_path):
    src = write_checkpoint(tmp_path / "src", SMALL)  # hidden 64, intermediate 96
    before = sorted(os.listdir(tmp_path))
    msg = "int4 group size 128 does not divide the input dimension 64; choose one that divides it (--group-size 64)"
    with pytest.raises(ValueError, match=r"group size 128 does not divide") as e:
        quantize(src, str(tmp_path / "out"), fmt="int4", group_size=128, device="cpu", progress=False)
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == before
    line = _one_line(CliRunner().invoke(cli, ["quantize", src, "-o", tmp_path / "out", "--format", "int4"]))
    assert msg in line
    # w2's input is the intermediate size 96: 64 divides D but not F
    line = _one_line(CliRunner().invoke(cli, ["quantize", src, "-o", tmp_path / "out", "--experts", "int4",
                                              "--attention", "bf16", "--group-size", "64"]))  # fmt: skip
    assert "experts.0.w2.weight: int4 group size 64 does not divide the input dimension 96" in line
    line = _one_line(CliRunner().invoke(cli, ["quantize", src, "-o", tmp_path / "out", "--format", "int4",
                                              "--group-size", "48"]))  # fmt: skip
    assert "int4 group size must be a power of two from 32 to 4096" in line
    line = _one_line(CliRunner().invoke(cli, ["quantize", src, "-o", tmp_path / "out", "--experts", "int4",
                                              "--attention", "nf4"]))  # fmt: skip
    assert "an int4 checkpoint is a compressed-tensors one" in line
    assert sorted(os.listdir(tmp_path)) == before


def _edit_config(path: str, edit) -> None:
    f = os.path.join(path, "config.json")
    conf = json.load(open(f))
    edit(conf["quantization_config"])
    json.dump(conf, open(f, "w"))


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory):
    return _int4_dir(tmp_path_factory.mktemp("int4"))


def _weights(qc):
    return qc["config_groups"]["group_0"]["weights"]


@pytest.mark.parametrize("edit, message", [
    (lambda qc: _weights(qc).update(symmetric=False), "asymmetric weights (zero points) in group_0"),
    (lambda qc: qc["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int",
                                                                         "symmetric": True, "strategy": "token",
                                                                         "dynamic": True}),
     "activation quantization in group_0"),
    (lambda qc: _weights(qc).update(num_bits=8), "8-bit int weights in group_0"),
    (lambda qc: _weights(qc).update(strategy="channel", group_size=None), "strategy 'channel' in group_0"),
    (lambda qc: _weights(qc).update(actorder="group"), "activation-ordered groups"),
    (lambda qc: qc.update(format="marlin-24"), "format 'marlin-24'"),
], ids=["asymmetric", "activations", "int8", "channel", "actorder", "format"])
def test_unsupported_compressed_tensors_configs_refused(tmp_path, int4_dir, edit, message):
    import shutil

    path = str(tmp_path / "ckpt")
    shutil.copytree(int4_dir, path)
    _edit_config(path, edit)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError) as e:
        load_quantized(path, device="cpu", tokenizer=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "supported: W4A16 pack-quantized, symmetric, strategy group" in str(e.value)
    for args in (["generate", path, "-p", "hi", "-n", "2"], ["inspect", path], ["plan", path]):
        assert message in _one_line(CliRunner().invoke(cli, args))
    assert sorted(os.listdir(tmp_path)) == before


def _add_or_drop(src: str, path: str, drop: str | None = None, add: dict | None = None) -> None:
    """Copy checkpoint `src` to `path` with tensor `drop` removed or the tensors `add` added (index updated)."""
    import shutil

    shutil.copytree(src, path)
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shard = index["weight_map"][drop] if drop else next(iter(index["weight_map"].values()))
    sd = load_file(os.path.join(path, shard))
    if drop:
        del sd[drop], index["weight_map"][drop]
    for k, v in (add or {}).items():
        sd[k] = v
        index["weight_map"][k] = shard
    save_file(sd, os.path.join(path, shard), metadata={"format": "pt"})
    json.dump(index, open(os.path.join(path, "model.safetensors.index.json"), "w"))


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("drop, add, message", [
    ("model.layers.1.block_sparse_moe.experts.3.w2.weight_scale", None,
     "tensor model.layers.1.block_sparse_moe.experts.3.w2.'weight_scale' is missing"),
    ("model.layers.0.self_attn.k_proj.weight_scale", None, "self_attn.k_proj.'weight_scale' is missing"),
    (None, {Q + ".weight_zero_point": torch.zeros(1, dtype=torch.int32)},
     "asymmetric int4 (zero points) is not supported"),
    (None, {Q + ".weight_g_idx": torch.arange(64, dtype=torch.int32).flip(0) // 32},
     "q_proj.weight_g_idx: activation-ordered groups (a permuted weight_g_idx) is not supported"),
], ids=["expert-scale", "attention-scale", "zero-point", "permuted-g_idx"])
def test_bad_tensors_refused(tmp_path, int4_dir, drop, add, message):
    path = str(tmp_path / "ckpt")
    _add_or_drop(int4_dir, path, drop, add)
    with pytest.raises(CheckpointError) as e:
        load_quantized(path, device="cpu", tokenizer=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert message in _one_line(CliRunner().invoke(cli, ["generate", path, "-p", "hi", "-n", "2"]))


def test_bnb_backend_refused(int4_dir):
    with pytest.raises(ValueError, match="backend 'bnb' cannot run int4"):
        load_quantized(int4_dir, device="cpu", backend="bnb", tokenizer=False)


def test_plain_group_index_and_regex_ignore_accepted(tmp_path, int4_dir):
    """GPTQ checkpoints may store weight_g_idx even without activation ordering (i // group): that loads as if
    absent; an `ignore` written as a compressed-tensors regex is understood by plan."""
    path = str(tmp_path / "ckpt")
    _add_or_drop(int4_dir, path, add={Q + ".weight_g_idx": torch.arange(64, dtype=torch.int32) // 32})
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(load_quantized(path, device="cpu", tokenizer=False)(ids),
                           load_quantized(int4_dir, device="cpu", tokenizer=False)(ids))
    from mixtral_quant.compressed import recipe_from_config

    qc = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    assert recipe_from_config(qc) == {"attention": "int4", "experts": "int4"}
    assert recipe_from_config({**qc, "ignore": ["lm_head", "re:.*self_attn.*"]}) == {"attention": "bf16",
                                                                                     "experts": "int4"}
