"""`recipe chat`: the terminal chat, driven through a pseudo-terminal (pexpect): the first message, a streamed
reply, history, /system, /reset, /quit."""

from __future__ import annotations

import os
import sys

import pytest

from tests.test_serve import RECIPE, ROOT, smoke_run_dir


def test_terminal_chat_through_a_pty(tmp_path_factory):
    pexpect = pytest.importorskip("pexpect")
    run_dir = smoke_run_dir(tmp_path_factory)
    child = pexpect.spawn(
        sys.executable,
        ["-m", "engine.cli", "chat", RECIPE, "--run-dir", str(run_dir), "--precision", "fp32", "--max-tokens", "6", "--temperature", "0"],
        cwd=str(ROOT), env=dict(os.environ, PYTHONUNBUFFERED="1"), encoding="utf-8", timeout=120, dimensions=(40, 200),
    )
    try:
        child.expect("Chatting with Falstaff")
        child.expect_exact("Falstaff: Now, Hal, what time of day is it, lad?")
        child.expect_exact("you> ")
        child.sendline("Good morrow, Jack.")
        child.expect(r"Falstaff: ([^\r\n]*)\r?\n")
        first_reply = child.match.group(1)
        child.expect_exact("you> ")
        child.sendline("/system")
        child.expect_exact("system prompt: You are Sir John Falstaff")
        child.expect_exact("you> ")
        child.sendline("/system You are a terse knight.")
        child.expect_exact("(system prompt set")
        child.expect_exact("you> ")
        child.sendline("/bogus")
        child.expect_exact("unknown command /bogus")
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(chat reset)")
        child.expect_exact("Falstaff: Now, Hal, what time of day is it, lad?")
        child.expect_exact("you> ")
        child.sendline("Good morrow, Jack.")  # a fresh chat under the new system prompt
        child.expect(r"Falstaff: ([^\r\n]*)\r?\n")
        assert isinstance(first_reply, str)
        child.expect_exact("you> ")
        child.sendline("/quit")
        child.expect_exact("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
