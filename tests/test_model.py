"""The model against transformers' MixtralForCausalLM holding the same weights (dequantized from our files), fp32 CPU.

Tolerance: logits within 1e-4 of the largest logit (relative), for nf4, int8 and bf16 checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_checkpoint
from mixtral_quant import load_quantized
from mixtral_quant.checkpoint import CheckpointError, CheckpointReader
from mixtral_quant.formats import QUANT_STATE_KEY, dequantize_tensor
from mixtral_quant.loader import load_block, load_shell, tracked_bytes
from mixtral_quant.model import make_context
from mixtral_quant.quantize import quantize


pytestmark = pytest.mark.usefixtures("one_thread")


RTOL = 1e-4
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory):
    """One packed NF4 checkpoint shared by the tests that only read it."""
    return packed(tmp_path_factory.mktemp("shared"), "nf4")


def packed(tmp_path, fmt: str, cfg: dict | None = None, seed: int = 0, **kw) -> str:
    """A random Hub checkpoint quantized by the real quantizer (fmt, or attention=/experts= for a mix)."""
    src = write_checkpoint(tmp_path / f"src-{seed}", {**SMALL, **(cfg or {})}, seed=seed)
    out = str(tmp_path / f"{fmt}-{seed}")
    quantize(src, out, fmt=None if kw else fmt, progress=False, **kw)
    return out


def oracle(path: str, tmp_path):
    """transformers' model holding our checkpoint's weights, dequantized to fp32 by formats.dequantize_tensor."""
    from transformers import MixtralForCausalLM

    with CheckpointReader(path) as r:
        sd = {}
        for prefix in r.modules_index():
            t = r.module(prefix)
            sd[prefix + ".weight"] = dequantize_tensor(t, torch.float32) if len(t) > 1 else t["weight"].float()
        cfg = {k: v for k, v in r.config.raw.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = r.config.rope_theta
    ref = write_checkpoint(tmp_path / f"oracle-{os.path.basename(path)}", cfg, state_dict=sd, dtype=torch.float32,
                           shards=1)  # fmt: skip
    return MixtralForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()


@pytest.mark.parametrize("fmt", ["nf4", "int8", "bf16"])
def test_logits_match_transformers(tmp_path, fmt):
    path = packed(tmp_path, fmt)  # GQA: 4 query heads, 2 key/value heads
    model = load_quantized(path, device="cpu", tokenizer=False)
    ref = oracle(path, tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(model(ids), ref(ids).logits) < RTOL


def test_unusual_config_matches_transformers(tmp_path):
    """The config values every other test leaves at Mixtral's: top-3 routing, 4:1 GQA, an explicit head_dim unlike
    hidden / heads, a large rms_norm_eps. A top-k, eps or head_dim hard-coded anywhere disagrees with transformers."""
    cfg = dict(num_experts_per_tok=3, num_key_value_heads=1, head_dim=24, rms_norm_eps=0.05)
    path = packed(tmp_path, "nf4", cfg)
    model = load_quantized(path, device="cpu", tokenizer=False)
    assert (model.config.num_experts_per_tok, model.config.head_dim, model.config.rms_norm_eps) == (3, 24, 0.05)
    ref = oracle(path, tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(model(ids), ref(ids).logits) < RTOL


def test_mixed_recipe_and_sliding_window(tmp_path):
    """int8 attention + nf4 experts; a sliding window (5) shorter than the sequence (17); 8 heads over 2 kv heads."""
    cfg = {"sliding_window": 5, "num_attention_heads": 8, "num_key_value_heads": 2}
    path = packed(tmp_path, "mix", cfg, attention="int8", experts="nf4")
    model = load_quantized(path, device="cpu", tokenizer=False)
    ref = oracle(path, tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids)
        assert rel_err(ours, ref(ids).logits) < RTOL
        # the window matters here: without it the last logits differ
        model.config.sliding_window = None
        assert rel_err(model(ids)[:, -1], ours[:, -1]) > 1e-3


def left_pad(prompts: list[list[int]], pad: int = 0):
    S = max(map(len, prompts))
    ids = torch.tensor([[pad] * (S - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (S - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_left_padded_batch_matches_each_prompt_alone(tmp_path):
    path = packed(tmp_path, "nf4", {"sliding_window": 4})
    model = load_quantized(path, device="cpu", tokenizer=False)
    ref = oracle(path, tmp_path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (9, 3, 6)]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        for row, p in enumerate(prompts):
            alone = ref(torch.tensor([p])).logits[0]
            assert rel_err(batch[row, -len(p):], alone) < RTOL


def test_greedy_through_cache_equals_full_forward_and_transformers_generate(tmp_path):
    path = packed(tmp_path, "nf4", {"sliding_window": 6})
    model = load_quantized(path, device="cpu", tokenizer=False)
    ref = oracle(path, tmp_path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 8)]
    ids, mask = left_pad(prompts)
    n_new = 12  # positions run past the window
    out = model.generate(ids, n_new, attention_mask=mask, eos=[])
    assert out.shape == (2, 8 + n_new)
    hf = ref.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                      pad_token_id=0)  # fmt: skip
    assert torch.equal(out, hf)
    # each token is the argmax of a full forward (no cache) over the sequence so far, row alone
    model.clear_caches()
    with torch.no_grad():
        for row, p in enumerate(prompts):
            seq = out[row, 8 - len(p):]
            full = model(seq[None, :-1]).argmax(-1)[0]
            assert torch.equal(full[len(p) - 1:], seq[len(p):])


def test_blocks_load_and_run_one_at_a_time(nf4_dir):
    """The streaming path: shell (embed, norm, lm_head) + one block at a time gives the full model's logits."""
    path = nf4_dir
    model = load_quantized(path, device="cpu", tokenizer=False)
    ids = torch.randint(0, 256, (2, 7))
    with CheckpointReader(path) as reader, torch.no_grad():
        shell = load_shell(reader, device=torch.device("cpu"), dtype=torch.float32)
        assert len(shell.layers) == 0
        ctx = make_context(reader.config, torch.arange(7), dtype=torch.float32)
        h = shell.embed_tokens(ids)
        for i in range(reader.config.num_hidden_layers):
            block = load_block(reader, i, device=torch.device("cpu"), dtype=torch.float32, backend="torch")
            h = block(h, ctx)
            del block
        logits = shell.lm_head(shell.norm(h))
        assert rel_err(logits, model(ids)) < 1e-6


def expected_bytes(path: str, compute_bytes: int = 4) -> int:
    """What a loaded model must hold: packed tensors as stored (the quant-state JSON parsed into fields plus one
    fp32 offset per nf4 weight), full-precision tensors in the fp32 compute dtype, and RoPE's inverse frequencies."""
    total = 0
    with CheckpointReader(path) as r:
        for k in r.keys():
            t = r.get(k)
            if k.endswith(QUANT_STATE_KEY):
                total += 4  # the nested offset, kept as a float32
            elif t.dtype in (torch.bfloat16, torch.float16) or (t.dtype == torch.float32 and not k.split(".")[-1]
                                                                 in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "SCB")):  # fmt: skip
                total += t.numel() * compute_bytes
            else:
                total += t.numel() * t.element_size()
        total += r.config.head_dim // 2 * 4
    return total


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_memory_holds_only_packed_bytes(tmp_path, fmt):
    path = packed(tmp_path, fmt)
    model = load_quantized(path, device="cpu", tokenizer=False)
    assert tracked_bytes(model) == expected_bytes(path)
    # no float tensor shaped like a quantized weight [out, in] exists (nothing dequantized was kept)
    c = model.config
    D, Fi, q, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {(Fi, D), (D, Fi), (q, D), (kv, D), (D, q)}
    for t in list(model.parameters()) + list(model.buffers()):
        assert not (t.is_floating_point() and tuple(t.shape[-2:]) in shapes), tuple(t.shape)
    model.setup_caches(2, 40)
    kv = 2 * c.num_hidden_layers * 2 * c.num_key_value_heads * 40 * c.head_dim * 4
    assert tracked_bytes(model) == expected_bytes(path) + kv
    # a forward keeps nothing new
    with torch.no_grad():
        model.generate(torch.randint(0, 256, (2, 5)), 3, eos=[])
    assert tracked_bytes(model) == expected_bytes(path) + kv


def test_triton_backend_dispatches_to_the_kernels(nf4_dir, monkeypatch):
    """backend='triton' sends every packed matmul to mixtral_quant.kernels (stubbed here by the torch reference)."""
    import mixtral_quant.kernels as kernels

    calls = []

    def nf4_matmul(x, w):
        calls.append(w.shape)
        d = {"weight": w.packed, "weight.absmax": w.absmax, "weight.quant_map": w.quant_map,
             "weight.nested_absmax": w.nested_absmax, "weight.nested_quant_map": w.nested_quant_map}  # fmt: skip
        from mixtral_quant.formats import pack_quant_state

        d["weight." + QUANT_STATE_KEY] = pack_quant_state({"quant_type": "nf4", "blocksize": w.blocksize,
                                                           "dtype": "bfloat16", "shape": list(w.shape),
                                                           "nested_blocksize": 256, "nested_dtype": "float32",
                                                           "nested_offset": float(w.offset)})  # fmt: skip
        return x @ dequantize_tensor(d, x.dtype).T

    monkeypatch.setattr(kernels, "nf4_matmul", nf4_matmul, raising=False)
    monkeypatch.setattr(kernels, "int8_matmul", lambda x, w, s: x @ (w.float() * s[:, None] / 127).T, raising=False)
    monkeypatch.delattr(kernels, "fused_moe", raising=False)
    path = nf4_dir
    ref = load_quantized(path, device="cpu", tokenizer=False)
    tri = load_quantized(path, device="cpu", backend="triton", tokenizer=False)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert rel_err(tri(ids), ref(ids)) < 1e-5
    assert (64, 64) in calls and (96, 64) in calls and (64, 96) in calls  # attention, w1/w3, w2


def test_bnb_backend_matches_torch(tmp_path):
    """Rows of whole 64-blocks (intermediate 128): bitsandbytes' CPU kernel misdecodes blocks spanning rows."""
    pytest.importorskip("bitsandbytes")
    path = packed(tmp_path, "nf4", {"intermediate_size": 128})
    ref = load_quantized(path, device="cpu", tokenizer=False)
    bnb = load_quantized(path, device="cpu", backend="bnb", tokenizer=False)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert rel_err(bnb(ids), ref(ids)) < 1e-5


def test_bnb_backend_refuses_rows_of_partial_blocks_on_the_cpu(nf4_dir):
    """nf4_dir's w2 is [64, 96]: its 64-blocks span rows, which bitsandbytes' CPU kernel decodes wrongly."""
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match=r"w1/w3/w2: backend 'bnb' on the CPU needs rows that are whole 64-blocks.*\(64, 96\).*backend='torch'"):
        load_quantized(nf4_dir, device="cpu", backend="bnb", tokenizer=False)


def test_max_memory_accepted(nf4_dir):
    """Size strings and ints parse to exact bytes; budgets far above the model keep every expert resident and
    the model holds exactly what a load without a budget holds."""
    plain = tracked_bytes(load_quantized(nf4_dir, device="cpu", tokenizer=False))
    for mm, want in (("16GiB", 2**34), (2**34, 2**34), ("500MB", 500 * 10**6)):
        model = load_quantized(nf4_dir, device="cpu", max_memory=mm, tokenizer=False)
        assert model.max_memory == want
        p = model.expert_placement
        assert p.budget == want and p.slots == [p.num_experts] * model.config.num_hidden_layers
        assert model.offload_stats().get("slots") is None and tracked_bytes(model) == plain


# ---- bad inputs ----------------------------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nope.*no such directory"):
        load_quantized(str(tmp_path / "nope"), device="cpu")


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(backend="cuda-magic"), r"unknown backend 'cuda-magic': choose one of auto, torch, triton, bnb"),
        (dict(max_memory="lots"), r"max_memory 'lots' not understood: write it like 16GiB"),
        (dict(max_memory=-5), r"max_memory -5 must be a positive size"),
        (dict(max_memory=1.5), r"max_memory 1.5: give bytes as an int or a size like '16GiB'"),
        (dict(dtype="int4"), r"dtype 'int4' not supported: choose float32, bfloat16 or float16"),
        (dict(device="tpu"), r"device 'tpu'"),
    ],
)
def test_bad_arguments(nf4_dir, kw, msg):
    kw.setdefault("device", "cpu")
    with pytest.raises(ValueError, match=msg):
        load_quantized(nf4_dir, **kw)


def drop_tensor(path: str, name: str) -> None:
    """Remove one tensor from its shard and from the index, as a broken or hand-edited checkpoint would."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    with open(index_file) as f:
        index = json.load(f)
    shard = os.path.join(path, index["weight_map"].pop(name))
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    with open(index_file, "w") as f:
        json.dump(index, f)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.1.self_attn.k_proj.weight.absmax",
        "model.layers.0.block_sparse_moe.experts.3.w2.weight",
        "model.layers.1.block_sparse_moe.experts.5.w1.weight.nested_absmax",
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.norm.weight",
        "lm_head.weight",
    ],
)
def test_checkpoint_missing_a_tensor(tmp_path, nf4_dir, name):
    path = str(tmp_path / "broken")
    shutil.copytree(nf4_dir, path)
    # the quantizer writes several shards only for big models: force an index by re-sharding
    reshard(path)
    drop_tensor(path, name)
    with pytest.raises(CheckpointError) as e:
        load_quantized(path, device="cpu", tokenizer=False)
    msg = str(e.value)
    assert path in msg and "re-" in msg and "\n" not in msg
    stem = name.split(".weight")[0]
    assert stem in msg or name.rsplit(".", 1)[-1] in msg


def reshard(path: str) -> None:
    """Rewrite the checkpoint as three shards with an index (the quantizer keeps tiny models in one file)."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        return
    single = os.path.join(path, "model.safetensors")
    tensors = load_file(single)
    os.remove(single)
    names = sorted(tensors)
    weight_map = {}
    for s in range(3):
        part = names[s::3]
        fname = f"model-{s + 1:05d}-of-00003.safetensors"
        save_file({k: tensors[k] for k in part}, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    with open(index_file, "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def test_plain_bf16_hub_checkpoint_loads(tmp_path):
    """A checkpoint nothing was quantized in (the bf16 reference) loads as is."""
    src = write_checkpoint(tmp_path / "src", SMALL)
    model = load_quantized(src, device="cpu", tokenizer=False)
    ref = oracle(src, tmp_path)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert rel_err(model(ids), ref(ids).logits) < RTOL


def nf4_decode_by_element(d: dict) -> torch.Tensor:
    """bitsandbytes' NF4 decode written out element by element (fp32, as its kernels): the oracle of the one
    vectorised decoder (formats.decode_nf4) that QuantLinear and dequantize_tensor share."""
    from mixtral_quant.formats import unpack_quant_state

    meta = unpack_quant_state(d["weight." + QUANT_STATE_KEY])
    n = meta["shape"][0] * meta["shape"][1]
    packed = d["weight"].reshape(-1).long()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n]
    absmax = d["weight.absmax"]
    if "nested_offset" in meta:
        nested = d["weight.nested_absmax"].repeat_interleave(meta["nested_blocksize"])[: absmax.numel()]
        absmax = d["weight.nested_quant_map"][absmax.long()] * nested + torch.tensor(meta["nested_offset"])
    w = d["weight.quant_map"][codes] * absmax.float().repeat_interleave(meta["blocksize"])[:n]
    return w.view(meta["shape"])


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 64), (512, 512), (5, 24)])  # nested blocks short / whole; a short block
def test_quantlinear_decode_equals_formats(shape, double_quant):
    """QuantLinear's vectorised decode (stacks, selections, views, custom maps) and formats.dequantize_tensor vs an
    element-by-element decode."""
    from mixtral_quant.formats import quantize_tensor
    from mixtral_quant.linear import QuantLinear

    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(*shape, generator=g).to(torch.bfloat16) for _ in range(6)]
    parts = [quantize_tensor(w, "nf4", 64, double_quant) for w in ws]
    custom = dict(parts[4])
    custom["weight.quant_map"] = custom["weight.quant_map"] * 0.9  # a non-standard table takes the general path
    parts[4] = custom
    want = torch.stack([nf4_decode_by_element(p) for p in parts]).view(3, 2, *shape)
    assert all(torch.equal(dequantize_tensor(p, torch.float32), want.view(6, *shape)[i]) for i, p in enumerate(parts))
    if shape[0] * shape[1] % 64:  # a short last block: formats only (QuantLinear holds kernel-shaped weights)
        return
    stack = QuantLinear.from_tensors(parts, (3, 2))
    assert not stack.standard_maps
    assert torch.equal(stack.dequantize(), want)
    assert torch.equal(stack.dequantize(torch.tensor([2, 0])), want[[2, 0]])
    std = QuantLinear.from_tensors(parts[:4], (2, 2))
    assert std.standard_maps and torch.equal(std.dequantize(1), want[1])
    assert torch.equal(std.narrow_lead(1, 1).dequantize(torch.tensor([1])), want[1:2, 1:2])
    single = QuantLinear.from_tensors(parts[5:], ())
    assert torch.equal(single.dequantize(), want[2, 1])
    x = torch.randn(3, shape[1], generator=g)
    torch.testing.assert_close(single(x), x @ want[2, 1].T, rtol=1e-5, atol=1e-5)


def test_attention_calls_fit_flash_or_memory_efficient_kernels(tmp_path, monkeypatch):
    """Every SDPA call of a resident bf16 model (prompt, decode, left padding, a window inside the prompt) is one
    CUDA's flash kernel (no mask) or memory-efficient kernel (no grouped heads) accepts, not only the math fallback
    that materialises the scores in fp32; and the CPU runs them all with SDPA restricted to flash/efficient.
    The GPU's own verdict is evals/gpu_check.py's attention section."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import mixtral_quant.model as model_mod

    path = packed(tmp_path, "nf4", {"sliding_window": 8, "num_attention_heads": 8, "num_key_value_heads": 2})
    model = load_quantized(path, device="cpu", dtype=torch.bfloat16, tokenizer=False)
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), mask=attn_mask is not None, causal=is_causal,
                          gqa=enable_gqa, dtype=q.dtype))  # fmt: skip
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", recording)
    g = torch.Generator().manual_seed(7)
    ids, mask = left_pad([torch.randint(3, 256, (n,), generator=g).tolist() for n in (6, 4)])
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        out = model.generate(ids[:1], 5, eos=[])  # prompt from position 0: causal, no mask; then decode steps
        padded = model.generate(ids, 5, attention_mask=mask, eos=[])  # a mask: padding
        model.generate(torch.randint(3, 256, (1, 12), generator=g), 2, eos=[])  # the window bites inside the prompt
    kinds = set()
    for c in calls:
        flash = not c["mask"] and c["dtype"] in (torch.bfloat16, torch.float16)
        efficient = not c["gqa"] and c["q"][1] == c["k"][1]
        assert flash or efficient, f"only the math kernel takes {c}"
        kinds.add("causal" if c["causal"] else "decode" if c["q"][2] == 8 // 2 else "masked")
    assert kinds == {"causal", "decode", "masked"}
    assert [c for c in calls if c["causal"]][0]["k"][2] == 6  # a prompt attends over its own keys, not the cache
    # the same tokens as the unrestricted (math-capable) path
    monkeypatch.undo()
    assert torch.equal(out, model.generate(ids[:1], 5, eos=[]))
    assert torch.equal(padded, model.generate(ids, 5, attention_mask=mask, eos=[]))


class _NewStorages(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the storages that ops create while active (views of existing storages not counted)."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.seen = {t.untyped_storage().data_ptr() for t in existing}
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                self.seen.add(t.untyped_storage().data_ptr())
                self.bytes += t.untyped_storage().nbytes()
        return out


@pytest.mark.parametrize("batch,dtype,window", [(1, torch.bfloat16, None), (1, torch.float32, None),
                                                (2, torch.bfloat16, None), (1, torch.bfloat16, 16)])  # fmt: skip
def test_memory_model_counts_what_attention_allocates(batch, dtype, window):
    """memory.attention_workspace_bytes against the storages model.attend creates in a full-context prefill (a
    prompt from position 0; a batch is left-padded; a window shorter than the prompt), plus the boolean mask the
    context holds. On the CPU SDPA runs flash for all of them (its internal blocks aside); the CUDA kernels take
    the same inputs and return the same output and log-sum-exp."""
    import torch.utils._python_dispatch  # noqa: F401

    from mixtral_quant import memory
    from mixtral_quant.config import MixtralConfig
    from mixtral_quant.model import attend

    cfg = MixtralConfig.from_dict({"model_type": "mixtral", **SMALL, "num_attention_heads": 8, "num_key_value_heads": 2,
                                   "hidden_size": 128, "sliding_window": window, "vocab_size": 256})  # fmt: skip
    S, H, K, hd = 64, 8, 2, cfg.head_dim
    g = torch.Generator().manual_seed(9)
    q = torch.randn(batch, H, S, hd, generator=g).to(dtype)
    k, v = (torch.randn(batch, K, S, hd, generator=g).to(dtype) for _ in range(2))
    am = None
    if batch > 1:
        am = torch.ones(batch, S, dtype=torch.long)
        am[1, : S // 3] = 0
    ctx = make_context(cfg, torch.arange(S), kv_len=S, attention_mask=am, dtype=dtype, from_start=True)
    mask_bytes = 0 if ctx.mask is None else ctx.mask.numel()
    with _NewStorages([q, k, v, ctx.cos, ctx.sin] + ([ctx.mask] if ctx.mask is not None else [])) as m:
        y = attend(q, k, v, ctx)
    allocated = m.bytes - y.untyped_storage().nbytes() + mask_bytes
    want = memory.attention_workspace_bytes(cfg, S, batch, dtype)
    assert want <= allocated <= want + 2 * dtype.itemsize, (allocated, want)  # + SDPA's two 0-d fill values
    assert (ctx.mask is None) == (batch == 1 and window is None)
