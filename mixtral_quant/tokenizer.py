"""Mixtral's SentencePiece tokenizer, its instruct format taken from mistral-common for the version the checkpoint
ships (v1 for 8x7B: `<s>[INST] user [/INST] answer</s>` as text; v3 for 8x22B: `[INST]`/`[/INST]` as control
tokens), and incremental decoding that streams text with SentencePiece spacing and multi-byte characters intact.

The model file is the checkpoint's tokenizer (`tokenizer.model.vN` as mistral-common names it, else
`tokenizer.model`), else mistral-common's bundled Mixtral (v1) tokenizer.
"""

from __future__ import annotations

import codecs
import glob
import os
import re

SPIECE_SPACE = "\u2581"  # '▁'
CHAT_VERSIONS = ("v1", "v2", "v3", "v7")  # mistral-common's SentencePiece instruct formats
# The control tokens every v2+ Mistral SentencePiece file has at ids 3..9 (v3 adds [IMG] ... after them, v7 adds
# [SYSTEM_PROMPT]); v2 files and Mixtral-8x22B's v3 file both follow them with [control_8]...
_V2_CONTROLS = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                "[/TOOL_RESULTS]")  # fmt: skip
_VERSIONED = re.compile(r"\.model\.(v\d+)(m\d+)?$")


def chat_version(model_file: str, sp=None) -> str:
    """The mistral-common instruct version of a SentencePiece tokenizer file: v1, v2, v3 or v7.

    From the file name where it says (`tokenizer.model.v3`, mistral-common's naming), else from the control
    tokens: none of Mistral's instruct tokens -> v1; [INST] .. [/TOOL_RESULTS] at ids 3..9 -> v3, or v7 with
    [SYSTEM_PROMPT]. v2 files look like v3 ones (Mixtral-8x22B's v3 file has v2's [control_8] layout), and
    mistral-common gives the same chat ids for both for messages without tools, so such a file is read as v3.
    Anything else raises ValueError naming the file: a guessed format would give malformed chats.
    """
    if sp is None:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=model_file)
    controls = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
    named = _VERSIONED.search(os.path.basename(model_file))
    if "[INST]" not in controls and "[/INST]" not in controls:
        found = "v1"
    elif all(controls.get(p) == i for i, p in enumerate(_V2_CONTROLS, start=3)):
        found = "v7" if "[SYSTEM_PROMPT]" in controls else "v3"
    else:
        raise ValueError(f"{model_file}: unknown tokenizer version ([INST] is a control token but not Mistral's "
                         "v2/v3/v7 layout); rename the file tokenizer.model.vN after mistral-common's chat format "
                         "version N that the model was trained with")  # fmt: skip
    if named is None:
        return found
    version = named.group(1)
    if version not in CHAT_VERSIONS:
        raise ValueError(f"{model_file}: unknown tokenizer version {version}; supported: {', '.join(CHAT_VERSIONS)}")
    if (version == "v1") != (found == "v1"):
        raise ValueError(f"{model_file}: named {version} but its control tokens are those of "
                         f"{'v1' if found == 'v1' else 'v2 or later'}; rename it to match its contents")  # fmt: skip
    return version


def find_tokenizer_file(path: str) -> str | None:
    """The checkpoint's SentencePiece tokenizer: tokenizer.model.vN (mistral-common's naming), else tokenizer.model."""
    versioned = sorted(f for f in glob.glob(os.path.join(glob.escape(path), "tokenizer.model.v*")) if os.path.isfile(f))
    if len(versioned) > 1:
        raise ValueError(f"{path}: several tokenizer files ({', '.join(map(os.path.basename, versioned))}); "
                         "keep the one the model was trained with")  # fmt: skip
    if versioned:
        return versioned[0]
    plain = os.path.join(path, "tokenizer.model")
    if os.path.isfile(plain):
        return plain
    if os.path.isfile(os.path.join(path, "tekken.json")):
        raise ValueError(f"{os.path.join(path, 'tekken.json')}: tekken tokenizers are not supported (Mixtral ships "
                         "a SentencePiece tokenizer.model); put the model's tokenizer.model beside it")  # fmt: skip
    return None


class Tokenizer:
    def __init__(self, model_file: str):
        from sentencepiece import SentencePieceProcessor

        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"{model_file}: no such tokenizer file")
        try:
            self.sp = SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_file}: not a SentencePiece model ({e})") from None
        self.model_file = model_file
        self.version = chat_version(model_file, self.sp)  # mistral-common's instruct format version
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        self._pieces: dict[int, str | None] = {}  # id -> streamed text, filled on first use
        self._chat = {}  # validation mode -> mistral-common MistralTokenizer, built on first use

    def piece_text(self, i: int) -> str | None:
        """The text token `i` adds when streamed: '' for control tokens, None for a byte piece."""
        if i not in self._pieces:
            self._pieces[i] = self._piece_text(i)
        return self._pieces[i]

    @classmethod
    def from_checkpoint(cls, path: str) -> "Tokenizer":
        f = find_tokenizer_file(path)
        return cls(f) if f is not None else cls.default()

    @classmethod
    def default(cls) -> "Tokenizer":
        """mistral-common's bundled Mixtral tokenizer (v1, 32000 tokens)."""
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        return cls(str(MistralTokenizer.v1().instruct_tokenizer.tokenizer.file_path))

    def _piece_text(self, i: int) -> str | None:
        if self.sp.is_control(i):
            return ""
        if self.sp.is_byte(i):
            return None
        if self.sp.is_unknown(i):
            return " \u2047 "  # what SentencePiece's decode writes for <unk>
        return self.sp.id_to_piece(i).replace(SPIECE_SPACE, " ")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def _mistral_tokenizer(self, mode: str):
        """mistral-common's tokenizer for this file's version (its own loader reads the version off the file name)."""
        if mode not in self._chat:
            from mistral_common.protocol.instruct.normalize import get_normalizer
            from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
            from mistral_common.tokens.tokenizers import instruct
            from mistral_common.tokens.tokenizers.base import TokenizerVersion
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
            from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

            v = TokenizerVersion(self.version)
            raw = SentencePieceTokenizer(self.model_file, tokenizer_version=v)
            cls = getattr(instruct, f"InstructTokenizer{self.version.upper()}")
            self._chat[mode] = MistralTokenizer(cls(raw), validator=get_validator(v, ValidationMode(mode)),
                                                request_normalizer=get_normalizer(v))  # fmt: skip
        return self._chat[mode]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The instruct ids of a chat: mistral-common's `encode_chat_completion` for this tokenizer's version.

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]. mistral-common merges consecutive
        messages of one role ("\\n\\n") and places system messages (v1: before the first user message; v2/v3:
        before the last one; v7: as [SYSTEM_PROMPT] tokens). After a final user message the ids end with
        [/INST]. A final assistant message is closed with EOS (mistral-common's finetuning form), or left open
        for the model to continue (its prefix=True) when add_generation_prompt is False.
        """
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        for m in messages:
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(f"chat message {m!r}: need role system/user/assistant and string content")
        roles = [m["role"] for m in messages if m["role"] != "system"]
        if not roles or roles[0] != "user":
            raise ValueError("a chat must start with a user message (after any system messages)")
        cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        msgs = [cls[m["role"]](content=m["content"]) for m in messages]
        mode = "test"
        if roles[-1] == "assistant":
            last = next(i for i in range(len(msgs) - 1, -1, -1) if messages[i]["role"] == "assistant")
            if add_generation_prompt:
                mode = "finetuning"  # mistral-common closes a final answer with EOS in this mode
            else:
                msgs[last] = AssistantMessage(content=messages[last]["content"], prefix=True)
        try:
            return self._mistral_tokenizer(mode).encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens
        except MistralCommonException as e:
            raise ValueError(f"chat messages rejected by mistral-common ({self.version}): {e}") from None

    def stream(self, strip_leading_space: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, strip_leading_space)


class StreamDecoder:
    """push(token id) -> the new text it completes. O(1) per token: pieces are mapped directly, byte pieces
    (<0xE2> ...) go through an incremental UTF-8 decoder so a character split over tokens appears once whole.

    strip_leading_space: drop the leading space of the very first piece, as SentencePiece's decode does at the
    start of a text (leave it False when continuing a prompt).
    """

    def __init__(self, tokenizer: Tokenizer, strip_leading_space: bool = False):
        self.tok = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.strip = strip_leading_space

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        piece = self.tok.piece_text(token_id) if 0 <= token_id < self.tok.vocab_size else ""
        if piece is None:  # a byte piece: '<0xNN>'
            text = self.utf8.decode(bytes([int(self.tok.sp.id_to_piece(token_id)[3:5], 16)]))
        else:
            text = self.utf8.decode(b"", final=True) + piece if piece else ""
        if self.strip and text:
            text, self.strip = text[1:] if text.startswith(" ") else text, False
        return text

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)
