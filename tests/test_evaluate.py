"""`mixq eval` and mixtral_quant.evaluate against independent oracles: transformers' MixtralForCausalLM (fp32 for
perplexity, float64 for KL), on tiny random checkpoints quantized by the real quantizer.

Tolerances: perplexity within 1e-4 relative of transformers (the issue asks 0.5%); KL mean and p99 within 1e-4
relative of a float64 computation; KL of a model against itself exactly 0.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import write_checkpoint
from mixtral_quant.checkpoint import CheckpointReader
from mixtral_quant.cli.main import cli
from mixtral_quant.evaluate import (ByteLedger, EvalError, encode_text, evaluate, layer_weight_error, load_text,
                                    perplexity, quantile, token_windows)  # fmt: skip
from mixtral_quant.formats import dequantize_tensor
from mixtral_quant.quantize import quantize

# GQA (4 query / 2 kv heads) and a sliding window (6) shorter than the windows, so both matter.
SMALL = dict(vocab_size=384, hidden_size=48, intermediate_size=80, num_hidden_layers=2, sliding_window=6)
# For the CLI: Mixtral's vocabulary, so the tokenizer's ids fit; everything else tiny.
CLI_CFG = dict(vocab_size=32000, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=128)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A random bf16 checkpoint and its nf4 and int8 quantizations."""
    d = tmp_path_factory.mktemp("eval")
    src = write_checkpoint(d / "src", SMALL, seed=5)
    out = {"src": src}
    for fmt in ("nf4", "int8"):
        out[fmt] = quantize(src, str(d / fmt), fmt=fmt, progress=False).output
    return out


def random_windows(n: int, S: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, S), generator=torch.Generator().manual_seed(seed))


def hf_model(path: str, tmp_path, dtype=torch.float32):
    """transformers' model holding `path`'s weights (dequantized by formats.dequantize_tensor when packed)."""
    from transformers import MixtralForCausalLM

    with CheckpointReader(path) as r:
        sd = {p + ".weight": dequantize_tensor(r.module(p), torch.float32) for p in r.modules_index()}
        cfg = {k: v for k, v in r.config.raw.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
    d = write_checkpoint(tmp_path / ("hf-" + os.path.basename(path)), cfg, state_dict=sd, dtype=torch.float32, shards=1)
    # eager experts: the reference loop over experts (the grouped-mm path has no float64)
    return MixtralForCausalLM.from_pretrained(d, dtype=dtype, experts_implementation="eager").eval()


def hf_logprobs(model, windows: torch.Tensor) -> torch.Tensor:
    """float64 log-probs of positions 0..S-2 of each window, each window run on its own: [N*(S-1), V]."""
    with torch.no_grad():
        logits = torch.cat([model(w[None]).logits[0, :-1] for w in windows])  # [N*(S-1), V]
    return logits.double().log_softmax(-1)


# ---- protocol -------------------------------------------------------------------------------------------------

def test_window_protocol_on_a_hand_made_token_list():
    ids = [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # BOS + 10 tokens
    w = token_windows(ids, 4)
    assert w.tolist() == [[1, 10, 11, 12], [13, 14, 15, 16]]  # the partial tail [17, 18, 19] is dropped
    assert token_windows(ids, 4, max_tokens=9).tolist() == w.tolist()
    assert token_windows(ids, 4, max_tokens=7).tolist() == [[1, 10, 11, 12]]
    assert token_windows(ids, 11).tolist() == [ids]
    assert token_windows(torch.tensor(ids), 2).tolist() == [[1, 10], [11, 12], [13, 14], [15, 16], [17, 18]]
    with pytest.raises(EvalError, match="the text has 11 tokens, fewer than one window of --context 12"):
        token_windows(ids, 12)
    with pytest.raises(EvalError, match="context 1: a window needs at least 2 tokens"):
        token_windows(ids, 1)
    with pytest.raises(EvalError, match="max_tokens 1: give at least 2 tokens"):
        token_windows(ids, 2, max_tokens=1)


def test_protocol_counts_every_predicted_token_once(ckpts, tmp_path):
    """tokens = windows * (context - 1): position 0 of each window is never predicted, the last never predicts."""
    w = random_windows(3, 7, SMALL["vocab_size"], seed=1)
    r = evaluate(ckpts["nf4"], ckpts["src"], w, progress=False)
    assert (r.tokens, r.windows, r.context) == (18, 3, 7)
    # the windows are independent: evaluating them one by one gives the same total NLL
    parts = [perplexity(ckpts["src"], w[i:i + 1], progress=False).nll for i in range(3)]
    assert rel(sum(parts) / 3, r.reference.nll) < 1e-6


# ---- against transformers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["src", "nf4"])
def test_perplexity_matches_transformers(ckpts, tmp_path, which):
    w = random_windows(4, 20, SMALL["vocab_size"], seed=2)
    hf = hf_model(ckpts[which], tmp_path)
    with torch.no_grad():
        losses = torch.stack([hf(x[None], labels=x[None]).loss for x in w])  # mean NLL of positions 1..S-1
    want = math.exp(losses.double().mean().item())
    got = perplexity(ckpts[which], w, progress=False)
    assert rel(got.ppl, want) < 1e-4
    both = evaluate(ckpts["nf4"], ckpts["src"], w, progress=False)
    assert rel((both.quantized if which == "nf4" else both.reference).ppl, want) < 1e-4


def test_kl_and_agreement_equal_a_float64_direct_computation(ckpts, tmp_path):
    """Chunks of 7 predicted tokens (chunk_bytes) straddle the 15-token windows; the oracle is transformers in
    float64 on the dequantized weights, whole windows at once."""
    w = random_windows(3, 16, SMALL["vocab_size"], seed=3)
    lr = hf_logprobs(hf_model(ckpts["src"], tmp_path, torch.float64), w)
    lq = hf_logprobs(hf_model(ckpts["nf4"], tmp_path, torch.float64), w)
    kl = (lr.exp() * (lr - lq)).sum(-1).numpy()  # [N*(S-1)]
    agree = (lr.argmax(-1) == lq.argmax(-1)).double().mean().item()
    chunk = 7 * SMALL["vocab_size"] * 28
    r = evaluate(ckpts["nf4"], ckpts["src"], w, chunk_bytes=chunk, progress=False)
    assert r.tokens == kl.size == 45
    assert rel(r.kld_mean, kl.mean()) < 1e-4
    assert rel(r.kld_p99, np.quantile(kl, 0.99)) < 1e-4
    assert r.top1_agreement == agree
    assert 0.005 < r.kld_mean < 1  # nf4 of a random model: a real but small divergence


@pytest.mark.parametrize("which", ["src", "nf4"])
def test_a_model_against_itself(ckpts, which):
    w = random_windows(2, 12, SMALL["vocab_size"], seed=4)
    r = evaluate(ckpts[which], ckpts[which], w, progress=False)
    assert r.kld_mean == 0 and r.kld_p99 == 0 and r.top1_agreement == 1
    assert r.layer_drift == [0.0, 0.0] and r.quantized.ppl == r.reference.ppl


def test_int8_is_closer_than_nf4(ckpts):
    w = random_windows(3, 16, SMALL["vocab_size"], seed=6)
    nf4 = evaluate(ckpts["nf4"], ckpts["src"], w, progress=False, weight_errors=True)
    int8 = evaluate(ckpts["int8"], ckpts["src"], w, progress=False, weight_errors=True)
    assert 0 < int8.kld_mean < nf4.kld_mean / 4
    assert all(0 < a < b for a, b in zip(int8.layer_drift, nf4.layer_drift))
    for cls in ("q_proj", "w2"):
        assert all(0 < a < b / 4 for a, b in zip(int8.weight_error[cls], nf4.weight_error[cls]))


def test_weight_error_per_class_and_layer(ckpts, tmp_path):
    """Against a direct computation over the stacked experts; a class kept in bf16 has error exactly 0."""
    mixed = quantize(ckpts["src"], str(tmp_path / "mixed"), attention="bf16", experts="nf4", progress=False).output
    with CheckpointReader(ckpts["src"]) as r, CheckpointReader(mixed) as q:
        errs = layer_weight_error(r, q, 1, "cpu")
        assert [errs[c] for c in ("q_proj", "k_proj", "v_proj", "o_proj")] == [0.0] * 4
        E = r.config.num_local_experts
        name = "model.layers.1.block_sparse_moe.experts.{}.w3"
        W = torch.stack([r.get(name.format(e) + ".weight").double() for e in range(E)])  # [E, F, D]
        Wq = torch.stack([dequantize_tensor(q.module(name.format(e)), torch.float64) for e in range(E)])
    assert rel(errs["w3"], (torch.linalg.norm(W - Wq) / torch.linalg.norm(W)).item()) < 1e-6
    assert 0.05 < errs["w3"] < 0.2  # NF4 with 64-blocks: about 10% on Gaussian weights


def test_bfloat16_compute_as_on_a_gpu(ckpts):
    """--dtype bfloat16 (the default on CUDA): hidden states in bf16, so half the activation bytes, and the
    scores stay close to the fp32 run (bf16 rounding of the hidden states only; lm_head and KL stay fp32/fp64)."""
    w = random_windows(3, 16, SMALL["vocab_size"], seed=10)
    f32, b16 = ByteLedger(), ByteLedger()
    a = evaluate(ckpts["nf4"], ckpts["src"], w, progress=False, ledger=f32)
    b = evaluate(ckpts["nf4"], ckpts["src"], w, progress=False, ledger=b16, dtype="bfloat16")
    assert rel(b.reference.ppl, a.reference.ppl) < 0.02 and rel(b.quantized.ppl, a.quantized.ppl) < 0.02
    assert rel(b.kld_mean, a.kld_mean) < 0.2
    assert b16.peak < f32.peak


# ---- memory ---------------------------------------------------------------------------------------------------

def test_streaming_holds_one_layer_plus_ends_plus_activations(tmp_path):
    """The peak of the tensors the evaluator holds stays under one layer + embeddings + lm_head + activations,
    all counted from the config (fp32 on the CPU), while the whole model is well over that bound."""
    cfg = dict(SMALL, num_hidden_layers=6, intermediate_size=160)
    src = write_checkpoint(tmp_path / "src", cfg, seed=7)
    nf4 = quantize(src, str(tmp_path / "nf4"), fmt="nf4", progress=False).output
    N, S = 5, 24
    chunk_bytes = 64 << 10
    D, F, V, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], 8
    hd = D // 4
    layer = 4 * (2 * D * 4 * hd + 2 * D * 2 * hd + E * 3 * D * F + E * D + 2 * D)  # attention, experts, router, norms
    ends = 4 * (V * D + V * D + 2 * D)  # embeddings, lm_head, final norms
    hidden = 4 * N * S * D  # one model's hidden states
    activations = 2 * hidden + 8 * N * (S - 1) + chunk_bytes  # both models, per-token KL, one log-prob chunk
    whole_model = 6 * layer + 4 * (2 * V * D + D)
    ledger = ByteLedger()
    evaluate(nf4, src, random_windows(N, S, V, seed=8), chunk_bytes=chunk_bytes, weight_errors=True,
             progress=False, ledger=ledger)  # fmt: skip
    assert ledger.peak <= layer + ends + activations
    assert ledger.peak >= layer + 2 * hidden  # it did hold a whole layer and both hidden states at once
    assert whole_model > 2 * (layer + ends + activations)
    assert ledger.held == {}  # everything was released


# ---- text sources ---------------------------------------------------------------------------------------------

def test_text_sources(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("héllo wörld\n", encoding="utf-8")
    assert load_text(str(f)) == ("héllo wörld\n", str(f))
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "heldout.txt").write_text("held out", encoding="utf-8")
    assert load_text(reference_dir=str(ref)) == ("held out", str(ref / "heldout.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(EvalError, match="latin1.txt: not UTF-8 text"):
        load_text(str(tmp_path / "latin1.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(EvalError, match="empty.txt: the text is empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(EvalError, match="either --text FILE or --dataset NAME"):
        load_text(str(f), "wikitext2")
    # without the embedded model's held-out text (and none beside the reference): a clear error
    monkeypatch.setattr("mixtral_quant.evaluate.DEFAULT_TEXT", ("no-such-model", "heldout.txt"))
    with pytest.raises(EvalError, match="embedded model's heldout.txt is not installed; pass --text FILE"):
        load_text(reference_dir=str(tmp_path))


def test_wikitext2_through_the_datasets_library(monkeypatch):
    """The loader's contract with `datasets` (a stand-in module: no network here): the raw test split, rows
    joined by blank lines."""
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        return {"text": [" = Title = \n", " Some text .\n"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_text(dataset="wikitext2") == (" = Title = \n\n\n Some text .\n", "dataset wikitext2")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]


def test_quantile_is_numpys():
    x = torch.randn(1001, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for q in (0.0, 0.5, 0.99, 1.0):
        assert quantile(x, q) == pytest.approx(np.quantile(x.numpy(), q), rel=1e-12)


# ---- the command --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalcli")
    src = write_checkpoint(d / "src", CLI_CFG, seed=12)
    nf4 = quantize(src, str(d / "nf4"), fmt="nf4", progress=False).output
    text = d / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n\n" * 12, encoding="utf-8")
    return src, nf4, str(text)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_json_equals_the_library(cli_ckpts):
    src, nf4, text = cli_ckpts
    r = run("eval", nf4, "--reference", src, "--text", text, "--context", 32, "--max-tokens", 100, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    ids = encode_text(open(text, encoding="utf-8").read(), src)
    lib = evaluate(nf4, src, token_windows(ids, 32, 100), progress=False)
    for k in ("kld_mean", "kld_p99", "top1_agreement", "tokens"):
        assert out[k] == getattr(lib, k)
    assert out["quantized"]["ppl"] == lib.quantized.ppl and out["reference"]["ppl"] == lib.reference.ppl
    assert (out["tokens"], out["windows"], out["dropped_tokens"]) == (93, 3, 4)
    assert out["text_tokens"] == len(ids) and out["text"] == text


def test_cli_table_and_plot(cli_ckpts, tmp_path):
    src, nf4, text = cli_ckpts
    png = tmp_path / "errors.png"
    r = run("eval", nf4, "-r", src, "--text", text, "--context", 48, "--plot", png)
    assert r.exit_code == 0, r.output
    for want in ("reference", "quantized", "perplexity", "KL(reference || quantized): mean", "top-1 agreement",
                 f"plot: {png}"):  # fmt: skip
        assert want in r.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_cli_default_text_is_the_heldout_beside_the_reference(cli_ckpts, tmp_path):
    src, nf4, text = cli_ckpts
    ref = tmp_path / "ref"
    shutil.copytree(src, ref)
    (ref / "heldout.txt").write_text("import os\n" * 40, encoding="utf-8")
    r = run("eval", nf4, "-r", ref, "--context", 16, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["text"] == str(ref / "heldout.txt")


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--text", "{d}/missing.txt"], "mixq: error: {d}/missing.txt: no such text file; pass a UTF-8 text file"),
        (["--text", "{text}", "--context", "1"], "mixq: error: context 1: a window needs at least 2 tokens"),
        (["--text", "{text}", "--max-tokens", "0"], "mixq: error: max_tokens 0: give at least 2 tokens"),
        (["--text", "{text}", "--context", "100", "--max-tokens", "50"], "fewer than one window of --context 100"),
        (["--text", "{text}", "--context", "100000"], "--context 100000 is longer than the model supports"),
        (["--dataset", "ptb"], "mixq: error: unknown dataset 'ptb': choose one of wikitext2, or pass --text FILE"),
        (["--text", "{text}", "--dataset", "wikitext2"], "mixq: error: pass either --text FILE or --dataset NAME"),
        (["--text", "{text}", "--plot", "{d}/no/such/dir/p.png"], "mixq: error: {d}/no/such/dir/p.png: directory"),
    ],
)
def test_cli_bad_inputs_are_one_line(cli_ckpts, args, msg):
    src, nf4, text = cli_ckpts
    d = os.path.dirname(text)
    r = run("eval", nf4, "-r", src, *[a.format(d=d, text=text) for a in args])
    assert r.exit_code == 1, r.output
    assert msg.format(d=d) in r.stderr
    assert r.stderr.count("\n") == 1 and r.stdout == ""


def test_cli_checkpoint_errors(cli_ckpts, tmp_path):
    src, nf4, text = cli_ckpts
    r = run("eval", nf4, "-r", tmp_path / "missing", "--text", text)
    assert r.exit_code == 1 and f"{tmp_path / 'missing'}: no such directory" in r.stderr
    other = write_checkpoint(tmp_path / "other", dict(CLI_CFG, hidden_size=64), seed=1)
    r = run("eval", nf4, "-r", other, "--text", text, "--context", 16)
    assert r.exit_code == 1 and "are different architectures (hidden_size 32 vs 64)" in r.stderr
    assert r.stderr.count("\n") == 1


def test_cli_datasets_absent_or_unreachable(cli_ckpts, tmp_path, monkeypatch):
    src, nf4, _ = cli_ckpts
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError, installed or not
    r = run("eval", nf4, "-r", src, "--dataset", "wikitext2", "--plot", tmp_path / "p.png")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == ("mixq: error: --dataset wikitext2 needs the datasets library: pip install "
                        "'mixtral-quant[datasets]' (or pass any UTF-8 file with --text FILE)\n")  # fmt: skip

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    r = run("eval", nf4, "-r", src, "--dataset", "wikitext2", "--plot", tmp_path / "p.png")
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.count("\n") == 1
    assert "--dataset wikitext2: could not load Salesforce/wikitext wikitext-2-raw-v1 (ConnectionError" in r.stderr
    assert not (tmp_path / "p.png").exists()


def test_cli_plot_without_matplotlib_fails_before_the_run(cli_ckpts, tmp_path, monkeypatch):
    src, nf4, text = cli_ckpts
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    ran = []
    monkeypatch.setattr("mixtral_quant.evaluate.evaluate", lambda *a, **k: ran.append(1))
    r = run("eval", nf4, "-r", src, "--text", text, "--plot", tmp_path / "p.png")
    assert r.exit_code == 1 and r.stdout == "" and not ran
    assert r.stderr == "mixq: error: --plot needs matplotlib: pip install 'mixtral-quant[plot]'\n"
    assert not (tmp_path / "p.png").exists()
