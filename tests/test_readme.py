"""The README's examples run as written (issue 11, item 4: the stream example failed with
NameError and waited forever, the datagram example printed nothing): every ```python block
against a local relay, and the one-machine quickstart, command by command. The only
changes made to them: the relay's address (a free port instead of 3340), free ports for
8000 and 9000, the KEY that serve prints, and `python -m derpnet` for `derpconnect`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.cmd.procs import JOIN_LINE_RX, LISTEN_LINE_RX, Proc, cli_env, free_port, wait_for_port
from tests.relays import OurRelay

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOC_RELAY = "http://127.0.0.1:3340"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README, re.S | re.M)


def expected_output(block: str) -> list[str]:
    """What the block says it prints: the comment after each print(...)."""
    return [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s*#\s*(.+)$", block, re.M)]


def test_the_readme_has_python_examples_that_say_what_they_print():
    blocks = python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        assert expected_output(block), block


@pytest.fixture(scope="module")
def relay():
    with OurRelay() as r:
        yield r


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_block_runs_as_written(relay, index, tmp_path):
    block = python_blocks()[index]
    assert DOC_RELAY in block
    script = tmp_path / f"example{index}.py"
    script.write_text(block.replace(DOC_RELAY, relay.url))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path, env=cli_env(tmp_path / "home"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == expected_output(block), (r.stdout, r.stderr)


def quickstart() -> list[str]:
    """The commands of the one-machine quickstart, comments removed."""
    section = README.split("## Quickstart on one machine, no internet", 1)[1].split("\n## ", 1)[0]
    lines = [line[4:] for line in section.splitlines() if line.startswith("    ")]
    return [line.split("  #", 1)[0].strip() for line in lines]


def test_the_quickstart_works_on_one_machine(tmp_path):
    cmds = quickstart()
    assert [c.split()[0] for c in cmds] == ["derpconnect", "python", "derpconnect", "derpconnect", "curl"]
    relay_port, http_port, join_port = free_port(), free_port(), free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("hello from the quickstart\n")
    env = cli_env(tmp_path / "home")

    def argv(cmd: str) -> list[str]:
        cmd = (cmd.replace("3340", str(relay_port)).replace("8000", str(http_port))
               .replace("9000", str(join_port)))
        words = cmd.split()
        return [sys.executable, "-m", "derpnet", *words[1:]] if words[0] == "derpconnect" else words

    relay_argv = argv(cmds[0]) + ["--listen", f"127.0.0.1:{relay_port}", "--stun-port", "0"]
    http_argv = argv(cmds[1])
    assert http_argv[:4] == ["python", "-m", "http.server", str(http_port)]
    http_argv = [sys.executable, *http_argv[1:], "--directory", str(tmp_path / "www")]
    with Proc(relay_argv, env, tmp_path / "relay.log") as rp, Proc(http_argv, env, tmp_path / "http.log"):
        rp.wait_for_line(r"derpnet relay listening on http://127\.0\.0\.1:\d+", timeout=30)
        wait_for_port("127.0.0.1", http_port, timeout=20)
        with Proc(argv(cmds[2]), env, tmp_path / "serve.log") as srv:
            key = srv.wait_for_line(JOIN_LINE_RX, timeout=30).group(2)
            with Proc(argv(cmds[3].replace("KEY", key)), env, tmp_path / "join.log") as join:
                join.wait_for_line(LISTEN_LINE_RX, timeout=30)
                curl = argv(cmds[4])
                assert curl == ["curl", f"localhost:{join_port}"]
                if shutil.which("curl"):
                    r = subprocess.run([*curl[:-1], curl[-1] + "/hello.txt", "--max-time", "30", "-sS"],
                                       capture_output=True, text=True, timeout=60)
                    assert r.returncode == 0, r.stderr
                    body = r.stdout
                else:  # no curl here: the same GET
                    with urllib.request.urlopen(f"http://{curl[-1]}/hello.txt", timeout=30) as resp:
                        body = resp.read().decode()
                assert body == "hello from the quickstart\n"
