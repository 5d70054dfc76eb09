"""bitsandbytes Mixtral checkpoints as transformers 4.57 saves them (tests/fixtures/bnb, made by
evals/make_bnb_fixtures.py with transformers 4.57.6 + bitsandbytes 0.50.2), and our bitsandbytes quantization_config.

Oracles: the logits and greedy tokens transformers 4.57 computed on each fixture (recorded beside it, fp32),
bitsandbytes' own dequantize functions, transformers' BitsAndBytesConfig, and transformers 5.x loading our output.
"""

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mixtral_quant import load_quantized
from mixtral_quant.checkpoint import CheckpointError, CheckpointReader, inspect_checkpoint
from mixtral_quant.cli.main import cli
from mixtral_quant.config import MixtralConfig
from mixtral_quant.plan import plan_memory
from mixtral_quant.quantize import quantize

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "bnb")
GATE = "model.layers.0.block_sparse_moe.gate"
# fixture -> (attention/experts format, double quant)
SUPPORTED = {"nf4-dq": ("nf4", True), "nf4": ("nf4", False), "int8": ("int8", None)}


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def reference(name: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(fixture(name), "reference.safetensors"))


def ours(path: str, ids: torch.Tensor, greedy: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    m = load_quantized(path, device="cpu", dtype="float32", tokenizer=False)
    with torch.no_grad():
        logits = m(ids).float()
        tokens = m.generate(ids[:1], greedy)[0, ids.shape[1]:]
    return logits, tokens


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r) -> str:
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mixq: error: ") and "Traceback" not in r.output, r.output
    return lines[0]


def rewrite(src: str, dst, edit) -> str:
    """Copy fixture `src` to `dst` with its single model.safetensors edited by edit(dict) in place."""
    shutil.copytree(src, dst)
    f = os.path.join(dst, "model.safetensors")
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})
    return str(dst)


# ---- reading what transformers 4.57 wrote ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["source", "nf4-dq", "nf4"])
def test_logits_and_greedy_equal_transformers_457(name):
    """nf4 with and without double quant (one file, and two shards) and the bf16 source: transformers 4.57's fp32
    logits within 1e-3 relative (they agree to the last bit here: both decode nf4 exactly and run fp32), same
    8 greedy tokens."""
    ref = reference(name)
    logits, tokens = ours(fixture(name), ref["input_ids"])
    assert rel(logits, ref["logits"]) <= 1e-3
    assert torch.equal(tokens, ref["greedy"])


@pytest.mark.parametrize("name", ["nf4-dq", "int8"])
def test_formats_come_from_the_tensors_when_the_config_is_silent(tmp_path, name):
    d = str(tmp_path / name)
    shutil.copytree(fixture(name), d)
    conf = json.load(open(os.path.join(d, "config.json")))
    del conf["quantization_config"]
    json.dump(conf, open(os.path.join(d, "config.json"), "w"))
    ref = reference(name)
    with CheckpointReader(d) as r:
        assert r.check().class_formats()["experts"] == SUPPORTED[name][0]
    logits, _ = ours(d, ref["input_ids"], greedy=1)
    assert torch.equal(logits, ours(fixture(name), ref["input_ids"], greedy=1)[0])


def test_int8_logits_within_the_llm_int8_gap():
    """transformers 4.57 runs 8-bit weights through bitsandbytes' LLM.int8 matmul, which also quantizes the
    activations (fp16, row-wise int8, outlier columns above 6.0 in fp16); we dequantize the weight and run fp32.
    So: equal to transformers on the dequantized weights (the same arithmetic) within fp32 rounding, and no
    farther from LLM.int8's logits than transformers' own dequantize-then-matmul is (that gap is recorded by
    the fixture script: 0.39 of the largest logit on this random model, where routing flips amplify it)."""
    ref = reference("int8")
    logits, tokens = ours(fixture("int8"), ref["input_ids"])
    assert rel(logits, ref["logits_dequant"]) <= 1e-5
    assert torch.equal(tokens, ref["greedy_dequant"])
    gap = (ref["logits"] - ref["logits_dequant"]).abs().max()
    assert (logits - ref["logits"]).abs().max() <= gap * (1 + 1e-4)


@pytest.mark.parametrize("name", ["nf4-dq", "int8"])
def test_offloaded_experts_give_the_resident_tokens(name):
    """Expert offloading reads bitsandbytes' expert tensors (weight_format included) into its slots alike."""
    ref = reference(name)
    want = ours(fixture(name), ref["input_ids"])[1]
    p0 = load_quantized(fixture(name), device="cpu", tokenizer=False, max_memory=2**40).expert_placement
    for per_layer in (2, 3):  # the minimum is top-k (2) slots per layer; each offloaded layer has a slot table
        budget = p0.fixed_bytes + 2 * p0.table_bytes + per_layer * 2 * p0.slot_bytes
        m = load_quantized(fixture(name), device="cpu", dtype="float32", tokenizer=False, max_memory=budget)
        assert m.expert_placement.slots == [per_layer] * 2
        with torch.no_grad():
            assert torch.equal(m.generate(ref["input_ids"][:1], 8)[0, ref["input_ids"].shape[1]:], want), per_layer
        assert m.offload_stats()["misses"] > 0


def test_quantized_router_is_decoded_once_as_bitsandbytes_decodes_it():
    """transformers 4.x quantizes block_sparse_moe.gate (an nn.Linear there): the loader holds it as a float
    [E, D] parameter equal to bitsandbytes' own dequantization of the stored bytes."""
    import bitsandbytes.functional as bf

    for name in ("nf4-dq", "int8"):
        m = load_quantized(fixture(name), device="cpu", dtype="float32", tokenizer=False)
        got = m.layers[0].block_sparse_moe.gate.weight
        with CheckpointReader(fixture(name)) as r:
            t = r.module(GATE)
        if name == "int8":
            want = bf.int8_vectorwise_dequant(t["weight"], t["SCB"])
        else:
            qs = bf.QuantState.from_dict({k.removeprefix("weight."): v for k, v in t.items() if k != "weight"},
                                         device=torch.device("cpu"))  # fmt: skip
            qs.dtype = torch.float32  # decode in fp32 (the state says bfloat16, the dtype it was quantized from)
            want = bf.dequantize_4bit(t["weight"], qs)
        assert got.dtype == torch.float32 and tuple(got.shape) == (4, 64)
        # nf4: bit for bit; int8: bitsandbytes multiplies by a rounded 1/127, we divide SCB by 127: an ulp apart
        torch.testing.assert_close(got, want.float(), rtol=0 if name != "int8" else 3e-7, atol=0, msg=name)


# ---- refusals: one line, nothing run -------------------------------------------------------------------------

def test_fp4_is_refused_in_one_line(tmp_path):
    msg = "a bitsandbytes fp4 checkpoint (bnb_4bit_quant_type 'fp4'); fp4 is not supported, only nf4"
    with pytest.raises(CheckpointError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_quantized(fixture("fp4"), device="cpu", tokenizer=False)
    for cmd in (["inspect"], ["plan"], ["generate", "-p", "x", "-n", "1"]):
        line = one_line_error(run(cmd[0], fixture("fp4"), *cmd[1:]))
        assert msg in line and "config.json" in line
    # the config silent, the tensors say it: quant_state.bitsandbytes__fp4
    def drop_config(path):
        conf = json.load(open(os.path.join(path, "config.json")))
        del conf["quantization_config"]
        json.dump(conf, open(os.path.join(path, "config.json"), "w"))
    d = str(tmp_path / "fp4")
    shutil.copytree(fixture("fp4"), d)
    drop_config(d)
    with pytest.raises(CheckpointError, match=r"holds bitsandbytes fp4 weights; fp4 is not supported, only nf4"):
        load_quantized(d, device="cpu", tokenizer=False)


@pytest.mark.parametrize("name, edit, message", [
    ("int8", lambda sd: sd.update({f"{GATE}.weight": sd[f"{GATE}.weight"][:3], f"{GATE}.SCB": sd[f"{GATE}.SCB"][:3]}),
     f"{GATE}.weight is int8 [3, 64], config.json implies int8 [4, 64]"),
    ("nf4-dq", lambda sd: sd.update({f"{GATE}.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(
        bytes(sd[f"{GATE}.weight.quant_state.bitsandbytes__nf4"].numpy()).replace(b"[4, 64]", b"[8, 32]")),
        dtype=torch.uint8)}), f"{GATE}.weight.quant_state.bitsandbytes__nf4 is nf4 [8, 32], config.json implies nf4 [4, 64]"),
    ("nf4-dq", lambda sd: sd.update({f"{GATE}.weight": sd[f"{GATE}.weight"][:100]}),
     f"{GATE}.weight is uint8 [100, 1], config.json implies uint8 [128, 1]"),
    ("nf4-dq", lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"][:63]}),
     "model.norm.weight is bfloat16 [63], config.json implies shape [64]"),
    ("int8", lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"].float()[:, :32].contiguous()}),
     "lm_head.weight is float32 [512, 32], config.json implies shape [512, 64]"),
    ("int8", lambda sd: sd.update({f"{GATE}.weight_format": torch.tensor(1, dtype=torch.uint8)}),
     f"{GATE}.weight_format is not 0 (row-major)"),
    ("int8", lambda sd: sd.pop(f"{GATE}.SCB"), "an int8 weight without its SCB row scales"),
    ("nf4-dq", lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(2)}),
     "unexpected tensor 'model.layers.0.extra.weight'"),
])  # fmt: skip
def test_a_tensor_that_disagrees_with_config_json_is_one_line_naming_it(tmp_path, name, edit, message):
    d = rewrite(fixture(name), tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: ") as e:
        load_quantized(d, device="cpu", tokenizer=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    before = sorted(os.listdir(d))
    line = one_line_error(run("generate", d, "-p", "x", "-n", "1"))
    assert message in line
    assert sorted(os.listdir(d)) == before  # nothing written


@pytest.mark.parametrize("method, what", [("gptq", "GPTQ"), ("awq", "AWQ"), ("fp8", "fp8"),
                                          ("somethingelse", "quant_method 'somethingelse'")])  # compressed-tensors: test_int4
def test_other_quantizers_are_refused_in_one_line(tmp_path, method, what):
    d = str(tmp_path / method)
    shutil.copytree(fixture("source"), d)
    conf = json.load(open(os.path.join(d, "config.json")))
    conf["quantization_config"] = {"quant_method": method, "bits": 4}
    json.dump(conf, open(os.path.join(d, "config.json"), "w"))
    for cmd in ("inspect", "plan"):
        line = one_line_error(run(cmd, d))
        assert f"a {what} checkpoint; {what} is not supported: mixtral-quant reads" in line
    with pytest.raises(CheckpointError, match=f"a {what} checkpoint"):
        load_quantized(d, device="cpu", tokenizer=False)


def test_gptq_tensors_and_gguf_files_are_refused(tmp_path):
    # the config silent, the tensors are GPTQ's
    def gptq(sd):
        w = sd.pop("model.layers.0.self_attn.q_proj.weight")
        sd["model.layers.0.self_attn.q_proj.qweight"] = torch.zeros(w.shape[1] // 8, w.shape[0], dtype=torch.int32)
        sd["model.layers.0.self_attn.q_proj.qzeros"] = torch.zeros(1, w.shape[0] // 8, dtype=torch.int32)
        sd["model.layers.0.self_attn.q_proj.scales"] = torch.zeros(1, w.shape[0], dtype=torch.float16)
    d = rewrite(fixture("source"), tmp_path / "gptq", gptq)
    with pytest.raises(CheckpointError, match=r"q_proj holds GPTQ/AWQ weights .*GPTQ and AWQ are not supported"):
        load_quantized(d, device="cpu", tokenizer=False)
    g = tmp_path / "gguf"
    g.mkdir()
    shutil.copy(os.path.join(fixture("source"), "config.json"), g)
    (g / "mixtral-8x7b.Q4_K_M.gguf").write_bytes(b"GGUF")
    line = one_line_error(run("generate", g, "-p", "x", "-n", "1"))
    assert "a GGUF checkpoint (mixtral-8x7b.Q4_K_M.gguf); GGUF is not supported" in line


# ---- plan and inspect ------------------------------------------------------------------------------------------

def _header_bytes(path: str) -> dict[str, int]:
    """Bytes per tensor from the safetensors headers, read with safetensors itself."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors") and f != "reference.safetensors":
            with safe_open(os.path.join(path, f), "pt") as h:
                for k in h.keys():
                    t = h.get_slice(k)
                    n = 1
                    for s in t.get_shape():
                        n *= s
                    out[k] = n * {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4}[t.get_dtype()]
    return out


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_inspect_and_plan_report_the_fixtures_formats_and_bytes(name):
    fmt, dq = SUPPORTED[name]
    info = inspect_checkpoint(fixture(name))
    formats = {c: v["format"] for c, v in info["classes"].items()}
    assert formats == {"attention": fmt, "experts": fmt, "router": fmt, "embeddings": "bf16", "lm_head": "bf16",
                       "norms": "bf16"}  # fmt: skip
    assert info["encoding"]["method"] == "bitsandbytes" and info["encoding"]["double_quant"] == dq
    sizes = _header_bytes(fixture(name))
    assert info["total"]["bytes"] == sum(sizes.values())
    experts = sum(v for k, v in sizes.items() if ".experts." in k)
    assert info["classes"]["experts"]["bytes"] == experts
    assert info["classes"]["router"]["bytes"] == sum(v for k, v in sizes.items() if ".gate." in k)
    assert info["classes"]["experts"]["params"] == 2 * 4 * 3 * 64 * 128

    r = run("plan", fixture(name), "--json")
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert p["formats"] == {"attention": fmt, "experts": fmt}
    cfg = MixtralConfig.from_file(fixture(name))
    want = plan_memory(cfg, experts=fmt, attention=fmt, double_quant=dq is not False)
    assert p["weights_bytes"] == want.weights_bytes
    # the plan's packed sizes estimate the nf4 JSON at 200 bytes a weight (and skip int8's 1-byte weight_format):
    # within that of the file, per expert weight
    assert abs(p["class_bytes"]["experts"] - experts) <= 200 * 24
    # the router is decoded at load: planned in the 16-bit dtype
    assert p["class_bytes"]["router"] == 2 * 4 * 64 * 2
    text = run("inspect", fixture(name)).output.splitlines()[0]
    assert f"bitsandbytes: attention {fmt}, experts {fmt}, router {fmt}, lm_head bf16" in text


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_plan_from_config_json_alone_reads_the_bitsandbytes_block(name):
    """A Hub repo id fetches config.json only: the bitsandbytes quantization_config gives the same plan."""
    r = run("plan", os.path.join(fixture(name), "config.json"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == json.loads(run("plan", fixture(name), "--json").output)


# ---- what we write ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_our_quantization_config_is_a_bitsandbytes_one(tmp_path, fmt):
    from transformers import BitsAndBytesConfig

    out = quantize(fixture("source"), str(tmp_path / fmt), fmt=fmt, device="cpu", progress=False).output
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    bnb = BitsAndBytesConfig.from_dict(qc)
    assert bnb.quant_method == "bitsandbytes"
    assert (bnb.load_in_4bit, bnb.load_in_8bit) == (fmt == "nf4", fmt == "int8")
    if fmt == "nf4":
        assert bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant is True
        assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    routers = {f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)}
    assert set(bnb.llm_int8_skip_modules) == routers | {"lm_head"}
    assert qc["formats"] == {"attention": fmt, "experts": fmt}  # our fields beside it
    with CheckpointReader(out) as r:
        assert r.check().class_formats()["experts"] == fmt


def test_mixed_recipe_config_is_refused_by_transformers_not_misread(tmp_path):
    """nf4 and int8 together cannot be one bitsandbytes config: both load_in flags are set, which
    BitsAndBytesConfig refuses; our own reader still loads it."""
    from transformers import BitsAndBytesConfig

    out = quantize(fixture("source"), str(tmp_path / "mixed"), attention="int8", experts="nf4", device="cpu",
                   progress=False).output  # fmt: skip
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    with pytest.raises(ValueError, match="load_in_4bit and load_in_8bit are both True"):
        BitsAndBytesConfig.from_dict(qc)
    m = load_quantized(out, device="cpu", tokenizer=False)
    assert m.layers[0].self_attn.q_proj.fmt == "int8" and m.layers[0].block_sparse_moe.experts.w13.fmt == "nf4"


def test_transformers_457_loaded_our_output_with_our_logits():
    """Recorded by evals/make_bnb_fixtures.py in transformers 4.57.6: our nf4/int8 output loads with Linear4bit /
    Linear8bitLt experts and attention (2 layers x 16), routers and lm_head as nn.Linear, and the same logits
    (int8: the same as its dequantize-then-matmul; its LLM.int8 differs as in the int8 test above)."""
    rec = json.load(open(os.path.join(FIXTURES, "ours.json")))
    assert rec["nf4"]["loaded"] and rec["nf4"]["modules"] == {"Linear4bit": 32, "Linear": 3}
    assert rec["nf4"]["max_rel_diff"] <= 1e-5 and rec["nf4"]["top1_agreement"] == 1.0
    assert rec["int8"]["loaded"] and rec["int8"]["modules"] == {"Linear8bitLt": 32, "Linear": 3}
    assert rec["int8"]["max_rel_diff_dequant"] <= 1e-5
    # a 16-bit class is kept 16-bit there by its full module names in llm_int8_skip_modules
    assert rec["bf16-attention"]["modules"] == {"Linear4bit": 24, "Linear": 11}
    assert rec["bf16-attention"]["max_rel_diff"] <= 1e-5
    # nf4 + int8 cannot be one bitsandbytes config: refused, not misread
    assert not rec["mixed"]["loaded"] and "load_in_4bit and load_in_8bit are both True" in rec["mixed"]["error"]


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_transformers_5_never_loads_our_output_silently_wrong(tmp_path, fmt):
    """transformers 5.x (the test venv's) fuses the experts into 3-D tensors it never quantizes: given our output it
    must either compute our logits or raise (at load or at the first forward)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("measures transformers 5.x")
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bnb_transformers5", os.path.join(
        os.path.dirname(__file__), "..", "evals", "bnb_transformers5.py"))  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bnb_transformers5", mod)
    spec.loader.exec_module(mod)
    out = quantize(fixture("source"), str(tmp_path / fmt), fmt=fmt, device="cpu", progress=False).output
    ids = reference("source")["input_ids"]
    v = mod.transformers_verdict(out, ids, mod.ours(out, ids))
    assert v["verdict"] in ("correct", "fails loudly"), v
