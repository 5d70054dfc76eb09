"""The decode step compiles: the Triton kernels are custom operators, so torch.compile(fullgraph=True) traces a whole
triton-backend step with no graph break and gives the eager logits and tokens; no forward of a resident model reads
a tensor on the host; bad input raises the kernels' ValueError under compile too; generate(compile=...) decides
when to compile and falls back to eager decoding with a logged warning.

The triton-backend tests run the kernels under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 on a CPU).
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from conftest import write_checkpoint
from mixtral_quant import generate as gen
from mixtral_quant import load_quantized
from mixtral_quant.formats import NF4Weight, quantize_tensor
from mixtral_quant.quantize import quantize

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
SEED = 20261202


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread):  # one thread: inductor's kernels are built for it (no OpenMP regions)
    d = tmp_path_factory.mktemp("compile")
    src = write_checkpoint(d / "src", SMALL, seed=3)
    quantize(src, str(d / "nf4"), fmt="nf4", progress=False)
    return load_quantized(str(d / "nf4"), device="cpu", tokenizer=False)


@pytest.fixture(scope="module")
def builtin_dirs(tmp_path_factory):
    """The builtin tiny model quantized twice: nf4 everywhere, and int8 attention with nf4 experts."""
    d = tmp_path_factory.mktemp("builtin")
    quantize("builtin:tiny-mixtral", str(d / "nf4"), fmt="nf4", device="cpu", progress=False)
    quantize("builtin:tiny-mixtral", str(d / "mixed"), experts="nf4", attention="int8", device="cpu", progress=False)
    return d


def _decode(model, step, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill `prompt` [1, S], then n greedy steps through `step`: (tokens [n], logits [n, V] fp32)."""
    S = prompt.shape[1]
    model.setup_caches(1, 64)
    s = gen.Sampling()
    with torch.inference_mode():
        cur = gen.prefill(model, prompt, torch.arange(S), None, s)
        pos = torch.tensor([S])
        toks, logits = [], []
        for _ in range(n):
            lg = step(model, cur, pos, None)  # [1, V]
            logits.append(lg.float().clone())
            cur = lg.argmax(-1)
            toks.append(cur.clone())
            pos += 1
    return torch.cat(toks), torch.cat(logits)


@pytest.mark.parametrize("variant,dtype", [("nf4", torch.float32), ("mixed", torch.float32),
                                           ("nf4", torch.bfloat16)])  # fmt: skip
def test_compiled_triton_decode_step_equals_eager(builtin_dirs, variant, dtype):
    """fullgraph compile (aot_eager) of decode_logits on the triton backend: 0 graph breaks, logits within 1e-4
    of eager, the same 16 greedy tokens. int8 attention + nf4 experts and bf16 activations too."""
    torch._dynamo.reset()
    model = load_quantized(str(builtin_dirs / variant), device="cpu", dtype=dtype, backend="triton", tokenizer=False)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(SEED))
    want_tok, want = _decode(model, gen.decode_logits, prompt, 16)
    compiled = torch.compile(gen.decode_logits, fullgraph=True, backend="aot_eager", dynamic=False)
    got_tok, got = _decode(model, compiled, prompt, 16)
    assert torch.equal(got_tok, want_tok)
    err = (got - want).abs().max().item()
    assert err <= 1e-4, f"compiled logits differ from eager by {err:.2e}"
    with torch.inference_mode():
        explained = torch._dynamo.explain(gen.decode_logits)(model, got_tok[-1:], torch.tensor([21]), None)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    want_ops = {"mixq.fused_moe.default", "mixq.int8_matmul.default" if variant == "mixed" else "mixq.nf4_matmul.default"}
    assert want_ops <= ops, f"custom operators missing from the graph: {want_ops - ops}"


def _no_host_reads(monkeypatch):
    """Make .item(), .tolist(), float(), int() and bool() of a tensor raise when our code calls them."""
    ours = ("mixtral_quant", "kernels")

    def guard(name, orig):
        def f(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if any(f"/{p}/" in caller for p in ours):
                raise AssertionError(f"Tensor.{name} called from {caller}:{sys._getframe(1).f_lineno}")
            return orig(self, *a, **k)

        return f

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))


@pytest.mark.parametrize("variant,backend", [("nf4", "triton"), ("mixed", "triton"), ("nf4", "torch")])
def test_resident_forward_reads_nothing_on_the_host(builtin_dirs, variant, backend, monkeypatch):
    """Prefill and decode forwards of a resident model: no .item()/.tolist()/float()/int()/bool() of a tensor in
    our code. The torch backend (the CPU's) groups a batch's tokens per expert from host counts: its batch-1 decode
    is checked; the GPU's path, triton, in every kind of forward."""
    model = load_quantized(str(builtin_dirs / variant), device="cpu", backend=backend, tokenizer=False)
    prompt = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(SEED))
    if backend == "torch":
        prompt = prompt[:1]
    model.setup_caches(prompt.shape[0], 16)
    with torch.inference_mode():
        if backend == "torch":
            model(prompt, torch.arange(6), from_start=True)
        _no_host_reads(monkeypatch)
        if backend == "triton":
            model(prompt, torch.arange(6), from_start=True)
            model(prompt, None)  # no cache
            model(prompt[:, :3], torch.arange(3), torch.tensor([[0, 1, 1], [1, 1, 1]]))  # left padding: a mask
        logits = model(prompt[:, :1], torch.tensor([6]))
    monkeypatch.undo()
    assert torch.isfinite(logits).all()


def test_the_guard_catches_a_host_read(builtin_dirs, monkeypatch):
    """The guard above is not vacuous: a nested offset read on the host (what QuantLinear.nf4_weight did) trips it."""
    from mixtral_quant import linear

    model = load_quantized(str(builtin_dirs / "nf4"), device="cpu", backend="triton", tokenizer=False)
    src = "def host_offset(self, *index):\n    w = orig(self, *index)\n    float(w.offset)\n    return w\n"
    ns = {"orig": linear.QuantLinear.nf4_weight}
    exec(compile(src, linear.__file__, "exec"), ns)  # a one-line bug planted as if in linear.py
    monkeypatch.setattr(linear.QuantLinear, "nf4_weight", ns["host_offset"])
    _no_host_reads(monkeypatch)
    with pytest.raises(AssertionError, match="Tensor.__float__ called from"), torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("compiled", ["eager", "compiled", "fullgraph"])
def test_bad_input_raises_the_same_error_under_compile(compiled):
    """Eagerly and under torch.compile: the wrapper's ValueError (dynamo runs the frame eagerly to raise it). With
    fullgraph=True dynamo must refuse the frame instead: its error then carries the same message."""
    from mixtral_quant.kernels import int8_matmul, nf4_matmul

    torch._dynamo.reset()  # dynamo caches per code object: no decision carried over from another parametrization
    g = torch.Generator().manual_seed(SEED)
    d = quantize_tensor(torch.randn(32, 64, generator=g), "nf4")
    w = NF4Weight.from_dict(d)
    q = quantize_tensor(torch.randn(32, 64, generator=g), "int8")

    def call(x, weight, scb):
        return nf4_matmul(x, w) + int8_matmul(x, weight, scb)

    fn = call if compiled == "eager" else torch.compile(call, fullgraph=compiled == "fullgraph", backend="aot_eager")
    x = torch.randn(2, 64, generator=g)
    torch.testing.assert_close(fn(x, q["weight"], q["SCB"]), call(x, q["weight"], q["SCB"]), rtol=0, atol=0)
    cases = [
        ((x.to(torch.int32), q["weight"], q["SCB"]), "float32, bfloat16 or float16"),
        ((x[:, :48].contiguous(), q["weight"], q["SCB"]), "last dimension must be the weight's in_features 64"),
        ((x, q["weight"].float(), q["SCB"]), "must be an int8 [N, K] tensor"),
        ((x, q["weight"], q["SCB"][:31]), "scb must be float32 [32]"),
        ((x.to("meta"), q["weight"], q["SCB"]), "is on cpu but x is on meta"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError if compiled == "fullgraph" else ValueError) as e:
            fn(*args)
        assert msg in str(e.value)


def test_fake_kernels_check_too():
    """The registered fakes (what a compiled graph runs at trace time) raise the same ValueError."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(SEED)
    d = quantize_tensor(torch.randn(32, 64, generator=g), "nf4")
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 48)
        with pytest.raises(ValueError, match="in_features 64"):
            torch.ops.mixq.nf4_matmul(x, d["weight"], d["weight.absmax"], d["weight.quant_map"],
                                      d["weight.nested_absmax"], d["weight.nested_quant_map"], torch.tensor(0.0),
                                      32, 64, 64, 256)  # fmt: skip
        y = torch.ops.mixq.int8_matmul(torch.empty(3, 5, 64), torch.empty(32, 64, dtype=torch.int8), torch.empty(32))
        assert y.shape == (3, 5, 32)


# --- generate(compile=...) ----------------------------------------------------------------------------------


def test_compiled_greedy_tokens_equal_eager(model, caplog):
    """Inductor's C++ backend on the CPU (a cold compile takes ~1 minute on a loaded 2-core box, seconds once cached)."""
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    want = model.generate(ids, 12, eos=[])
    with caplog.at_level(logging.WARNING, logger="mixtral_quant.generate"):
        got = model.generate(ids, 12, eos=[], compile=True)
        again = model.generate(ids[:, :5], 12, eos=[], compile=True)  # other lengths reuse the cache size
    assert not [r for r in caplog.records if "compile" in r.getMessage()], "compiling fell back to eager"
    assert torch.equal(got, want)
    assert torch.equal(again, model.generate(ids[:, :5], 12, eos=[]))


def test_failed_compile_falls_back_to_eager_with_a_warning(model, monkeypatch, caplog):
    def broken(fn, **kw):
        def compiled(*a, **k):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return compiled

    monkeypatch.setattr(gen.torch, "compile", broken)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    want = model.generate(ids, 6, eos=[])
    with caplog.at_level(logging.WARNING, logger="mixtral_quant.generate"):
        got = model.generate(ids, 6, eos=[], compile=True)
    assert torch.equal(got, want)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0] and "decoding eagerly" in warnings[0]


def test_compile_default_first_step_eager_then_compiled(model, monkeypatch):
    """compile=None: off on the CPU, on for CUDA with resident experts; with compile on, the first decode step runs
    eagerly (the kernels tune there) and the compiled step is called from the second on, in the FIRST generate."""
    calls = []

    def fake_compile(fn, **kw):
        calls.append(kw)

        def compiled(*a, **k):
            calls.append("step")
            return fn(*a, **k)

        return compiled

    monkeypatch.setattr(gen.torch, "compile", fake_compile)
    ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(2))
    want = model.generate(ids, 5, eos=[])
    assert calls == []  # None on the CPU: eager
    assert torch.equal(model.generate(ids, 5, eos=[], compile=True), want)
    assert calls[0]["fullgraph"] and calls[1:] == ["step"] * 3  # 4 decode steps: 1 eager, 3 compiled
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    assert gen.resolve_compile(model, None) is True
    assert gen.resolve_compile(model, False) is False


def test_offloaded_models_decode_eagerly_and_say_so_once(model, monkeypatch, caplog):
    monkeypatch.setattr(type(model), "experts_resident", lambda self: False)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    model.__dict__.pop("_said_eager", None)
    with caplog.at_level(logging.INFO, logger="mixtral_quant.generate"):
        assert gen.resolve_compile(model, None) is False
        assert gen.resolve_compile(model, True) is False
    said = [r.getMessage() for r in caplog.records if "offloaded" in r.getMessage()]
    assert len(said) == 1 and "decoding eagerly" in said[0]
    model.__dict__.pop("_said_eager", None)


def test_cache_length_buckets():
    assert gen.cache_length(20, 1024) == 256
    assert gen.cache_length(300, 1024) == 512
    assert gen.cache_length(900, 1024) == 1024
    assert gen.cache_length(2000, 1024) == 2000  # beyond the model's context: exactly what is needed
