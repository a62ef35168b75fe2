"""Every README snippet runs against the fake eDRV, so the docs cannot rot.

Python blocks run as scripts, with `https://api.edrv.io` pointed at the fake.
Shell blocks run line by line, except the commands that install packages or run
the test suite and benchmarks, which CI itself runs, and the section that runs
the fake by hand, which runs as one session (two shells). The try-out runs whole.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, LeakWatch, _closed_port, ctrl_c_reaches_children
from fake_edrv import FakeEdrv

import edrv_auth

README = ROOT / "README.md"
MODULE_DIR = Path(edrv_auth.__file__).resolve().parent
if MODULE_DIR.name == "edrv_auth":  # the installed package: import it from site-packages
    MODULE_DIR = MODULE_DIR.parent

#: Shell lines not run here: installing, and running the suite, nox or the benchmarks.
NOT_RUN = re.compile(r"^(pip |python3? -m (venv|pytest|pip)|\. |python benchmarks/|nox)")


#: The section that runs the fake by hand; its port, replaced by a free one in the test.
FAKE_SECTION = "### Your own code against the fake"
FAKE_PORT = "8765"


def fake_section() -> str:
    """The README's section on running your own code against the fake, up to the next heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index(FAKE_SECTION)
    end = text.find("\n#", start + len(FAKE_SECTION))
    return text[start : len(text) if end < 0 else end]


def blocks(language: str, text: str | None = None) -> list[str]:
    text = README.read_text(encoding="utf-8") if text is None else text
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def shell_lines() -> list[str]:
    readme = README.read_text(encoding="utf-8").replace(fake_section(), "")
    lines = [line.split("  #")[0].strip() for b in blocks("sh", readme) for line in b.splitlines()]
    return [line for line in lines if line and not NOT_RUN.match(line)]


def run(command: list[str], fake: FakeEdrv | None = None) -> subprocess.CompletedProcess[str]:
    # `python` in a shell line means this interpreter (the test's virtual env).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, PYTHONPATH=str(MODULE_DIR), PATH=path)
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False
    )


def to_fake(text: str, fake: FakeEdrv) -> str:
    return text.replace("https://api.edrv.io", fake.url)


def test_readme_has_the_snippets_users_copy() -> None:
    """The first screen has the requests, httpx and httpx-async snippets and the curl line."""
    python = blocks("python")
    assert len(python) >= 3
    assert "requests.get(" in python[0]
    assert "httpx.Client(" in python[1]
    assert "httpx.AsyncClient(" in python[2]
    assert any("curl " in line for line in shell_lines())


def test_readme_starts_with_the_two_newcomer_commands() -> None:
    """The first shell block is two lines: set up and run the try-out, set up and run the tests."""
    tryout, tests = blocks("sh")[0].splitlines()
    assert tryout.startswith("python3 -m venv ")
    assert tryout.endswith(" examples/tryout.py")
    assert tests.startswith("python3 -m venv ")
    assert tests.endswith(" -m pytest")


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_snippet_runs(fake_env: FakeEdrv, leak_watch: LeakWatch, index: int) -> None:
    """The README's Python snippet number `index` runs and talks to the API with success."""
    code = to_fake(blocks("python")[index], fake_env)
    result = run([sys.executable, "-c", code], fake_env)
    assert result.returncode == 0, result.stderr
    assert leak_watch.leaks(result.stdout, result.stderr) == []
    if fake_env.url in code:
        assert fake_env.api_requests >= 1
        assert fake_env.api_401s == 0


@pytest.mark.posix_only  # the README's shell lines are for a POSIX shell
@pytest.mark.parametrize("line", shell_lines())
def test_shell_line_runs(fake_env: FakeEdrv, leak_watch: LeakWatch, line: str) -> None:
    """The README's shell command runs, exit status 0, against the fake."""
    result = run(["bash", "-c", to_fake(line, fake_env)], fake_env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert leak_watch.leaks(result.stderr) == []
    if "curl " in line:
        assert '"ok": true' in result.stdout


def test_install_commands_can_work() -> None:
    """No pip install in the README asks the index for edrv-auth, which is not there: the
    package comes from a path, a wheel built here, or an explicit git+ URL, never a
    placeholder one."""
    text = README.read_text(encoding="utf-8")
    commands = re.findall(r"pip install ([^`\n#&;|]+)", text)
    assert len(commands) >= 5  # the clone, the tests, the wheel, the git+ form, redis...
    for command in commands:
        for word in shlex.split(command):
            if re.match(r"edrv[-_]auth", word, flags=re.IGNORECASE):
                assert " @ git+" in word, command
    assert "OWNER" not in text


@pytest.mark.posix_only  # export, unset, Ctrl-C
def test_running_your_code_against_the_fake_works_as_shown(leak_watch: LeakWatch) -> None:
    """The README's fake-by-hand session runs as written: `python tests/fake_edrv.py` prints what
    the README shows, both modes' commands reach the fake's API with success, and Ctrl-C stops
    it."""
    section = fake_section()
    start, *sessions = blocks("sh", section)
    (printed,) = blocks("text", section)
    assert len(sessions) == 2  # client credentials, then an API key
    port = str(_closed_port())
    command = shlex.split(start.replace(FAKE_PORT, port))
    assert command[:2] == ["python", "tests/fake_edrv.py"]
    with ctrl_c_reaches_children():
        server = subprocess.Popen(
            [sys.executable, *command[1:]], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
    try:
        assert server.stdout is not None
        expected = printed.replace(FAKE_PORT, port).splitlines()
        assert [server.stdout.readline().rstrip("\n") for _ in expected] == expected
        for session in sessions:
            result = run(["bash", "-e", "-c", session.replace(FAKE_PORT, port)])
            assert result.returncode == 0, result.stderr
            assert '"ok": true' in result.stdout
            assert leak_watch.leaks(result.stdout, result.stderr) == []
        server.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate()


def test_tryout_explains_the_cap_in_plain_words() -> None:
    """The try-out (the README's first command) runs, and its step 4 says in words what the cap
    did, truly: eDRV got no token request past the 5 a minute it allows."""
    result = run([sys.executable, "examples/tryout.py"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    step = lines.index("4. a revoked client: the API rejects every token; 30 requests follow")
    seen, counted, cap = lines[step + 1 : step + 4]
    assert seen == "   the caller sees [401]: each 401 comes back as eDRV sent it"
    assert re.fullmatch(
        r"   eDRV got \d+ more token requests, 5 since the start, and no more: at most", counted
    )
    assert (
        cap == "   5 a minute per credential set (client id and secret), counted across processes"
    )
    assert "totals: token requests 5," in result.stdout
