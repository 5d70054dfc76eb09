"""What the installed transformers (5.x in the project's venv) does with `mixq quantize` output and with the
transformers-4.57 bitsandbytes fixtures: loads them correctly, refuses them, or loads them silently wrong.

    python evals/bnb_transformers5.py --out evals/results/bnb_transformers5.txt

For each checkpoint: `AutoModelForCausalLM.from_pretrained(dir, dtype=float32, device_map="cpu")`, then logits on
the fixtures' fixed ids compared with mixtral-quant's own on the same directory (fp32, CPU). "correct" means
max |diff| / max |logit| <= 1e-3 and the same argmax everywhere; an exception at load or at the first forward is
"fails loudly"; anything else is "SILENTLY WRONG".
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import tempfile

import torch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "bnb")


def ours(path: str, ids: torch.Tensor) -> torch.Tensor:
    from mixtral_quant import load_quantized

    m = load_quantized(path, device="cpu", dtype="float32", tokenizer=False)
    with torch.no_grad():
        return m(ids).float()


def transformers_verdict(path: str, ids: torch.Tensor, mine: torch.Tensor) -> dict:
    """{"verdict": correct | fails loudly | SILENTLY WRONG, "detail": ...} for transformers on `path`."""
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()
    except Exception as e:  # noqa: BLE001 - refusing is one of the outcomes measured
        return {"verdict": "fails loudly", "detail": f"at load: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    try:
        with torch.no_grad():
            theirs = m(ids).logits.float()
    except Exception as e:  # noqa: BLE001
        return {"verdict": "fails loudly",
                "detail": f"at the first forward: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}  # fmt: skip
    diff = float((theirs - mine).abs().max() / mine.abs().max())
    top1 = float((theirs.argmax(-1) == mine.argmax(-1)).float().mean())
    verdict = "correct" if diff <= 1e-3 and top1 == 1.0 else "SILENTLY WRONG"
    return {"verdict": verdict, "detail": f"max |diff| / max |logit| {diff:.2e}, top-1 agreement {top1:.3f}"}


def main() -> None:
    import transformers
    from safetensors.torch import load_file

    from mixtral_quant.quantize import quantize

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="evals/results/bnb_transformers5.txt")
    args = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    ids = load_file(os.path.join(FIXTURES, "source", "reference.safetensors"))["input_ids"]
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"machine: {platform.machine()}, nproc {os.cpu_count()}", f"command: python {' '.join(sys.argv)}",
             f"transformers {transformers.__version__}, torch {torch.__version__}", ""]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        for name, kw in {"nf4": dict(fmt="nf4"), "nf4, no double quant": dict(fmt="nf4", double_quant=False),
                         "int8": dict(fmt="int8"), "attention int8 + experts nf4": dict(attention="int8", experts="nf4"),
                         "attention bf16 + experts nf4": dict(attention="bf16", experts="nf4")}.items():  # fmt: skip
            out = os.path.join(tmp, name.replace(" ", "_").replace(",", "").replace("+", ""))
            quantize(os.path.join(FIXTURES, "source"), out, device="cpu", progress=False, **kw)
            cases.append((f"mixq quantize ({name})", out))
        for fx in ("nf4-dq", "nf4", "int8"):
            cases.append((f"transformers 4.57 bitsandbytes fixture {fx}", os.path.join(FIXTURES, fx)))
        for label, path in cases:
            v = transformers_verdict(path, ids, ours(path, ids))
            lines.append(f"{label}: {v['verdict']} ({v['detail']})")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
