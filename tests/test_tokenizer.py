"""The tokenizer against mistral-common (Mixtral's reference tokenizer and instruct formats: v1 for 8x7B, v3 for
8x22B), using the tokenizer files mistral-common ships in its package data."""

from __future__ import annotations

import io
import random
import shutil

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral_quant.tokenizer import Tokenizer, chat_version

TEXTS = [
    "Hello world",
    "  leading spaces and\ttabs\n\nnew lines  ",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment",
    "héllo wörld, 你好, 😀 emoji and ∑ math",
    "",
]
# conversations ending on a user turn: system prompts (first, repeated, mid-way), multi-turn, merged consecutive
# turns, non-ASCII text, the issue's example
CONVERSATIONS = [
    [("user", "Hi there"), ("assistant", "Hello!"), ("user", "What is NF4?")],
    [("system", "You answer in one sentence."), ("user", "What is NF4?")],
    [("system", "You answer in one sentence."), ("user", "What is NF4?"),
     ("assistant", "A 4-bit data type whose 16 levels are normal quantiles."), ("user", "And int8?"),
     ("user", "Briefly, please."), ("assistant", "Eight bits per weight, one scale per row."), ("user", "Thanks! 😀")],
    [("user", "Grüße aus Köln — was ist 四十二?"), ("system", "Sois bref."), ("system", "Réponds en français."),
     ("assistant", "Zweiundvierzig: 42."), ("user", "Et en français ? ∑ é")],
    [("user", "  spaces  \n\n and lines\n"), ("assistant", "ok"), ("user", "[INST] is text here [/INST]")],
]  # fmt: skip
MC = {"v1": MistralTokenizer.v1, "v2": MistralTokenizer.v2, "v3": MistralTokenizer.v3, "v7": MistralTokenizer.v7}
CLS = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


def data_file(version: str) -> str:
    """mistral-common's bundled SentencePiece file of that version."""
    return str(MC[version]().instruct_tokenizer.tokenizer.file_path)


def as_checkpoint_file(tmp_path, version: str) -> str:
    """The bundled file copied as a plain `tokenizer.model`, as Hub checkpoints ship it (no version in the name)."""
    dst = tmp_path / version
    dst.mkdir(exist_ok=True)
    shutil.copy(data_file(version), dst / "tokenizer.model")
    return str(dst)


def want_ids(version: str, msgs, mode=ValidationMode.test) -> list[int]:
    mc = MistralTokenizer.from_file(data_file(version), mode=mode)
    return mc.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_encode_decode_match_mistral_common(tmp_path, version):
    raw = MC[version]().instruct_tokenizer.tokenizer
    tok = Tokenizer.from_checkpoint(as_checkpoint_file(tmp_path, version))
    for text in TEXTS:
        for bos in (True, False):
            assert tok.encode(text, bos=bos) == raw.encode(text, bos=bos, eos=False)
        ids = raw.encode(text, bos=True, eos=True)
        assert tok.decode(ids) == raw.decode(ids)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (raw.bos_id, raw.eos_id, raw.n_words)


def test_version_read_from_the_file_contents(tmp_path):
    """Plain `tokenizer.model` files: 8x7B's is v1, 8x22B's (mistral-common's v3 file) v3, v7 has [SYSTEM_PROMPT]."""
    for version, want in [("v1", "v1"), ("v2", "v3"), ("v3", "v3"), ("v7", "v7")]:
        assert Tokenizer.from_checkpoint(as_checkpoint_file(tmp_path, version)).version == want, version
    assert Tokenizer.default().version == "v1"
    # a file named after its version (mistral-common's naming) is taken at its word, and preferred to tokenizer.model
    d = tmp_path / "named"
    d.mkdir()
    shutil.copy(data_file("v2"), d / "tokenizer.model.v2")
    shutil.copy(data_file("v1"), d / "tokenizer.model")
    t = Tokenizer.from_checkpoint(str(d))
    assert (t.version, t.model_file) == ("v2", str(d / "tokenizer.model.v2"))


@pytest.mark.parametrize("version", ["v1", "v2", "v3", "v7"])
def test_chat_ids_match_mistral_common(tmp_path, version):
    """For v2, the file read as v3 (their layouts agree) gives mistral-common's v2 ids: the formats agree here."""
    tok = Tokenizer.from_checkpoint(as_checkpoint_file(tmp_path, version))
    for conv in CONVERSATIONS:
        want = want_ids(version, [CLS[r](content=c) for r, c in conv])
        assert tok.apply_chat_template([{"role": r, "content": c} for r, c in conv]) == want, conv
    # a final answer closed with EOS (mistral-common's finetuning form) or left open to continue (prefix=True)
    conv = [UserMessage(content="Count to five."), AssistantMessage(content="One, two,")]
    msgs = [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "One, two,"}]
    assert tok.apply_chat_template(msgs) == want_ids(version, conv, ValidationMode.finetuning)
    conv[-1] = AssistantMessage(content="One, two,", prefix=True)
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == want_ids(version, conv)


def test_the_issues_example_with_8x22b_tokenizer(tmp_path):
    tok = Tokenizer.from_checkpoint(as_checkpoint_file(tmp_path, "v3"))
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is NF4?"}]  # fmt: skip
    assert tok.apply_chat_template(msgs)[:9] == [1, 3, 16127, 1504, 4, 23325, 29576, 2, 3]
    v1 = Tokenizer.default().apply_chat_template(msgs)
    assert v1[:4] == [1, 733, 16289, 28793] and 3 not in v1  # "▁[", "INST", "]" as text pieces


def test_chat_template_bad_messages(tok):
    with pytest.raises(ValueError, match="must start with a user message"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="need role system/user/assistant"):
        tok.apply_chat_template([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="need role system/user/assistant and string content"):
        tok.apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match=r"rejected by mistral-common \(v1\): .*Assistant message"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])
    with pytest.raises(ValueError, match=r"\(v1\): Unexpected role 'system' after role 'assistant'"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                 {"role": "system", "content": "late"}, {"role": "user", "content": "hi"}])  # fmt: skip


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_streaming_keeps_spacing_and_multibyte_characters(tmp_path, version):
    tok = Tokenizer.from_checkpoint(as_checkpoint_file(tmp_path, version))
    rng = random.Random(0)
    chat = tok.apply_chat_template([{"role": "user", "content": "héllo 你好"}, {"role": "assistant", "content": "😀 ok"},
                                    {"role": "user", "content": "again"}])  # fmt: skip
    texts = TEXTS + ["".join(rng.choice("ab 😀你\n é") for _ in range(200))]
    for ids in [tok.encode(t, bos=True) for t in texts] + [chat]:
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


def test_from_checkpoint_uses_its_tokenizer_model(tmp_path):
    src = data_file("v1")
    assert Tokenizer.from_checkpoint(str(tmp_path)).model_file == src  # none there: the bundled one
    shutil.copy(src, tmp_path / "tokenizer.model")
    t = Tokenizer.from_checkpoint(str(tmp_path))
    assert t.model_file == str(tmp_path / "tokenizer.model")
    assert t.encode("same bytes") == Tokenizer.default().encode("same bytes")


def _sentencepiece_with_only_inst(path):
    """A small SentencePiece model with [INST] as a control token but none of Mistral's other instruct tokens."""
    import sentencepiece as spm

    f = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world, a tiny corpus for a tokenizer"] * 50),
                                   model_writer=f, vocab_size=25, control_symbols=["[INST]"], minloglevel=2)  # fmt: skip
    path.write_bytes(f.getvalue())


def test_unknown_tokenizer_versions_are_errors(tmp_path):
    d = tmp_path / "inst-only"
    d.mkdir()
    _sentencepiece_with_only_inst(d / "tokenizer.model")
    with pytest.raises(ValueError, match=r"inst-only/tokenizer.model: unknown tokenizer version .* rename the file "
                                         r"tokenizer.model.vN"):  # fmt: skip
        Tokenizer.from_checkpoint(str(d))
    d = tmp_path / "v9"
    d.mkdir()
    shutil.copy(data_file("v3"), d / "tokenizer.model.v9")
    with pytest.raises(ValueError, match=r"model.v9: unknown tokenizer version v9; supported: v1, v2, v3, v7"):
        Tokenizer.from_checkpoint(str(d))
    d = tmp_path / "misnamed"
    d.mkdir()
    shutil.copy(data_file("v1"), d / "tokenizer.model.v3")
    with pytest.raises(ValueError, match=r"tokenizer.model.v3: named v3 but its control tokens are those of v1"):
        chat_version(str(d / "tokenizer.model.v3"))
    shutil.copy(data_file("v3"), d / "tokenizer.model.v7")
    with pytest.raises(ValueError, match=r"misnamed: several tokenizer files \(tokenizer.model.v3, tokenizer.model.v7"):
        Tokenizer.from_checkpoint(str(d))
    d = tmp_path / "tekken"
    d.mkdir()
    shutil.copy(MistralTokenizer.v3(is_tekken=True).instruct_tokenizer.tokenizer.file_path, d / "tekken.json")
    with pytest.raises(ValueError, match=r"tekken.json: tekken tokenizers are not supported"):
        Tokenizer.from_checkpoint(str(d))


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model: not a SentencePiece model"):
        Tokenizer.from_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such tokenizer file"):
        Tokenizer(str(tmp_path / "missing.model"))
