"""Make the bitsandbytes test fixtures (tests/fixtures/bnb/) the way the Hub's Mixtral bnb checkpoints were made.

Run ONCE in a separate virtualenv with transformers 4.x (the fixtures are committed; the test suite never runs this):

    python3 -m venv /tmp/venv-tf457 && . /tmp/venv-tf457/bin/activate
    pip install torch==2.13.0 transformers==4.57.6 bitsandbytes==0.50.2 accelerate safetensors
    python evals/make_bnb_fixtures.py --mixq-python .venv/bin/python --out tests/fixtures/bnb \
        --results evals/results/bnb_fixtures.txt

What it does (CPU only, fixed seeds):
1. A tiny random Mixtral (real Mixtral config keys, hidden 64, 2 layers, 4 experts, vocab 512, rope_theta 1e6) saved
   in bf16 by transformers (`source/`).
2. That checkpoint loaded with BitsAndBytesConfig as nf4 + double quant (`nf4-dq/`), nf4 without double quant
   (`nf4/`, saved in shards), 8-bit (`int8/`) and fp4 (`fp4/`), each `save_pretrained`ed: the router
   (block_sparse_moe.gate, an nn.Linear in 4.x) is quantized like the experts, as on the Hub.
3. Each saved checkpoint reloaded by transformers in fp32 (quantized linears stay quantized, the rest is upcast):
   the logits on fixed ids and 8 greedy tokens go to `reference.safetensors` in its directory. For int8 also the
   logits with every int8 weight dequantized first (`logits_dequant`): bitsandbytes' LLM.int8 matmul quantizes the
   activations to int8 too, so the two differ, and that difference is the tolerance our (dequantize-then-matmul)
   logits are held to.
4. `mixq quantize` (run with --mixq-python, the interpreter of the mixtral-quant venv) on the source: nf4, int8,
   bf16 attention + nf4 experts, and int8 attention + nf4 experts (which transformers must refuse): the output is
   loaded by this transformers and its logits compared with mixtral-quant's own; the differences go to
   `ours.json` and the results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import torch

SEED = 0
CONFIG = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False, bos_token_id=1,
    eos_token_id=2, initializer_range=0.2,  # larger than 0.02 so the logits have margins (greedy is stable)
)  # fmt: skip
GREEDY_TOKENS = 8

# name -> BitsAndBytesConfig kwargs, save_pretrained kwargs
VARIANTS = {
    "nf4-dq": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16), {}),
    "nf4": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                 bnb_4bit_compute_dtype=torch.bfloat16), dict(max_shard_size="200KB")),
    "int8": (dict(load_in_8bit=True), {}),
    "fp4": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16), {}),
}  # fmt: skip

# Run inside the mixtral-quant venv: our logits on the same ids (fp32, CPU).
OURS = """
import sys, torch
from safetensors.torch import load_file, save_file
from mixtral_quant import load_quantized
ids = load_file(sys.argv[2])["input_ids"]
m = load_quantized(sys.argv[1], device="cpu", dtype="float32", tokenizer=False)
with torch.no_grad():
    save_file({"logits": m(ids).float().contiguous()}, sys.argv[3])
"""


def fixed_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(3, CONFIG["vocab_size"], (2, 12), generator=g)
    ids[:, 0] = CONFIG["bos_token_id"]
    return ids


def reference(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        logits = model(ids).logits.float()
        greedy = model.generate(ids[:1], max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False,
                                pad_token_id=0)[0, ids.shape[1]:]  # fmt: skip
    top2 = logits.topk(2, dim=-1).values
    return {"input_ids": ids, "logits": logits.contiguous(), "greedy": greedy.contiguous(),
            "min_top2_margin": (top2[..., 0] - top2[..., 1]).min().reshape(1)}


def load_fp32(path: str):
    """The checkpoint in transformers, non-quantized parts in fp32. bitsandbytes 0.50.2's AVX512-BF16 CPU path
    (Linear4bit repacks its weight at the first eval-mode forward) asserts out_features % 32 == 0, which the router
    (E = 4 here, 8 in Mixtral-8x7B) fails ("N must be divisible by block_n"): it is switched off, so every Linear4bit
    takes bitsandbytes' generic dequantize-then-matmul path, the arithmetic of its GPU kernels. (LLM.int8 casts its
    inputs to fp16 whatever is set: that is the int8 tolerance, see reference().)"""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, device_map="cpu").eval()
    for mod in m.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
            # bnb_4bit_compute_dtype (bfloat16 in these configs) would round every matmul input to bf16: the
            # reference is computed in fp32, like ours (the quantized bytes are unchanged)
            mod.compute_dtype, mod.compute_type_is_set = torch.float32, True
    return m


def dequantized_int8(model):
    """Replace every Linear8bitLt by an fp32 nn.Linear holding its dequantized weight (CB * SCB / 127)."""
    import bitsandbytes as bnb

    for name, mod in list(model.named_modules()):
        if isinstance(mod, bnb.nn.Linear8bitLt):
            scb = mod.weight.SCB if mod.weight.SCB is not None else mod.state.SCB  # moved to .state by a forward
            W = mod.weight.data.float() * (scb.float()[:, None] / 127.0)
            lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
            lin.weight = torch.nn.Parameter(W, requires_grad=False)
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], lin)
    return model


def module_kinds(model) -> dict[str, str]:
    """Class name -> count of the linear modules, to report what transformers made of a checkpoint."""
    out: dict[str, int] = {}
    for _, m in model.named_modules():
        if "Linear" in type(m).__name__:
            out[type(m).__name__] = out.get(type(m).__name__, 0) + 1
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import BitsAndBytesConfig, MixtralConfig, MixtralForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/bnb")
    ap.add_argument("--mixq-python", help="python of the mixtral-quant venv (for `mixq quantize` and our logits)")
    ap.add_argument("--results", default="evals/results/bnb_fixtures.txt")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16", once per matmul
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"machine: {platform.machine()}, nproc {os.cpu_count()}",
             f"command: python {' '.join(sys.argv)}",
             f"transformers {transformers.__version__}, torch {torch.__version__}, "
             f"bitsandbytes {__import__('bitsandbytes').__version__}", ""]  # fmt: skip

    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    src = os.path.join(args.out, "source")
    model = MixtralForCausalLM(MixtralConfig(**CONFIG)).to(torch.bfloat16)
    model.save_pretrained(src, safe_serialization=True)
    ids = fixed_ids()
    save_file(reference(load_fp32(src), ids), os.path.join(src, "reference.safetensors"))
    del model

    for name, (qkw, skw) in VARIANTS.items():
        d = os.path.join(args.out, name)
        q = MixtralForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(**qkw),
                                               torch_dtype=torch.bfloat16, device_map="cpu")  # fmt: skip
        q.save_pretrained(d, safe_serialization=True, **skw)
        del q
        m = load_fp32(d)
        ref = reference(m, ids)
        lines.append(f"{name}: saved; reloaded by transformers as {module_kinds(m)}; min top-2 logit margin "
                     f"{float(ref['min_top2_margin']):.3f}")  # fmt: skip
        if name == "int8":
            deq = reference(dequantized_int8(m), ids)
            ref["logits_dequant"], ref["greedy_dequant"] = deq["logits"], deq["greedy"]
            gap = rel(ref["logits"], ref["logits_dequant"])
            agree = float((ref["logits"].argmax(-1) == ref["logits_dequant"].argmax(-1)).float().mean())
            same = int((ref["greedy"] == ref["greedy_dequant"]).sum())
            lines.append(f"int8: LLM.int8 matmul vs dequantize-then-matmul: max |diff| / max |logit| = {gap:.3e}, "
                         f"top-1 agreement {agree:.3f}, greedy tokens equal {same} of {GREEDY_TOKENS}")  # fmt: skip
        save_file(ref, os.path.join(d, "reference.safetensors"))
        del m

    if args.mixq_python:
        ours = {}
        with tempfile.TemporaryDirectory() as tmp:
            ids_file = os.path.join(tmp, "ids.safetensors")
            save_file({"input_ids": ids}, ids_file)
            recipes = {"nf4": ["--format", "nf4"], "int8": ["--format", "int8"],
                       "bf16-attention": ["--attention", "bf16", "--experts", "nf4"],
                       "mixed": ["--attention", "int8", "--experts", "nf4"]}  # fmt: skip
            for fmt, flags in recipes.items():
                out = os.path.join(tmp, f"ours-{fmt}")
                subprocess.run([args.mixq_python, "-c", "from mixtral_quant.cli.main import main; main()", "quantize",
                                src, "-o", out, *flags], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
                subprocess.run([args.mixq_python, "-c", OURS, out, ids_file, os.path.join(tmp, "l.safetensors")],
                               check=True)  # fmt: skip
                mine = load_file(os.path.join(tmp, "l.safetensors"))["logits"]
                with open(os.path.join(out, "config.json")) as f:
                    qc = json.load(f)["quantization_config"]
                try:
                    m = load_fp32(out)
                except Exception as e:  # noqa: BLE001 - what transformers does with our output is the measurement
                    ours[fmt] = {"loaded": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    lines.append(f"ours {fmt}: transformers refused it: {ours[fmt]['error']}")
                    continue
                with torch.no_grad():
                    theirs = m(ids).logits.float()
                ours[fmt] = {"loaded": True, "modules": module_kinds(m), "quantization_config": qc,
                             "max_rel_diff": rel(mine, theirs),
                             "top1_agreement": float((mine.argmax(-1) == theirs.argmax(-1)).float().mean())}
                if fmt == "int8":
                    m = dequantized_int8(m)
                    with torch.no_grad():
                        ours[fmt]["max_rel_diff_dequant"] = rel(mine, m(ids).logits.float())
                lines.append(f"ours {fmt}: transformers loaded it as {ours[fmt]['modules']}; our logits vs its: max "
                             f"|diff| / max |logit| = {ours[fmt]['max_rel_diff']:.3e}, top-1 agreement "
                             f"{ours[fmt]['top1_agreement']:.3f}"
                             + (f"; vs its logits with dequantized int8 weights {ours[fmt]['max_rel_diff_dequant']:.3e}"
                                if fmt == "int8" else ""))  # fmt: skip
        with open(os.path.join(args.out, "ours.json"), "w") as f:
            json.dump(ours, f, indent=2)
            f.write("\n")

    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.out) for f in fs)
    lines.append(f"fixtures: {total / 1e6:.2f} MB in {args.out}")
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    with open(args.results, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
