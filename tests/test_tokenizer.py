"""The tokenizer against mistral-common (Mixtral's reference tokenizer and instruct format, v1)."""

from __future__ import annotations

import random
import shutil

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral_quant.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces and\ttabs\n\nnew lines  ",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment",
    "héllo wörld, 你好, 😀 emoji and ∑ math",
    "",
]


@pytest.fixture(scope="module")
def mc():
    return MistralTokenizer.v1()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def test_encode_decode_match_mistral_common(mc, tok):
    raw = mc.instruct_tokenizer.tokenizer
    for text in TEXTS:
        for bos in (True, False):
            assert tok.encode(text, bos=bos) == raw.encode(text, bos=bos, eos=False)
        ids = raw.encode(text, bos=True, eos=True)
        assert tok.decode(ids) == raw.decode(ids)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (raw.bos_id, raw.eos_id, raw.n_words)


def test_chat_template_matches_mistral_common(mc, tok):
    conv = [
        ("system", "You answer in one sentence."),
        ("user", "What is NF4?"),
        ("assistant", "A 4-bit data type whose 16 levels are normal quantiles."),
        ("user", "And int8?"),
        ("user", "Briefly, please."),  # consecutive user turns are merged
        ("assistant", "Eight bits per weight, one scale per row."),
        ("user", "Thanks! 😀"),
    ]
    cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    for end in (2, 4, 5, 7):  # conversations ending on a user turn
        msgs = conv[:end]
        want = mc.encode_chat_completion(ChatCompletionRequest(messages=[cls[r](content=c) for r, c in msgs])).tokens
        got = tok.apply_chat_template([{"role": r, "content": c} for r, c in msgs])
        assert got == want, end
    # a final assistant message left open for the model to continue (mistral-common's prefix=True)
    msgs = [UserMessage(content="Count to five."), AssistantMessage(content="One, two,", prefix=True)]
    want = mc.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens
    got = tok.apply_chat_template([{"role": "user", "content": "Count to five."},
                                   {"role": "assistant", "content": "One, two,"}], add_generation_prompt=False)  # fmt: skip
    assert got == want


def test_chat_template_bad_messages(tok):
    with pytest.raises(ValueError, match="must start with a user message"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="need role system/user/assistant"):
        tok.apply_chat_template([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="need role system/user/assistant and string content"):
        tok.apply_chat_template([{"role": "user", "content": None}])


def test_streaming_keeps_spacing_and_multibyte_characters(tok):
    rng = random.Random(0)
    for text in TEXTS + ["".join(rng.choice("ab 😀你\n é") for _ in range(200))]:
        ids = tok.encode(text, bos=True)
        st = tok.stream(strip_leading_space=True)
        pieces = [st.push(i) for i in ids]
        assert "".join(pieces) + st.flush() == tok.decode(ids)
        # no piece ever holds half a character
        assert all("\ufffd" not in p for p in pieces)


def test_streaming_a_continuation_after_a_prompt(tok):
    prompt, cont = tok.encode("The answer is"), tok.encode(" forty two, 四十二.", bos=False)
    st = tok.stream()  # continuing: the first piece keeps its leading space
    streamed = "".join(st.push(i) for i in cont) + st.flush()
    assert streamed == tok.decode(prompt + cont)[len(tok.decode(prompt)):]


def test_from_checkpoint_uses_its_tokenizer_model(tmp_path, mc):
    src = str(mc.instruct_tokenizer.tokenizer.file_path)
    assert Tokenizer.from_checkpoint(str(tmp_path)).model_file == src  # none there: the bundled one
    shutil.copy(src, tmp_path / "tokenizer.model")
    t = Tokenizer.from_checkpoint(str(tmp_path))
    assert t.model_file == str(tmp_path / "tokenizer.model")
    assert t.encode("same bytes") == Tokenizer.default().encode("same bytes")


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model: not a SentencePiece model"):
        Tokenizer.from_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such tokenizer file"):
        Tokenizer(str(tmp_path / "missing.model"))
