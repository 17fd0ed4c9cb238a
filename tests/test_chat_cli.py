"""`lowmoe chat` driven through a pseudo-terminal: each reply streams the engine's greedy decode of
the rendered conversation, the second turn reuses the first's state (/stats), /reset starts the
conversation over, and end of input quits."""

import os
import pty
import re
import subprocess
import sys
import time

import lowmoe
from chat_templates import PLAIN, chat_model
from lowmoe.chat.template import load_template

N = 12


class Terminal:
    def __init__(self, argv):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.out = b""

    def until(self, marker, timeout=120):
        """Reads until `marker` (bytes) appears after what was read before -> the text up to it."""
        deadline = time.time() + timeout
        while marker not in self.out:
            assert time.time() < deadline, self.out[-500:]
            try:
                self.out += os.read(self.master, 4096)
            except OSError:  # the child closed the terminal
                break
        text, _, self.out = self.out.partition(marker)
        return text.decode("utf-8", "replace").replace("\r\n", "\n")

    def send(self, line):
        os.write(self.master, line.encode() + b"\n")


def test_chat_in_a_terminal(tmp_path):
    path = chat_model(tmp_path / "m", PLAIN)
    with lowmoe.Engine.from_pretrained(path) as e:
        template = load_template(path, e.tokenizer, e.config.eos_token_ids)

        def reply(chat):
            return e.generate(e.encode(template.render(chat)), N).text

        first = [{"role": "user", "content": "In the beginning"}]
        want1 = reply(first)
        second = first + [{"role": "assistant", "content": want1}, {"role": "user", "content": "And God said"}]
        want2 = reply(second)
        first_prompt = len(e.encode(template.render(first)))
    t = Terminal([sys.executable, "-m", "lowmoe.cli", "chat", path, "--max-new-tokens", str(N)])
    t.until(b">>> ")
    t.send("In the beginning")
    assert t.until(b">>> ").split("\n", 1)[1].strip() == want1.strip()  # the echoed line, then the reply
    t.send("And God said")
    assert t.until(b">>> ").split("\n", 1)[1].strip() == want2.strip()
    t.send("/stats")
    stats = t.until(b">>> ")
    reused = int(re.search(r"\((\d+) reused", stats).group(1))
    assert reused >= first_prompt  # the second turn prefilled only what came after the first
    t.send("/reset")
    assert "reset" in t.until(b">>> ")
    t.send("In the beginning")
    assert t.until(b">>> ").split("\n", 1)[1].strip() == want1.strip()
    os.write(t.master, b"\x04")  # end of input
    assert t.proc.wait(60) == 0
