"""Train the embedded default model `builtin:tiny-mixtral` on the Python standard library's own text.

A small model with Mixtral's exact architecture, trained with transformers' MixtralForCausalLM (the reference
implementation) and exported in the Hugging Face Hub layout (bf16 safetensors, Hub key names) to
mixtral_quant/data/tiny-mixtral/. The defaults reproduce the shipped model; `--help` lists every option.

Data: every `*.py` under `sysconfig.get_paths()["stdlib"]` except test suites, IDLE, site-packages and generated
tables (EXCLUDED_DIRS in this file; the model's README lists them), plus each
topic of `pydoc_data.topics`, one document each. A document is held out when the first 8 bytes of
sha256(its id) taken mod 10000 fall under `--heldout-per-10000`; held-out documents are never trained on, and
`heldout.txt` is the first `--heldout-bytes` of them (in hash order), shipped so every machine evaluates the
same text. The split depends only on the document ids, not on the Python version; the training text does
depend on it (the shipped model was trained on CPython 3.11.7's stdlib, recorded in the README).

    python evals/train_tiny.py                         # the shipped model: 20-45 min on 2 CPU cores
    python evals/train_tiny.py --steps 20 --out /tmp/t  # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy shared CPU, spinning threads that lose their core
# make every parallel region wait (measured 8x slower with 2 threads on a loaded 2-core machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

log = logging.getLogger("train_tiny")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "mixtral_quant" / "data" / "tiny-mixtral"

# Directories whose files are not the library's own prose-and-code: test suites (mostly assertion
# boilerplate), IDLE, third-party packages, generated tables (encodings' charmaps, _sysconfigdata),
# bundled wheels, and pydoc_data (its topics are added as text, not as a Python literal).
EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo",
                 "ensurepip", "encodings", "lib-dynload", "pydoc_data", "__phello__"}
EXCLUDED_PREFIXES = ("config-", "_sysconfigdata")


# ---------------------------------------------------------------------------------------------- data

def stdlib_documents() -> dict[str, str]:
    """Document id -> text: 'stdlib/<relative path>' for each kept source file, 'pydoc/<topic>' for each topic."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in EXCLUDED_DIRS or p.startswith(EXCLUDED_PREFIXES) for p in rel.parts):
            continue
        try:
            docs["stdlib/" + rel.as_posix()] = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:  # a handful of legacy files are not UTF-8
            log.warning("skipping %s: %s", rel, e)
    from pydoc_data.topics import topics

    for name in sorted(topics):
        docs["pydoc/" + name] = topics[name]
    return docs


def doc_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")


def split_documents(docs: dict[str, str], heldout_per_10000: int) -> tuple[list[str], list[str]]:
    """(train ids, held-out ids), each in hash order so the order is the same on every machine."""
    ids = sorted(docs, key=lambda d: (doc_hash(d), d))
    held = [d for d in ids if doc_hash(d) % 10000 < heldout_per_10000]
    return [d for d in ids if doc_hash(d) % 10000 >= heldout_per_10000], held


def heldout_text(docs: dict[str, str], held: list[str], max_bytes: int) -> tuple[str, list[str]]:
    """The held-out documents joined by blank lines, cut at a line boundary to at most max_bytes of UTF-8."""
    out, used, size = [], [], 0
    for d in held:
        text = docs[d].rstrip("\n") + "\n\n"
        n = len(text.encode())
        if size + n > max_bytes:
            lines, part = text.splitlines(keepends=True), []
            for line in lines:
                if size + len(line.encode()) > max_bytes:
                    break
                part.append(line)
                size += len(line.encode())
            if part:
                out.append("".join(part))
                used.append(d + " (prefix)")
            break
        out.append(text)
        used.append(d)
        size += n
    return "".join(out), used


def tokenizer():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v1().instruct_tokenizer.tokenizer  # Mixtral's SentencePiece, 32000 tokens


def token_stream(docs: dict[str, str], ids: list[str], tok) -> torch.Tensor:
    """All documents as one stream: <s> doc </s> <s> doc </s> ..."""
    out = []
    for d in ids:
        out.extend(tok.encode(docs[d], True, True))
    return torch.tensor(out, dtype=torch.long)


def windows(stream: torch.Tensor, context: int) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, context]; the tail shorter than a window is dropped."""
    n = stream.numel() // context
    return stream[: n * context].view(n, context)


# --------------------------------------------------------------------------------------------- model

def model_config(args):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=32000, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=args.max_position_embeddings, sliding_window=args.sliding_window,
        rope_theta=args.rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=False,
        router_aux_loss_coef=args.aux_loss_coef, output_router_logits=False, bos_token_id=1,
        eos_token_id=2, initializer_range=0.02,
    )  # fmt: skip


@torch.no_grad()
def evaluate(model, wins: torch.Tensor, batch: int = 16) -> dict:
    """Mean next-token NLL over every predicted position of each window, and top-2 expert counts per layer."""
    model.eval()
    nll, n = 0.0, 0
    counts = None
    for i in range(0, len(wins), batch):
        x = wins[i:i + batch]
        out = model(input_ids=x, output_router_logits=True)
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        nll -= logp.gather(-1, x[:, 1:, None]).sum().item()
        n += x[:, 1:].numel()
        layer_counts = [torch.bincount(rl.topk(2, dim=-1).indices.flatten(), minlength=rl.shape[-1])
                        for rl in out.router_logits]  # each rl: [tokens, experts]
        c = torch.stack(layer_counts)  # [layers, experts]
        counts = c if counts is None else counts + c
    model.train()
    loss = nll / n
    return {"loss": loss, "ppl": math.exp(loss), "tokens": n, "expert_counts": counts.tolist()}


def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def hub_state_dict(model, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """transformers 5.x keeps experts fused (gate_up_proj [E, 2F, D], down_proj [E, D, F]); the Hub layout has
    one tensor per expert and projection: w1 = gate (first half of gate_up), w3 = up (second half), w2 = down."""
    sd = {}
    for name, t in model.state_dict().items():
        t = t.detach().to(dtype)
        if ".mlp.experts.gate_up_proj" in name:
            p = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts.")
            F = t.shape[1] // 2
            for e in range(t.shape[0]):
                sd[f"{p}{e}.w1.weight"] = t[e, :F].clone()
                sd[f"{p}{e}.w3.weight"] = t[e, F:].clone()
        elif ".mlp.experts.down_proj" in name:
            p = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts.")
            for e in range(t.shape[0]):
                sd[f"{p}{e}.w2.weight"] = t[e].clone()
        elif ".mlp.gate.weight" in name:
            sd[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t.clone()
        else:
            sd[name] = t.clone()
    return sd


def export(model, out: Path):
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = hub_state_dict(model)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes 0600; package data must be world-readable
    conf = model.config.to_dict()
    conf["dtype"] = "bfloat16"
    conf["architectures"] = ["MixtralForCausalLM"]
    # keep the model's keys; drop transformers' generic bookkeeping (labels, output switches, versions)
    for k in ("output_router_logits", "transformers_version", "use_cache", "_name_or_path", "id2label", "label2id",
              "problem_type", "chunk_size_feed_forward", "output_attentions", "output_hidden_states", "return_dict",
              "is_encoder_decoder"):
        conf.pop(k, None)
    conf["rope_theta"] = conf["rope_parameters"]["rope_theta"]  # transformers 4.x reads it at the top level
    with open(out / "config.json", "w") as f:
        json.dump(conf, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(out / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, f, indent=2)
        f.write("\n")
    return sd


def check_export(model, out: Path, wins: torch.Tensor) -> float:
    """Reload the exported folder with transformers and compare logits with the trained model cast to bf16 and back."""
    from transformers import MixtralForCausalLM

    ref = MixtralForCausalLM(model.config)
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    ref.eval()
    loaded = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        a = ref(input_ids=wins[:2]).logits
        b = loaded(input_ids=wins[:2]).logits
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # keep the docstring's layout and show every default

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    a = p.add_argument
    a("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    a("--seed", type=int, default=0, help="seeds the initialisation and the batch order")
    a("--steps", type=int, default=600, help="optimizer steps")
    a("--batch-size", type=int, default=8, help="windows per step")
    a("--context", type=int, default=256, help="training window in tokens (longer than the sliding window)")
    a("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    a("--warmup", type=int, default=60, help="linear warmup steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (not norms)")
    a("--grad-clip", type=float, default=1.0)
    a("--aux-loss-coef", type=float, default=0.05,
      help="weight of the per-layer router load-balancing loss (mean over layers; keeps every expert used)")
    a("--hidden-size", type=int, default=64)
    a("--intermediate-size", type=int, default=128, help="per expert")
    a("--layers", type=int, default=4)
    a("--heads", type=int, default=4)
    a("--kv-heads", type=int, default=2)
    a("--sliding-window", type=int, default=64)
    a("--rope-theta", type=float, default=1e6)
    a("--max-position-embeddings", type=int, default=1024)
    a("--heldout-per-10000", type=int, default=150, help="documents held out, per 10000 (by hash of the id)")
    a("--heldout-bytes", type=int, default=96_000, help="size cap of heldout.txt")
    a("--eval-every", type=int, default=150, help="steps between held-out evaluations")
    a("--eval-windows", type=int, default=24, help="held-out windows per intermediate evaluation")
    a("--threads", type=int, default=2, help="torch CPU threads (results differ in the last bits with the count)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    t0 = time.time()
    docs = stdlib_documents()
    train_ids, held_ids = split_documents(docs, args.heldout_per_10000)
    text, used = heldout_text(docs, held_ids, args.heldout_bytes)
    tok = tokenizer()
    train = windows(token_stream(docs, train_ids, tok), args.context)
    held = windows(torch.tensor(tok.encode(text, True, False)), args.context)  # the evaluation protocol of `mixq eval`
    log.info("%d documents: %d train (%d windows of %d = %.2fM tokens), %d held out "
             "(heldout.txt %d bytes, %d windows) in %.0fs",
             len(docs), len(train_ids), len(train), args.context, train.numel() / 1e6, len(held_ids),
             len(text.encode()), len(held), time.time() - t0)

    cfg = model_config(args)
    model = MixtralForCausalLM(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    untrained = evaluate(model, held)
    log.info("params %.2fM; untrained held-out loss %.3f ppl %.0f", n_params / 1e6, untrained["loss"], untrained["ppl"])

    # Tokens that never occur in the training text all share one output row (`other`): their logits are
    # identical, so the full 32000-way softmax equals a softmax over the seen tokens plus one logit
    # h.other + log(#unseen). Training computes that smaller softmax (14.7k instead of 32k columns, about
    # 2x faster on a CPU, where lm_head dominates) and the export writes `other` into every unseen row:
    # the shipped model's full-vocabulary distribution is exactly the one trained.
    seen = torch.unique(train.flatten())
    unseen = torch.ones(cfg.vocab_size, dtype=torch.bool)
    unseen[seen] = False
    label_of = torch.full((cfg.vocab_size,), -1, dtype=torch.long)
    label_of[seen] = torch.arange(len(seen))
    other = torch.nn.Parameter(torch.randn(cfg.hidden_size) * cfg.initializer_range)
    log_unseen = math.log(int(unseen.sum()))
    log.info("%d distinct tokens in the training text; %d unseen share one output row", len(seen), int(unseen.sum()))

    def sync_unseen_rows():
        with torch.no_grad():
            model.lm_head.weight[unseen] = other.detach()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2] + [other]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    order, pos, epoch = torch.randperm(len(train), generator=g), 0, 0
    history = []
    t_train = time.time()
    for step in range(args.steps):
        if pos + args.batch_size > len(order):  # a new epoch: fresh permutation from the same generator
            order, pos, epoch = torch.randperm(len(train), generator=g), 0, epoch + 1
        x = train[order[pos:pos + args.batch_size]]
        pos += args.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        out = model.model(input_ids=x, output_router_logits=True)
        h = out.last_hidden_state[:, :-1].reshape(-1, cfg.hidden_size)  # [B*(T-1), D]
        logits = torch.cat([h @ model.lm_head.weight[seen].T, (h @ other + log_unseen)[:, None]], dim=1)
        ce = torch.nn.functional.cross_entropy(logits, label_of[x[:, 1:].reshape(-1)])
        # Balance each layer on its own: transformers' loss pools the counts of all layers, so layers that
        # favour different experts cancel out and single layers collapse onto a few experts unpenalised.
        aux = sum(load_balancing_loss_func((rl,), cfg.num_local_experts, cfg.num_experts_per_tok)
                  for rl in out.router_logits) / len(out.router_logits)
        loss = ce + args.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + [other], args.grad_clip)
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            tps = (step + 1) * x.numel() / el
            log.info("step %d/%d epoch %d lr %.2e loss %.3f aux %.3f | %.0f tok/s, %.0fs elapsed, eta %.0fs",
                     step, args.steps, epoch, lr_at(step, args), ce.item(), aux.item(), tps, el,
                     el / (step + 1) * (args.steps - step - 1))
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            sync_unseen_rows()
            ev = evaluate(model, held[: args.eval_windows])
            history.append({"step": step + 1, "heldout_loss": ev["loss"]})
            log.info("eval step %d: held-out loss %.3f ppl %.2f (first %d windows)", step + 1, ev["loss"], ev["ppl"],
                     args.eval_windows)
    sync_unseen_rows()
    train_seconds = time.time() - t_train

    # Final numbers on the bf16-rounded weights, i.e. the model as shipped.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    final_held = evaluate(model, held)
    gtrain = torch.Generator().manual_seed(args.seed + 1)
    final_train = evaluate(model, train[torch.randperm(len(train), generator=gtrain)[: len(held)]])
    log.info("final (bf16 weights): held-out loss %.3f ppl %.2f; train-sample loss %.3f ppl %.2f",
             final_held["loss"], final_held["ppl"], final_train["loss"], final_train["ppl"])

    args.out.mkdir(parents=True, exist_ok=True)
    export(model, args.out)
    (args.out / "heldout.txt").write_text(text, encoding="utf-8")
    err = check_export(model, args.out, held)
    log.info("export check: max |logit difference| after reload = %.3g", err)
    if err > 1e-4:
        raise SystemExit(f"exported model does not reproduce the trained one (max logit diff {err})")

    summary = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "documents": len(docs), "train_documents": len(train_ids), "heldout_documents": len(held_ids),
        "heldout_txt_documents": used, "heldout_txt_bytes": len(text.encode()),
        "train_tokens": train.numel(), "tokens_seen": args.steps * args.batch_size * args.context,
        "params": n_params, "distinct_train_tokens": len(seen), "train_seconds": round(train_seconds),
        "untrained": {"heldout_loss": untrained["loss"], "heldout_ppl": untrained["ppl"]},
        "final": {"heldout_loss": final_held["loss"], "heldout_ppl": final_held["ppl"],
                  "heldout_tokens": final_held["tokens"],
                  "train_loss": final_train["loss"], "train_ppl": final_train["ppl"]},
        "expert_share_per_layer": [[round(c / sum(row), 4) for c in row] for row in final_held["expert_counts"]],
        "history": history, "export_max_logit_diff": err,
    }  # fmt: skip
    with open(args.out / "training.json", "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    for i, row in enumerate(summary["expert_share_per_layer"]):
        log.info("layer %d expert share (held-out, top-2 picks): %s", i, " ".join(f"{s:.3f}" for s in row))
    log.info("wrote %s (%.1f MB)", args.out, sum(f.stat().st_size for f in args.out.iterdir()) / 1e6)


if __name__ == "__main__":
    main()
