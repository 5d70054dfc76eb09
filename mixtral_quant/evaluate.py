"""Accuracy of a quantized checkpoint against a reference: perplexity, KL(reference || quantized), top-1 agreement.
Both models stream layer by layer (one decoder layer's weights in memory at a time), so the 93 GB bf16 Mixtral fits.

Protocol (the same for both models): the whole text is tokenized once with BOS prepended (and cut to `max_tokens`),
then cut into consecutive non-overlapping windows of `context` tokens; a last partial window is dropped (its tokens
are not evaluated, the count is reported). Each window is evaluated on its own, from position 0. Perplexity =
exp(mean negative log-likelihood over every predicted token: positions 1..context-1 of each window, predicted from
positions 0..context-2). KL and top-1 agreement are over the same predictions, exactly, over the full vocabulary.

Memory: the hidden states of the whole evaluation [windows, context, D] per model, one layer's weights, the
embeddings (at the start), the final norm + lm_head of both models (at the end) and one chunk of log-probabilities.
Precision: layers in the compute dtype, lm_head in fp32 and log-softmax/KL in fp64, so small KLs are not rounding.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import CheckpointReader, builtin_dir, resolve_source
from .formats import dequantize_tensor
from .linear import resolve_backend
from .devices import resolve_device, tracked_bytes
from .loader import load_block, resolve_dtype
from .model import RMSNorm, make_context

log = logging.getLogger(__name__)

# Legend: N windows, S context (tokens per window), D hidden, V vocabulary, C tokens in one log-prob chunk.

# Named datasets: name -> (datasets.load_dataset path, config, split, text column). Rows are joined by "\n\n",
# the usual recipe for WikiText perplexity.
DATASETS = {"wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text")}
DEFAULT_TEXT = ("tiny-mixtral", "heldout.txt")  # the embedded model's held-out text (builtin dir, file)
HELDOUT_NAME = "heldout.txt"
DEFAULT_CONTEXT = 2048  # or the model's max_position_embeddings when smaller
# Bytes per token and vocabulary entry held while scoring one chunk: two fp64 log-prob rows, the fp64 KL terms,
# and one fp32 logits row alive while its log-probs are computed.
CHUNK_BYTES_PER_LOGIT = 8 * 3 + 4
# The per-layer tensor classes that the quantizer converts (recipe classes attention and experts).
WEIGHT_CLASSES = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the input and the fix."""


# ---- text and windows -----------------------------------------------------------------------------------------

def load_text(text_file: str | None = None, dataset: str | None = None,
              reference_dir: str | None = None) -> tuple[str, str]:  # fmt: skip
    """(text, where it came from): a UTF-8 file, a named dataset (DATASETS, through the `datasets` library), or by
    default `heldout.txt` beside the reference checkpoint, else the embedded model's held-out text."""
    if text_file is not None and dataset is not None:
        raise EvalError("pass either --text FILE or --dataset NAME, not both")
    if dataset is not None:
        return _load_dataset(dataset), f"dataset {dataset}"
    if text_file is None:
        beside = os.path.join(reference_dir, HELDOUT_NAME) if reference_dir else None
        text_file = beside if beside and os.path.isfile(beside) else _default_text_file()
    if not os.path.isfile(text_file):
        raise EvalError(f"{text_file}: no such text file; pass a UTF-8 text file with --text")
    try:
        with open(text_file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise EvalError(f"{text_file}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise EvalError(f"{text_file}: the text is empty; pass a file with text to evaluate on")
    return text, text_file


def _default_text_file() -> str:
    name, file = DEFAULT_TEXT
    try:
        return os.path.join(builtin_dir(name), file)
    except ValueError:
        raise EvalError(f"no text given and the embedded model's {file} is not installed; pass --text FILE") from None


def check_dataset(name: str):
    """The `datasets` module for a known dataset name, or an EvalError saying how to get it (checked up front)."""
    if name not in DATASETS:
        raise EvalError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or pass --text FILE")
    try:
        import datasets
    except ImportError:
        raise EvalError(f"--dataset {name} needs the datasets library: pip install 'mixtral-quant[datasets]' "
                        "(or pass any UTF-8 file with --text FILE)") from None  # fmt: skip
    return datasets


def _load_dataset(name: str) -> str:
    datasets = check_dataset(name)
    path, config, split, column = DATASETS[name]
    try:
        rows = datasets.load_dataset(path, config, split=split)[column]
    except Exception as e:  # network, hub and cache errors come in many classes
        raise EvalError(f"--dataset {name}: could not load {path} {config} ({type(e).__name__}: {e}); check the "
                        "network or the datasets cache, or pass the text with --text FILE") from None  # fmt: skip
    return "\n\n".join(rows)


def encode_text(text: str, checkpoint_dir: str) -> list[int]:
    """Token ids of the whole text, BOS first, with the checkpoint's tokenizer (Mixtral's by default)."""
    from .tokenizer import Tokenizer

    return Tokenizer.from_checkpoint(checkpoint_dir).encode(text, bos=True)


def check_window_args(context: int | None, max_tokens: int | None = None) -> None:
    """--context must leave one token to predict; --max-tokens must hold at least that."""
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 2):
        raise EvalError(f"context {context!r}: a window needs at least 2 tokens (one to predict); "
                        "use --context 2 or more")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
        raise EvalError(f"max_tokens {max_tokens!r}: give at least 2 tokens, or leave --max-tokens out")


def token_windows(ids: Sequence[int] | Tensor, context: int, max_tokens: int | None = None) -> Tensor:
    """Consecutive non-overlapping windows [N, S=context] of the first `max_tokens` ids; a partial tail is dropped."""
    check_window_args(context, max_tokens)
    if context is None:
        raise EvalError("give the window length (context) in tokens")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // context
    if n == 0:
        raise EvalError(f"the text has {ids.numel()} tokens, fewer than one window of --context {context}; "
                        "lower --context or give a longer text")  # fmt: skip
    if ids.numel() > n * context:
        log.info("last %d tokens (a partial window) not evaluated", ids.numel() - n * context)
    return ids[: n * context].view(n, context).clone()


# ---- results ----------------------------------------------------------------------------------------------------

@dataclass
class ModelScore:
    path: str
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)


@dataclass
class EvalResult:
    quantized: ModelScore
    reference: ModelScore
    kld_mean: float  # mean over predicted tokens of KL(reference || quantized), nats
    kld_p99: float
    top1_agreement: float  # fraction of predictions where both models' most likely token is the same
    tokens: int  # predicted tokens: windows * (context - 1)
    windows: int
    context: int
    layer_drift: list[float]  # relative L2 of quantized vs reference hidden states after each layer
    weight_error: dict[str, list[float]] | None = None  # class -> per-layer ||W - deq(W_q)|| / ||W|| (or None)
    peak_tracked_bytes: int = 0  # largest total of the tensors the evaluator held at once
    extra: dict = field(default_factory=dict)  # text source, dropped tokens (filled by callers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


class ByteLedger:
    """Bytes of the tensors and modules the evaluator holds, by name, and their peak total (tested against the
    bound: one layer + embeddings + lm_head + activations). Views and modules count their storages once."""

    def __init__(self):
        self.held: dict[str, int] = {}
        self.peak = 0

    def hold(self, name: str, obj: Tensor | torch.nn.Module) -> None:
        self.held[name] = tracked_bytes(obj) if isinstance(obj, torch.nn.Module) else obj.untyped_storage().nbytes()
        self.peak = max(self.peak, sum(self.held.values()))

    def drop(self, *names: str) -> None:
        for n in names:
            self.held.pop(n, None)


# ---- streaming ----------------------------------------------------------------------------------------------------

class _Stream:
    """One model being streamed: its reader, the hidden states of every window, and its Context."""

    def __init__(self, path: str, name: str, device: torch.device, dtype: torch.dtype, backend: str, S: int):
        self.path, self.name = path, name
        self.reader = CheckpointReader(path)
        self.config = self.reader.config
        self.backend = backend
        self.ctx = make_context(self.config, torch.arange(S, device=device), dtype=dtype)  # causal (+window) over S
        self.h: Tensor | None = None  # [N, S, D]


def _open(paths: list[tuple[str, str]], windows: Tensor, device, dtype,
          backend) -> tuple[list[_Stream], torch.device, torch.dtype]:  # fmt: skip
    dev = resolve_device(device)
    backend = resolve_backend(backend, dev)
    resolved = [(resolve_source(p), name) for p, name in paths]
    streams: list[_Stream] = []
    try:
        with CheckpointReader(resolved[-1][0]) as ref:  # the reference (last) sets the compute dtype
            dt = resolve_dtype(dtype, dev, ref)
        for path, name in resolved:
            streams.append(_Stream(path, name, dev, dt, backend, windows.shape[1]))
        _check_compatible(streams, windows)
    except BaseException:
        for s in streams:
            s.reader.close()
        raise
    return streams, dev, dt


def _check_compatible(streams: list[_Stream], windows: Tensor) -> None:
    a = streams[-1].config
    for s in streams[:-1]:
        b = s.config
        keys = ("vocab_size", "hidden_size", "num_hidden_layers")
        diff = [f"{k} {getattr(b, k)} vs {getattr(a, k)}" for k in keys if getattr(a, k) != getattr(b, k)]
        if diff:
            raise EvalError(f"{s.path} and {streams[-1].path} are different architectures ({', '.join(diff)}); "
                            "compare a quantized checkpoint with the checkpoint it was made from")  # fmt: skip
    top = int(windows.max())
    if top >= a.vocab_size or int(windows.min()) < 0:
        raise EvalError(f"{streams[-1].path}: token id {top} is outside the model's vocabulary of {a.vocab_size}; "
                        "the text was tokenized with another tokenizer than this model's")  # fmt: skip


def _embed(streams: list[_Stream], windows: Tensor, dev, dt, batch: int, ledger: ByteLedger) -> None:
    N, S = windows.shape
    for k, s in enumerate(streams):
        emb = s.reader.get("model.embed_tokens.weight").to(device=dev, dtype=dt)  # [V, D]
        ledger.hold("embed_tokens", emb)
        s.h = torch.empty(N, S, s.config.hidden_size, device=dev, dtype=dt)  # [N, S, D]
        ledger.hold(f"hidden.{k}", s.h)
        for b0 in range(0, N, batch):
            s.h[b0:b0 + batch] = F.embedding(windows[b0:b0 + batch].to(dev), emb)
        del emb
        ledger.drop("embed_tokens")


def _run_layers(streams: list[_Stream], dev, dt, batch: int, ledger: ByteLedger, weight_error: dict | None,
                progress: bool) -> list[float]:  # fmt: skip
    """Every layer: load it for each model in turn, run all windows through it, free it. Returns the drift."""
    N = streams[0].h.shape[0]
    L = streams[0].config.num_hidden_layers
    drift = []
    bar = tqdm(range(L), desc="layers", unit="layer", disable=not progress, dynamic_ncols=True)
    for i in bar:
        for s in streams:
            block = load_block(s.reader, i, device=dev, dtype=dt, backend=s.backend)
            ledger.hold("block", block)
            inner = tqdm(range(0, N, batch), desc=f"layer {i} {s.name}", unit="batch", leave=False,
                         disable=not progress, dynamic_ncols=True)  # fmt: skip
            for b0 in inner:
                s.h[b0:b0 + batch] = block(s.h[b0:b0 + batch], s.ctx)  # [b, S, D]
            del block
            ledger.drop("block")
        if len(streams) == 2:
            drift.append(_relative_l2(streams[0].h, streams[1].h, batch))
            bar.set_postfix_str(f"drift {drift[-1]:.2e}", refresh=False)
            if weight_error is not None:
                for cls, err in layer_weight_error(streams[1].reader, streams[0].reader, i, dev, ledger).items():
                    weight_error.setdefault(cls, []).append(err)
    bar.close()
    return drift


def _relative_l2(x: Tensor, ref: Tensor, batch: int) -> float:
    """||x - ref|| / ||ref|| over all windows, accumulated in fp64 one batch at a time (no full-size temporary)."""
    num = den = 0.0
    for b0 in range(0, x.shape[0], batch):
        a, r = x[b0:b0 + batch].double(), ref[b0:b0 + batch].double()
        num += (a - r).pow(2).sum().item()
        den += r.pow(2).sum().item()
    return math.sqrt(num / den) if den > 0 else float("nan")


def layer_weight_error(reference: CheckpointReader, quantized: CheckpointReader, layer: int, device,
                       ledger: ByteLedger | None = None) -> dict[str, float]:  # fmt: skip
    """Per class of layer `layer` (q/k/v/o_proj, w1/w2/w3 summed over experts): ||W - deq(W_q)|| / ||W||, read
    from the two checkpoints one tensor at a time (either side may be packed or full precision)."""
    p = f"model.layers.{layer}."
    E = reference.config.num_local_experts
    prefixes = {c: [p + "self_attn." + c] for c in WEIGHT_CLASSES[:4]}
    prefixes.update({c: [p + f"block_sparse_moe.experts.{e}.{c}" for e in range(E)] for c in WEIGHT_CLASSES[4:]})
    out = {}
    for cls, names in prefixes.items():
        num = den = 0.0
        for name in names:
            w = dequantize_tensor(reference.module(name, device), torch.float32)
            wq = dequantize_tensor(quantized.module(name, device), torch.float32)
            if ledger is not None:
                ledger.hold("weight", w)
                ledger.hold("weight_q", wq)
            num += torch.linalg.vector_norm(w - wq, dtype=torch.float64).item() ** 2  # fp64 sums, no fp64 copy
            den += torch.linalg.vector_norm(w, dtype=torch.float64).item() ** 2
            del w, wq
        if ledger is not None:
            ledger.drop("weight", "weight_q")
        out[cls] = math.sqrt(num / den) if den > 0 else float("nan")
    return out


def _final(stream: _Stream, dev, dt) -> tuple[RMSNorm, Tensor]:
    """The final norm (in the compute dtype, as the model runs it) and lm_head in fp32, so logits are not rounded
    to bf16 before the comparison."""
    r, c = stream.reader, stream.config
    norm = RMSNorm(c.hidden_size, c.rms_norm_eps).to(dev)
    norm.weight = torch.nn.Parameter(r.get("model.norm.weight").to(device=dev, dtype=dt), requires_grad=False)
    name = "lm_head.weight" if "lm_head.weight" in r or not c.tie_word_embeddings else "model.embed_tokens.weight"
    return norm, r.get(name).to(device=dev, dtype=torch.float32)  # [V, D]


def _chunk_tokens(vocab: int, chunk_bytes: int) -> int:
    # A few dozen tokens per chunk by default: on the CPU, 100 MB temporaries are several times slower (page faults).
    return max(1, chunk_bytes // (vocab * CHUNK_BYTES_PER_LOGIT))


def _score(streams: list[_Stream], windows: Tensor, dev, dt, chunk_bytes: int, ledger: ByteLedger,
           progress: bool) -> dict:  # fmt: skip
    """Log-probabilities chunk by chunk of predicted positions (fp64 log-softmax over the full vocabulary):
    summed NLL per model; with two models (quantized, reference) also per-token KL(ref || q) and top-1 agreement."""
    N, S = windows.shape
    finals = []
    for k, s in enumerate(streams):
        norm, head = _final(s, dev, dt)
        ledger.hold(f"norm.{k}", norm.weight)
        ledger.hold(f"lm_head.{k}", head)
        finals.append((norm, head))
    T = N * (S - 1)  # predicted tokens
    C = _chunk_tokens(streams[0].config.vocab_size, chunk_bytes)
    flat_ids = windows.reshape(-1).to(dev)  # [N*S]
    nll = [0.0] * len(streams)
    kl = torch.empty(T, dtype=torch.float64) if len(streams) == 2 else None  # per-token KL, on the host
    if kl is not None:
        ledger.hold("kl_per_token", kl)
    agree = 0
    for t0 in tqdm(range(0, T, C), desc="log-probs", unit="chunk", disable=not progress, dynamic_ncols=True):
        t = torch.arange(t0, min(t0 + C, T), device=dev)  # predicted-token indices
        rows = (t // (S - 1)) * S + t % (S - 1)  # [C] flat position (window w, pos p < S-1) that predicts rows+1
        target = flat_ids[rows + 1]  # [C]
        lps = []
        for k, (s, (norm, head)) in enumerate(zip(streams, finals)):
            x = norm(s.h.view(-1, s.h.shape[-1])[rows])  # [C, D]
            logits = F.linear(x.float(), head)  # [C, V] fp32
            ledger.hold(f"logits.{k}", logits)
            lp = logits.double().log_softmax(-1)  # [C, V]
            del logits
            ledger.drop(f"logits.{k}")
            ledger.hold(f"logprobs.{k}", lp)
            nll[k] -= lp.gather(-1, target[:, None]).sum().item()
            lps.append(lp)
        if kl is not None:
            lq, lr = lps
            terms = F.kl_div(lq, lr, reduction="none", log_target=True)  # [C, V] p_ref * (log p_ref - log p_q)
            ledger.hold("kl_terms", terms)
            kl[t0:t0 + t.numel()] = terms.sum(-1).cpu()
            del terms
            ledger.drop("kl_terms")
            agree += int((lq.argmax(-1) == lr.argmax(-1)).sum())
        del lps
        ledger.drop(*[f"logprobs.{k}" for k in range(len(streams))])
    ledger.drop(*[n for k in range(len(streams)) for n in (f"norm.{k}", f"lm_head.{k}")])
    out = {"nll": [v / T for v in nll], "tokens": T}
    if kl is not None:
        out.update(kld_mean=kl.mean().item(), kld_p99=quantile(kl, 0.99), top1_agreement=agree / T)
        ledger.drop("kl_per_token")
    return out


def quantile(x: Tensor, q: float) -> float:
    """numpy's default (linear interpolation) quantile of a 1-D tensor, without torch.quantile's size limit."""
    v = x.reshape(-1).sort().values
    pos = q * (v.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, v.numel() - 1)
    return (v[lo] + (v[hi] - v[lo]) * (pos - lo)).item()


def _batch_windows(batch_tokens: int, S: int) -> int:
    return max(1, batch_tokens // S)


# ---- public entry points ---------------------------------------------------------------------------------------

def evaluate(quantized: str, reference: str, windows: Tensor, *, device: str = "auto", dtype=None,
             backend: str = "auto", weight_errors: bool = False, batch_tokens: int = 8192,
             chunk_bytes: int = 32 << 20, progress: bool = True,
             ledger: ByteLedger | None = None) -> EvalResult:  # fmt: skip
    """Score `quantized` against `reference` on token windows [N, S] (see token_windows), both streamed layer by
    layer. Either may be any checkpoint resolve_source accepts (packed or full precision).

    device/dtype/backend as in load_quantized (dtype from the reference: its source dtype on CUDA, fp32 on CPU).
    weight_errors: also read both checkpoints tensor by tensor for the per-layer weight error (for the plot).
    batch_tokens: tokens per forward through a layer; chunk_bytes: memory for one chunk of log-probabilities.
    """
    ledger = ledger if ledger is not None else ByteLedger()
    streams, dev, dt = _open([(quantized, "quantized"), (reference, "reference")], windows, device, dtype, backend)
    try:
        with torch.inference_mode():
            batch = _batch_windows(batch_tokens, windows.shape[1])
            _embed(streams, windows, dev, dt, batch, ledger)
            werr: dict | None = {} if weight_errors else None
            drift = _run_layers(streams, dev, dt, batch, ledger, werr, progress)
            scores = _score(streams, windows, dev, dt, chunk_bytes, ledger, progress)
    finally:
        for k, s in enumerate(streams):
            s.h = None
            s.reader.close()
            ledger.drop(f"hidden.{k}")
    q, r = (ModelScore(s.path, math.exp(n), n) for s, n in zip(streams, scores["nll"]))
    return EvalResult(quantized=q, reference=r, kld_mean=scores["kld_mean"], kld_p99=scores["kld_p99"],
                      top1_agreement=scores["top1_agreement"], tokens=scores["tokens"], windows=windows.shape[0],
                      context=windows.shape[1], layer_drift=drift, weight_error=werr,
                      peak_tracked_bytes=ledger.peak)  # fmt: skip


def perplexity(src: str, windows: Tensor, *, device: str = "auto", dtype=None, backend: str = "auto",
               batch_tokens: int = 8192, chunk_bytes: int = 32 << 20, progress: bool = True,
               ledger: ByteLedger | None = None) -> ModelScore:  # fmt: skip
    """One model's perplexity on token windows [N, S], streamed layer by layer (same protocol as evaluate)."""
    ledger = ledger if ledger is not None else ByteLedger()
    streams, dev, dt = _open([(src, "model")], windows, device, dtype, backend)
    try:
        with torch.inference_mode():
            batch = _batch_windows(batch_tokens, windows.shape[1])
            _embed(streams, windows, dev, dt, batch, ledger)
            _run_layers(streams, dev, dt, batch, ledger, None, progress)
            nll = _score(streams, windows, dev, dt, chunk_bytes, ledger, progress)["nll"][0]
    finally:
        streams[0].h = None
        streams[0].reader.close()
        ledger.drop("hidden.0")
    return ModelScore(streams[0].path, math.exp(nll), nll)


def save_plot(result: EvalResult, path: str, title: str | None = None) -> str:
    """A PNG: per-layer relative weight error of each quantized class (left) and hidden-state drift (right)."""
    Figure = require_matplotlib()
    layers = list(range(len(result.layer_drift)))
    fig = Figure(figsize=(12, 4.5), layout="constrained")  # no pyplot: no global state, no display needed
    ax_w, ax_h = fig.subplots(1, 2)
    shown, exact = 0, []
    for cls, errs in (result.weight_error or {}).items():
        if all(e == 0 for e in errs):
            exact.append(cls)  # not quantized (same bytes on both sides): nothing to draw on a log scale
            continue
        style = "-o" if cls in WEIGHT_CLASSES[:4] else "--s"
        color = f"C{WEIGHT_CLASSES.index(cls)}" if cls in WEIGHT_CLASSES else None  # one color per class
        ax_w.plot(layers, errs, style, label=cls, markersize=4, color=color)
        shown += 1
    ax_w.set(xlabel="layer", ylabel="||W - deq(W_q)|| / ||W||", title="weight error per layer")
    if shown:
        _log_if_wide(ax_w, [e for errs in result.weight_error.values() for e in errs])
        ax_w.legend(ncol=2, fontsize=8, title="attention ─  experts --", title_fontsize=8)
    if exact:
        ax_w.set_title(f"weight error per layer\n(identical to the reference: {', '.join(exact)})", fontsize=10)
    if not result.weight_error:
        ax_w.text(0.5, 0.5, "weight errors not computed", ha="center", transform=ax_w.transAxes)
    ax_h.plot(layers, result.layer_drift, "-o", color="C3", markersize=4)
    ax_h.set(xlabel="layer", ylabel="||h_q - h_ref|| / ||h_ref||", title="hidden-state drift after each layer")
    _log_if_wide(ax_h, result.layer_drift)
    for ax in (ax_w, ax_h):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(layers)
    q, r = result.quantized, result.reference
    fig.suptitle(title or (f"{os.path.basename(q.path.rstrip('/'))} vs {os.path.basename(r.path.rstrip('/'))}: "
                           f"ppl {q.ppl:.3f} vs {r.ppl:.3f}, KL {result.kld_mean:.4f}, "
                           f"top-1 {100 * result.top1_agreement:.1f}% ({result.tokens:,} tokens)"),
                 fontsize=10)  # fmt: skip
    fig.savefig(path, dpi=120)
    return path


def _log_if_wide(ax, values: list[float]) -> None:
    """A log y axis when the positive values span more than a decade (int8 next to nf4, drift growing)."""
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    if pos and max(pos) / min(pos) > 10:
        ax.set_yscale("log")


def require_matplotlib():
    """matplotlib's Figure class, or an EvalError saying how to install it (checked before a long run)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise EvalError("--plot needs matplotlib: pip install 'mixtral-quant[plot]'") from None
    return Figure
