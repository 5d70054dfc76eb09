"""`mixq chat` in a pseudo-terminal (pexpect), as a person uses it: Ctrl-C while it answers stops the reply and
returns to the prompt with the conversation kept; Ctrl-C or Ctrl-D at the prompt exits with status 0."""

from __future__ import annotations

import os
import shutil
import sys

import pexpect
import pytest

from mixtral_quant.tokenizer import Tokenizer

MIXQ = shutil.which("mixq") or os.path.join(os.path.dirname(sys.executable), "mixq")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# The tiny model answers this with code and no EOS for hundreds of tokens: time to press Ctrl-C mid-answer.
FIRST = "Write a long Python module with many classes."


def spawn(*args) -> pexpect.spawn:
    child = pexpect.spawn(MIXQ, ["chat", "builtin:tiny-mixtral", "--device", "cpu", *args], env=ENV,
                          encoding="utf-8", timeout=120, dimensions=(50, 200))  # fmt: skip
    child.expect_exact("/exit to quit")
    child.expect_exact("> ")
    return child


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation():
    child = spawn("-n", "600")  # 600 + the prompts + a partial reply of up to ~390 tokens fit the 1024 context
    child.sendline(FIRST)
    child.expect_exact(FIRST)  # the terminal's echo of the message
    child.expect(r"[\s\S]{80}")  # 80 characters of answer: it is streaming
    child.sendintr()  # Ctrl-C
    child.expect(r"\[stopped after (\d+) tokens: the partial reply is kept in the conversation")
    stopped_after = int(child.match.group(1))
    assert 0 < stopped_after < 600
    child.expect_exact("> ")  # back at the prompt, the session alive
    child.sendline("And another one.")
    child.expect(r"\[(\d+) tokens, [\d.na]+ tok/s, prompt (\d+) tokens\]")
    # the second prompt holds the first message, the partial reply and the second message
    tok = Tokenizer.default()
    alone = len(tok.apply_chat_template([{"role": "user", "content": FIRST}, {"role": "assistant", "content": "x"},
                                         {"role": "user", "content": "And another one."}]))  # fmt: skip
    assert int(child.match.group(2)) > alone + stopped_after // 2
    child.expect_exact("> ")
    child.sendintr()  # Ctrl-C at an empty prompt: exit 0
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "Aborted" not in child.before and "Traceback" not in child.before


def test_ctrl_d_at_the_prompt_exits_0():
    child = spawn("-n", "4")
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before
