"""Mixtral's SentencePiece tokenizer, its instruct format (`<s>[INST] user [/INST] answer</s>[INST] ...`), and
incremental decoding that streams text with SentencePiece spacing and multi-byte characters intact.

The model file is the checkpoint's `tokenizer.model`, else mistral-common's bundled Mixtral (v1) tokenizer.
"""

from __future__ import annotations

import codecs
import os

SPIECE_SPACE = "\u2581"  # '▁'


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
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        self._pieces: dict[int, str | None] = {}  # id -> streamed text, filled on first use

    def piece_text(self, i: int) -> str | None:
        """The text token `i` adds when streamed: '' for control tokens, None for a byte piece."""
        if i not in self._pieces:
            self._pieces[i] = self._piece_text(i)
        return self._pieces[i]

    @classmethod
    def from_checkpoint(cls, path: str) -> "Tokenizer":
        f = os.path.join(path, "tokenizer.model")
        return cls(f) if os.path.isfile(f) else cls.default()

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

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Mixtral-Instruct ids, as mistral-common's v1 `encode_chat_completion`.

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]. System messages are prepended to
        the first user message ("system\\n\\nuser"), consecutive messages of one role are joined by "\\n\\n".
        A final assistant message is closed with EOS, or left open for the model to continue when
        add_generation_prompt is False. After a final user message the ids end with "[/INST]".
        """
        system, turns = [], []
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(f"chat message {m!r}: need role system/user/assistant and string content")
            if role == "system":
                system.append(content)
            elif turns and turns[-1][0] == role:
                turns[-1][1] += "\n\n" + content
            else:
                turns.append([role, content])
        if not turns or turns[0][0] != "user":
            raise ValueError("a chat must start with a user message (after any system messages)")
        ids = [self.bos_id]
        for i, (role, content) in enumerate(turns):
            if role == "user":
                if i == 0 and system:
                    content = "\n\n".join(system) + "\n\n" + content
                ids += self.sp.encode(f"[INST] {content} [/INST]")
            else:
                ids += self.sp.encode(content)
                if i < len(turns) - 1 or add_generation_prompt:
                    ids.append(self.eos_id)
        return ids

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
