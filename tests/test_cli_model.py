"""`mixq generate / chat / demo` through click's CliRunner, checked against the library on the same checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from conftest import write_checkpoint
from mixtral_quant import load_quantized
from mixtral_quant.cli.main import cli
from mixtral_quant.quantize import quantize


pytestmark = pytest.mark.usefixtures("one_thread")


# Mixtral's real vocabulary so that the tokenizer's ids fit; everything else tiny.
CFG = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    src = write_checkpoint(d / "src", CFG, seed=11)
    quantize(src, str(d / "nf4"), fmt="nf4", progress=False)
    return str(d / "src"), str(d / "nf4")


@pytest.fixture(scope="module")
def model(ckpt):
    return load_quantized(ckpt[1], device="cpu")


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def greedy_text(model, ids, n):
    out = model.generate(torch.tensor([ids]), n, eos=model.tokenizer.eos_id)[0, len(ids):].tolist()
    return [t for t in out if t != model.tokenizer.eos_id]


def test_generate_streams_the_greedy_continuation(ckpt, model):
    r = run("generate", ckpt[1], "--prompt", "The quick brown fox", "-n", 12, "--device", "cpu")
    assert r.exit_code == 0, r.output
    tok = model.tokenizer
    new = greedy_text(model, tok.encode("The quick brown fox"), 12)
    assert r.stdout == tok.decode(tok.encode("The quick brown fox") + new)[len("The quick brown fox"):] + "\n"
    assert "tok/s" in r.stderr


def test_generate_json_and_sampling(ckpt, model):
    r = run("generate", ckpt[1], "-p", "def f(x):", "-n", 6, "--json", "--temperature", "0.9", "--top-p", "0.9",
            "--top-k", "50", "--seed", "3")  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    ids = torch.tensor([model.tokenizer.encode("def f(x):")])
    want = model.generate(ids, 6, do_sample=True, temperature=0.9, top_p=0.9, top_k=50, seed=3,
                          eos=model.tokenizer.eos_id)[0, ids.shape[1]:].tolist()  # fmt: skip
    assert got["tokens"] == want and got["new_tokens"] == len(want)


def test_chat_piped_turns_reset_and_exit(ckpt, model):
    tok = model.tokenizer
    r = run("chat", ckpt[1], "-n", 8, "--stats", input="Hello!\nWhat is 2+2?\n/reset\nWhat is 2+2?\n/exit\nnever read\n")
    assert r.exit_code == 0, r.output
    # three answers; the second continues the first turn, the third starts over after /reset
    hist = [{"role": "user", "content": "Hello!"}]
    a1 = tok.decode(greedy_text(model, tok.apply_chat_template(hist), 8))
    hist += [{"role": "assistant", "content": a1 or " "}, {"role": "user", "content": "What is 2+2?"}]
    ids2 = tok.apply_chat_template(hist)
    a2 = tok.decode(greedy_text(model, ids2, 8))
    ids3 = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    a3 = tok.decode(greedy_text(model, ids3, 8))
    answers = r.stdout.splitlines()
    assert [a.strip() for a in answers] == [a1.strip(), a2.strip(), a3.strip()]
    assert r.stderr.count("tok/s") == 3 and f"prompt {len(ids2)} tokens" in r.stderr
    assert "[conversation reset]" in r.stderr and "all experts resident" in r.stderr


def test_chat_ends_at_eof(ckpt):
    r = run("chat", ckpt[1], "-n", 4, input="Hi\n")
    assert r.exit_code == 0 and r.stderr.count("tok/s") == 1


def test_chat_message_too_long_for_the_context(ckpt):
    r = run("chat", ckpt[1], "-n", 8, input="word " * 200 + "\nHi\n")
    assert r.exit_code == 0
    assert "exceed the model's context of 128 tokens" in r.stderr and r.stderr.count("tok/s") == 1


def test_demo_runs_end_to_end(ckpt):
    r = run("demo", "--source", ckpt[0], "-n", 5, "--context", 48, "--eval-tokens", 96, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["quantize"]["formats"] == {"attention": "nf4", "experts": "nf4"}
    assert not os.path.exists(out["quantize"]["output"])  # the temporary directory is gone
    assert out["inspect"]["total"]["bytes"] == out["quantize"]["output_bytes"]
    c = out["compare"]
    assert c["tokens"] == 2 * 47 and 0 < c["kl_mean"] < 1 and 0 <= c["top1_agreement"] <= 1
    assert c["ppl_reference"] > 1 and c["ppl_quantized"] > 1
    # the table form prints the inspect summary and the comparison
    r = run("demo", "--source", ckpt[0], "-n", 3, "--context", 16)
    assert r.exit_code == 0, r.output
    assert "bits/param" in r.stdout and "perplexity" in r.stdout and "top-1 agreement" in r.stdout


@pytest.mark.parametrize(
    "args, code, msg",
    [
        (["generate", "{d}/missing", "-p", "x"], 1, "mixq: error: {d}/missing: no such directory"),
        (["generate", "{nf4}", "-p", "x", "--max-memory", "lots"], 1,
         "mixq: error: max_memory 'lots' not understood: write it like 16GiB"),
        (["generate", "{nf4}", "-p", "x", "--device", "tpu"], 1, "mixq: error: device 'tpu'"),
        (["generate", "{nf4}", "-p", "x", "--backend", "magic"], 2, "Invalid value for '--backend'"),
        (["generate", "{nf4}", "-p", "x", "--top-p", "1.5"], 2, "Invalid value for '--top-p'"),
        (["generate", "{nf4}"], 2, "Missing option '-p' / '--prompt'"),
        (["chat", "{d}/missing"], 1, "mixq: error: {d}/missing: no such directory"),
        (["chat", "{nf4}", "--max-memory", "0"], 1, "mixq: error: max_memory 0 must be a positive size"),
        (["demo", "--source", "{d}/missing"], 1, "mixq: error: {d}/missing: no such directory"),
    ],
)
def test_bad_inputs_are_one_line(ckpt, args, code, msg):
    d = os.path.dirname(ckpt[1])
    r = run(*[a.format(d=d, nf4=ckpt[1]) for a in args])
    assert r.exit_code == code, r.output
    assert msg.format(d=d) in r.stderr
    if code == 1:
        assert r.stderr.count("\n") == 1 and r.stdout == ""


def test_generate_compile_flags(ckpt, model, monkeypatch):
    """--compile decodes through generate.compile_decode (here a stand-in for torch.compile that counts its steps);
    --no-compile and the CPU's default do not; the tokens are the same either way."""
    from mixtral_quant import generate as gen

    steps = []

    def counting_compile(fn, **kw):
        def compiled(*a, **k):
            steps.append(1)
            return fn(*a, **k)

        return compiled

    monkeypatch.setattr(gen.torch, "compile", counting_compile)
    outs = {}
    for flag in ("--compile", "--no-compile", None):
        steps.clear()
        r = run("generate", ckpt[1], "-p", "Hello there", "-n", 6, "--json", *([flag] if flag else []))
        assert r.exit_code == 0, r.output
        outs[flag] = json.loads(r.stdout)
        n = outs[flag]["new_tokens"]  # 1 from the prompt, n - 1 decode steps: the first eager, the rest compiled
        assert len(steps) == (max(n - 2, 0) if flag == "--compile" else 0)
    assert outs["--compile"]["tokens"] == outs["--no-compile"]["tokens"] == outs[None]["tokens"]
    assert ("compile_seconds" in outs["--compile"]) == (outs["--compile"]["new_tokens"] > 2)
    assert "compile_seconds" not in outs["--no-compile"]
