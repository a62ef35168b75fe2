"""The single file works when copied next to a script, with either HTTP client missing.

An absent package is simulated the cheap way: `sys.modules[name] = None` makes
`import name` raise ImportError in that (separate) interpreter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LeakWatch
from fake_edrv import FakeEdrv

import edrv_auth

SOURCE = Path(edrv_auth.__file__).resolve()  # edrv_auth.py, or the wheel's __init__.py

USE_REQUESTS = """
import requests
r = requests.get(URL + "/v1.1/chargestations", auth=edrv_auth.EdrvAuth(), timeout=10)
print(r.status_code)
"""
USE_HTTPX = """
import httpx
with httpx.Client(auth=edrv_auth.EdrvAuth()) as client:
    print(client.get(URL + "/v1.1/chargestations").status_code)
"""
USE_NEITHER = """
print(200 if edrv_auth.EdrvAuth().get_token() else 0)
"""


@pytest.fixture
def vendored(tmp_path: Path) -> Path:
    """An empty folder holding only a copy of edrv_auth.py."""
    folder = tmp_path / "script"
    folder.mkdir()
    shutil.copyfile(SOURCE, folder / "edrv_auth.py")
    return folder


def run_script(folder: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    (folder / "script.py").write_text(code, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "script.py"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("missing", "usage"),
    [("httpx", USE_REQUESTS), ("requests", USE_HTTPX), ("requests httpx", USE_NEITHER)],
)
def test_vendored_file_works_without_a_client(
    fake_env: FakeEdrv, vendored: Path, leak_watch: LeakWatch, missing: str, usage: str
) -> None:
    """Copied alone into a folder, the file imports and authenticates with what is there."""
    prelude = "import sys\n"
    prelude += "".join(f"sys.modules[{name!r}] = None\n" for name in missing.split())
    prelude += "import edrv_auth\n"
    prelude += f"assert edrv_auth.__file__ == {str(vendored / 'edrv_auth.py')!r}\n"
    prelude += f"URL = {fake_env.url!r}\n"
    result = run_script(vendored, prelude + usage)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "200"
    assert fake_env.token_requests == 1
    assert leak_watch.leaks(result.stderr) == []


def test_vendored_command_line(vendored: Path) -> None:
    """`python edrv_auth.py --help` and `python -m edrv_auth --help` work from the copy."""
    for command in (["edrv_auth.py", "--help"], ["-m", "edrv_auth", "--help"]):
        result = subprocess.run(
            [sys.executable, *command],
            cwd=vendored,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "token" in result.stdout
