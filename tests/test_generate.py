"""Generation: sampling filters against transformers' logits warpers, seeded sampling, EOS per row, streaming."""

from __future__ import annotations

import pytest
import torch

from conftest import write_checkpoint
from mixtral_quant import load_quantized
from mixtral_quant.generate import Sampling, filter_logits, sample, stream
from mixtral_quant.quantize import quantize


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    src = write_checkpoint(d / "src", SMALL, seed=7)
    quantize(src, str(d / "nf4"), fmt="nf4", progress=False)
    return load_quantized(str(d / "nf4"), device="cpu", tokenizer=False)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.5)])
def test_filter_logits_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)  # fmt: skip

    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    want = warpers(None, logits.clone())
    got = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-6, atol=1e-6)


def test_sampling_follows_the_filtered_distribution():
    """20000 draws from 8 tokens: frequencies within 0.015 of the filtered softmax (std ~0.0035)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -2.0, 1.5]]).repeat(20000, 1)
    s = Sampling(True, temperature=0.8, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(0))
    draws = sample(logits, s)
    freq = torch.bincount(draws, minlength=8).float() / draws.numel()
    probs = filter_logits(logits[:1], 0.8, 5, 0.9).softmax(-1)[0]
    assert (freq - probs).abs().max() < 0.015
    assert (freq[probs == 0] == 0).all()


def test_seeded_sampling_is_reproducible(model):
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(do_sample=True, temperature=1.5, top_p=0.95, eos=[])
    a = model.generate(ids, 10, seed=5, **kw)
    assert torch.equal(a, model.generate(ids, 10, seed=5, **kw))
    assert not torch.equal(a, model.generate(ids, 10, seed=6, **kw))
    # top_k=1 sampling is greedy
    assert torch.equal(model.generate(ids, 8, do_sample=True, top_k=1, seed=3, eos=[]), model.generate(ids, 8, eos=[]))


def test_eos_stops_each_row(model):
    ids = torch.randint(3, 256, (2, 4), generator=torch.Generator().manual_seed(2))
    free = model.generate(ids, 12, eos=[])
    stop = int(free[0, 4 + 3])  # row 0's 4th new token becomes the stop token
    out = model.generate(ids, 12, eos=stop)
    first = {r: next((j for j in range(4, free.shape[1]) if free[r, j] == stop), None) for r in (0, 1)}
    for r in (0, 1):
        j = first[r]
        if j is None:
            assert torch.equal(out[r, : out.shape[1]], free[r, : out.shape[1]])
        else:  # identical up to the stop token, then only stop tokens
            assert torch.equal(out[r, : j + 1], free[r, : j + 1]) and (out[r, j:] == stop).all()
    # the batch ends when every row has stopped (or at max_new_tokens)
    last = max(j if j is not None else free.shape[1] - 1 for j in first.values())
    assert out.shape[1] == last + 1


def test_streaming_callback_and_iterator_agree_with_the_result(model):
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    seen = []
    out = model.generate(ids, 7, eos=[], callback=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, 1), out[:, 6:])
    assert torch.equal(torch.stack(list(stream(model, ids, 7, eos=[])), 1), out[:, 6:])


def test_bad_generation_arguments(model):
    ids = torch.randint(3, 256, (1, 4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(ids, 3, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        model.generate(ids, 3, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="token ids must be in 0..255"):
        model.generate(torch.tensor([[1, 999]]), 3)
    with pytest.raises(ValueError, match="must be left-padded"):
        model.generate(torch.tensor([[5, 6, 7]]), 3, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="the shape of input_ids"):
        model.generate(torch.tensor([[5, 6, 7]]), 3, attention_mask=torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, prompt length >= 1\]"):
        model.generate(torch.tensor([5, 6]), 3)


def test_sampling_options_without_do_sample_warn_and_decode_greedily(caplog):
    with caplog.at_level("WARNING", logger="mixtral_quant.generate"):
        s = Sampling(do_sample=False, temperature=0.7)
    assert not s.do_sample
    assert "ignored without do_sample=True" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mixtral_quant.generate"):
        Sampling(do_sample=True, temperature=0.7)
    assert caplog.text == ""
