"""generate(compile=True): the compiled decode step gives the eager greedy tokens; a failed compile falls back to eager
decoding with a logged warning."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import write_checkpoint
from mixtral_quant import generate as gen
from mixtral_quant import load_quantized
from mixtral_quant.quantize import quantize

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread):  # one thread: inductor's kernels are built for it (no OpenMP regions)
    d = tmp_path_factory.mktemp("compile")
    src = write_checkpoint(d / "src", SMALL, seed=3)
    quantize(src, str(d / "nf4"), fmt="nf4", progress=False)
    return load_quantized(str(d / "nf4"), device="cpu", tokenizer=False)


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


def test_cache_length_buckets():
    assert gen.cache_length(20, 1024) == 256
    assert gen.cache_length(300, 1024) == 512
    assert gen.cache_length(900, 1024) == 1024
    assert gen.cache_length(2000, 1024) == 2000  # beyond the model's context: exactly what is needed
