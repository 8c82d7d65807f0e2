"""Tab completion of the console scripts, installed as the README says, in real bash and zsh
shells on a terminal: what a user sees after pressing Tab."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPTS = Path(sys.executable).parent  # where the install put mnist-train, beside this interpreter
# The README's lines for each shell's startup file (zsh reads bash's completions through bashcompinit).
INSTALL = {
    "bash": ['eval "$(mnist-train -sc install=bash)"'],
    "zsh": [
        "autoload -Uz compinit bashcompinit && compinit -u && bashcompinit",
        'eval "$(mnist-train -sc install=zsh)"',
    ],
}
SHELL_COMMANDS = {"bash": ["bash", "--norc", "--noprofile", "-i"], "zsh": ["zsh", "-f", "-i"]}


class Terminal:
    """An interactive shell on a pseudo-terminal, typed into as a user types."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the shell
            os.execvpe(command[0], command, env)
        self.seen = ""

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def expect(self, pattern: str, timeout: float = 30) -> str:
        """Everything shown until `pattern` (a regular expression) appears; fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not (found := re.search(pattern, self.seen)):
            left = deadline - time.monotonic()
            assert left > 0, f"{pattern!r} never appeared; the terminal showed:\n{self.seen}"
            if select.select([self.fd], [], [], left)[0]:
                self.seen += os.read(self.fd, 65536).decode(errors="replace")
        shown, self.seen = self.seen[: found.end()], self.seen[found.end() :]
        return shown

    def close(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture(params=sorted(SHELL_COMMANDS))
def shell(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Terminal]:
    name = request.param
    if shutil.which(name) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: .ci/run installs it (apt-get install {name})")
        pytest.skip(f"{name} is not installed")
    env = {"PATH": f"{SCRIPTS}:/usr/bin:/bin", "HOME": str(tmp_path), "TERM": "dumb", "PS1": "$ "}
    terminal = Terminal(SHELL_COMMANDS[name], env)
    try:
        for line in INSTALL[name]:
            terminal.type(line + "\n")
        terminal.type("echo installed\n")
        terminal.expect(r"\ninstalled\r?\n")
        yield terminal
    finally:
        terminal.close()


def test_a_key_completes_to_its_full_name(shell: Terminal) -> None:
    shell.type("mnist-train model.act\t")
    assert shell.expect(r"model\.activation=").endswith("mnist-train model.activation=")


def test_a_group_lists_its_options(shell: Terminal) -> None:
    shell.type("mnist-train experiment=\t\t")
    # The list of options, then the command line drawn again below it.
    shown = shell.expect(r"(?s)experiment=\w+.*\n[^\n]*mnist-train experiment=")
    presets = sorted(path.stem for path in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))
    assert sorted(set(re.findall(r"experiment=(\w+)", shown))) == presets


def test_an_option_completes_to_its_full_name(shell: Terminal) -> None:
    shell.type("mnist-train logger=tens\t")
    assert shell.expect(r"logger=tensorboard").endswith("mnist-train logger=tensorboard")
