"""The single file works when copied next to a script, with either HTTP client missing.

An absent package is simulated the cheap way: `sys.modules[name] = None` makes
`import name` raise ImportError in that (separate) interpreter.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import venv
from pathlib import Path

import pytest
from conftest import LeakWatch, run_python
from fake_edrv import FakeEdrv

import edrv_auth

SOURCE = Path(edrv_auth.__file__).resolve()  # edrv_auth.py, or the wheel's __init__.py

USE_REQUESTS = """
import requests
r = requests.get(URL + "/v1.1/chargestations", auth=AUTH, timeout=10)
print(r.status_code)
"""
USE_HTTPX = """
import httpx
with httpx.Client(auth=AUTH) as client:
    print(client.get(URL + "/v1.1/chargestations").status_code)
"""
USE_NEITHER = """
print(200 if AUTH.get_token() else 0)
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
    return run_python("script.py", cwd=folder, env=env)


@pytest.mark.parametrize(
    ("missing", "usage", "mode"),
    [
        ("httpx", USE_REQUESTS, "api_key"),
        ("requests", USE_HTTPX, "client credentials"),
        ("requests httpx", USE_NEITHER, "api_key"),
    ],
)
def test_vendored_file_works_without_a_client(
    fake_env: FakeEdrv,
    vendored: Path,
    leak_watch: LeakWatch,
    missing: str,
    usage: str,
    mode: str,
) -> None:
    """Copied alone into a folder, the file imports and authenticates with what is there:
    an API key with whichever client is installed, client credentials with httpx."""
    api_key = fake_env.issue_token() if mode == "api_key" else None
    prelude = "import sys\n"
    prelude += "".join(f"sys.modules[{name!r}] = None\n" for name in missing.split())
    prelude += "import edrv_auth\n"
    prelude += f"assert edrv_auth.__file__ == {str(vendored / 'edrv_auth.py')!r}\n"
    prelude += f"URL = {fake_env.url!r}\n"
    prelude += f"AUTH = edrv_auth.EdrvAuth(api_key={api_key!r})\n"
    result = run_script(vendored, prelude + usage)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "200"
    assert fake_env.token_requests == (0 if api_key else 1)
    assert leak_watch.leaks(result.stderr) == []


def test_vendored_command_line(vendored: Path) -> None:
    """`python edrv_auth.py --help` and `python -m edrv_auth --help` work from the copy."""
    for command in (["edrv_auth.py", "--help"], ["-m", "edrv_auth", "--help"]):
        result = run_python(*command, cwd=vendored, timeout=30)
        assert result.returncode == 0, result.stderr
        assert "token" in result.stdout


WITHOUT_PACKAGE = """
import sys
sys.modules[{package!r}] = None
import edrv_auth
assert edrv_auth.__file__ == {file!r}
try:
    edrv_auth.EdrvAuth()
except edrv_auth.EdrvAuthError as exc:
    print(exc)
else:
    print("constructed")
print(edrv_auth.EdrvAuth(client_id=None, client_secret=None, api_key="test-key").get_token())
sys.argv = ["edrv_auth", "token"]
sys.exit(edrv_auth.main())
"""


@pytest.mark.parametrize("package", ["filelock", "httpx"])
def test_vendored_without_a_package_client_credentials_need_says_what_to_install(
    fake_env: FakeEdrv, vendored: Path, leak_watch: LeakWatch, package: str
) -> None:
    """Without filelock (the token cache) or httpx (the token request), construction in
    client-credentials mode says `pip install <it>`, and the CLI in one line."""
    code = WITHOUT_PACKAGE.format(package=package, file=str(vendored / "edrv_auth.py"))
    result = run_script(vendored, code)
    refusal, key = result.stdout.splitlines()
    assert f"pip install {package}" in refusal
    assert key == "test-key"  # API-key mode needs neither
    assert result.returncode == 2
    assert result.stderr.startswith("edrv_auth: ")
    assert not result.stderr.startswith("edrv_auth: edrv_auth")  # one prefix, not two
    assert f"pip install {package}" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert fake_env.token_requests == 0  # refused before anything was sent
    assert leak_watch.leaks(result.stdout, result.stderr) == []


@pytest.mark.posix_only  # symbolic links
def test_vendored_file_type_checks_with_only_its_dependencies(
    vendored: Path, tmp_path: Path
) -> None:
    """`mypy --strict` passes on the copied file where only its hard dependencies are
    installed (requests, httpx, filelock): neither redis, an optional extra, nor
    types-requests, where requests ships its own annotations."""
    pytest.importorskip("mypy", reason="mypy is in the dev extra; nox's typing session runs it")
    import requests

    # An interpreter that sees our packages but those: a bare venv whose site-packages
    # links to each of ours, those and edrv_auth itself left out.
    leave_out = ("redis", "edrv_auth", "_edrv_auth")
    if (Path(requests.__file__).parent / "py.typed").exists():  # else stubs are needed
        leave_out += ("requests-stubs", "types_requests")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(tmp_path / "env")
    python = tmp_path / "env" / "bin" / "python"
    where = [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    target = Path(subprocess.run(where, capture_output=True, text=True, check=True).stdout.strip())
    for folder in {Path(p).resolve() for p in site.getsitepackages()}:
        for entry in folder.iterdir():
            link = target / entry.name
            if not entry.name.startswith(leave_out) and not link.exists():
                link.symlink_to(entry)
    probe = subprocess.run(
        [python, "-c", "import requests, httpx, filelock; import redis"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.stderr.endswith("No module named 'redis'\n"), probe.stderr  # only redis missing

    mypy = ["-m", "mypy", "--strict", "--no-incremental", "--python-executable", str(python)]
    result = run_python(*mypy, "edrv_auth.py", cwd=vendored, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success: no issues found in 1 source file")
