"""The command line: `python -m edrv_auth token | status | clear`."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import API_KEY, LeakWatch, MakeAuth, _plant, ctrl_c_reaches_children, run_python
from fake_edrv import FakeEdrv

import edrv_auth

MODULE_DIR = Path(edrv_auth.__file__).resolve().parent
if MODULE_DIR.name == "edrv_auth":  # the installed package, not the checkout's file
    MODULE_DIR = MODULE_DIR.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m edrv_auth ...` in a real process, as a user would."""
    return run_python("-m", "edrv_auth", *args, cwd=MODULE_DIR, env=env, timeout=30)


def test_token_prints_only_the_token(fake_env: FakeEdrv, leak_watch: LeakWatch) -> None:
    """`token` prints the token and a newline, nothing else, and exits 0."""
    result = run_cli("token")
    assert (result.returncode, result.stderr) == (0, "")
    token = result.stdout.removesuffix("\n")
    assert token in fake_env.issued_tokens
    assert fake_env.token_requests == 1
    # The printed token works against the API.
    assert run_cli("token").stdout == result.stdout
    assert fake_env.token_requests == 1


def test_status_shows_the_cache_but_never_the_token(
    fake_env: FakeEdrv, capsys: pytest.CaptureFixture[str], clean_env: Path
) -> None:
    """`status` shows the file, lifetime and scope, and neither prints nor requests a token."""
    assert edrv_auth.main(["status"]) == 0
    cold = capsys.readouterr().out
    assert "token: none cached" in cold
    assert fake_env.token_requests == 0
    token = edrv_auth.EdrvAuth().get_token()
    assert edrv_auth.main(["status"]) == 0
    out = capsys.readouterr().out
    assert str(clean_env) in out
    assert "expires in: 86" in out  # 86400 s minus a moment
    assert "scope: read:chargestations write:sessions" in out
    assert token not in out
    assert fake_env.token_requests == 1


def test_clear_removes_the_token(fake_env: FakeEdrv, capsys: pytest.CaptureFixture[str]) -> None:
    """`clear` forgets the token: the next `token` requests a new one."""
    auth = edrv_auth.EdrvAuth()
    auth.get_token()
    assert edrv_auth.main(["clear"]) == 0
    assert "cleared" in capsys.readouterr().out
    assert edrv_auth.main(["token"]) == 0
    assert fake_env.token_requests == 2


def test_api_key_mode(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """In API-key mode `token` prints the key (what curl needs) and `status` says the mode."""
    monkeypatch.setenv("EDRV_API_KEY", API_KEY)
    assert edrv_auth.main(["token"]) == 0
    assert capsys.readouterr().out == API_KEY + "\n"
    assert edrv_auth.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "API key" in out
    assert API_KEY not in out


@pytest.mark.parametrize(
    ("setup", "code", "expected"),
    [
        ("no-credentials", 2, "no eDRV credentials: set EDRV_CLIENT_ID and EDRV_CLIENT_SECRET"),
        ("wrong-secret", 1, "HTTP 401 access_denied"),
        ("endpoint-down", 1, "could not reach the token endpoint"),
        ("proxy-html", 1, "a proxy or gateway"),
        ("insecure-url", 2, "must use https"),
        ("wrong-token-path", 1, "HTTP 404 (no token endpoint at that URL: check EDRV_TOKEN_URL"),
    ],
)
def test_expected_failures_are_one_line_without_traceback(
    fake: FakeEdrv, clean_env: Path, leak_watch: LeakWatch, setup: str, code: int, expected: str
) -> None:
    """Each expected failure: the documented exit code, one stderr line, no traceback, no secret."""
    from conftest import CLIENT_SECRET

    env = {k: v for k, v in os.environ.items() if not k.startswith("EDRV_")}
    env.update(fake.environment(clean_env))
    if setup == "no-credentials":
        del env["EDRV_CLIENT_ID"], env["EDRV_CLIENT_SECRET"]
    elif setup == "wrong-secret":
        env["EDRV_CLIENT_SECRET"] = "test-wrong-secret"
    elif setup == "endpoint-down":
        env["EDRV_TOKEN_URL"] = "http://127.0.0.1:9/oauth/token"  # discard port: refused
    elif setup == "proxy-html":
        fake.queue_token_response(200, f"<html>proxy login {CLIENT_SECRET}</html>")
    elif setup == "insecure-url":
        env["EDRV_TOKEN_URL"] = "http://auth.example/oauth/token"
    elif setup == "wrong-token-path":
        env["EDRV_TOKEN_URL"] = fake.url + "/oauth/tokens"  # the fake answers 404 there
    result = run_cli("token", env=env)
    assert result.returncode == code
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edrv_auth: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert leak_watch.leaks(result.stderr, "test-wrong-secret") == []


def test_a_misspelled_variable_is_one_warning_line_on_stderr(
    fake_env: FakeEdrv, leak_watch: LeakWatch
) -> None:
    """The command line names a misspelled EDRV_* variable once on stderr, as `edrv_auth: ...`,
    without its value, and still works."""
    value = "test-misspelled-value-canary"
    leak_watch.secrets.add(value)
    env = dict(os.environ, EDRV_AUDIENCES=value)
    result = run_cli("token", env=env)
    assert result.returncode == 0
    assert result.stdout.strip() in fake_env.issued_tokens
    assert result.stderr == (
        "edrv_auth: EDRV_AUDIENCES is not a variable edrv_auth reads; did you mean EDRV_AUDIENCE?\n"
    )
    assert leak_watch.leaks(result.stdout, result.stderr) == []


def test_token_help_shows_the_safe_shell_form() -> None:
    """`token --help` shows the README's `token=$(...) && curl` form, not the inline `$(...)`
    that sends an empty header when no token could be had."""
    result = run_cli("token", "--help")
    assert result.returncode == 0
    assert 'token=$(python -m edrv_auth token) && curl -H "Authorization: Bearer $token"' in (
        result.stdout
    )
    assert "Bearer $(" not in result.stdout


def test_help_for_each_command() -> None:
    """`--help` works for the program and each command, and documents the exit codes."""
    main_help = run_cli("--help")
    assert main_help.returncode == 0
    assert "exit status:" in main_help.stdout
    for command in ("token", "status", "clear"):
        result = run_cli(command, "--help")
        assert result.returncode == 0
        assert f"python -m edrv_auth {command}" in result.stdout


@pytest.mark.parametrize(
    ("spelling", "usage"),
    [("module", "usage: python -m edrv_auth "), ("script", "usage: edrv-auth ")],
)
def test_help_names_the_command_as_invoked(tmp_path: Path, spelling: str, usage: str) -> None:
    """`--help` shows `python -m edrv_auth` or `edrv-auth`, whichever the user typed."""
    if spelling == "module":
        result = run_cli("--help")
    else:  # what pip's `edrv-auth` console script does
        script = tmp_path / "edrv-auth"
        script.write_text("import sys\nfrom edrv_auth import main\nsys.exit(main())\n")
        env = dict(os.environ, PYTHONPATH=str(MODULE_DIR))
        result = run_python(str(script), "--help", cwd=tmp_path, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage)


def test_usage_error_exits_2() -> None:
    """An unknown command is a usage error (exit 2), not a crash."""
    result = run_cli("bogus")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


@pytest.mark.posix_only  # a bash pipe
def test_broken_pipe_is_quiet(fake_env: FakeEdrv) -> None:
    """`status | head -1` ends without a BrokenPipeError traceback."""
    result = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m edrv_auth status | head -1"],  # a real pipe
        capture_output=True,
        text=True,
        timeout=30,
        cwd=MODULE_DIR,
        check=False,
    )
    assert result.stdout.startswith("cache: ")
    assert "Traceback" not in result.stderr


def test_fifo_in_place_of_the_cache_file_never_hangs(
    fake_env: FakeEdrv, clean_env: Path, leak_watch: LeakWatch
) -> None:
    """A FIFO where the cache file belongs blocks none of `status`, `clear` and `token`."""
    path = edrv_auth.EdrvAuth()._describe().file_cache.path
    clean_env.mkdir(mode=0o700)
    os.mkfifo(path, 0o600)
    for command in ("status", "clear", "token"):
        result = run_cli(command)  # a hang is a TimeoutExpired after 30 s
        assert leak_watch.leaks(result.stderr) == []
        assert (command, result.returncode, result.stderr) == (command, 0, "")
    assert result.stdout.strip() in fake_env.issued_tokens
    assert stat.S_ISREG(os.lstat(path).st_mode)  # the token's file replaced the FIFO
    assert fake_env.token_requests == 1


def test_clear_that_cannot_change_the_cache_says_so_and_exits_1(
    fake_env: FakeEdrv, clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`clear` on a cache folder it may not change names it, exits 1, and claims nothing."""
    token = edrv_auth.EdrvAuth().get_token()
    if os.geteuid() == 0:
        os.chown(clean_env, 65534, 65534)  # root may write anywhere: another user's folder
    else:  # pragma: no cover - the suite normally runs as root
        os.chmod(clean_env, 0o500)
    try:
        assert edrv_auth.main(["clear"]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith(f"edrv_auth: could not clear the cached token in {clean_env} (")
        assert err.count("\n") == 1
    finally:
        os.chown(clean_env, os.getuid(), os.getgid())
        os.chmod(clean_env, 0o700)
    assert edrv_auth.EdrvAuth().get_token() == token  # still cached: nothing was cleared
    assert fake_env.token_requests == 1


def test_ctrl_c_while_waiting_for_a_token_exits_130(fake_env: FakeEdrv) -> None:
    """SIGINT during a slow token request ends `token` with status 130 and no traceback."""
    fake_env.token_delay = 10
    with ctrl_c_reaches_children():
        child = subprocess.Popen(
            [sys.executable, "-m", "edrv_auth", "token"],
            cwd=MODULE_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        deadline = time.monotonic() + 20
        while fake_env.token_requests == 0:  # the request is in flight: the CLI waits on it
            assert time.monotonic() < deadline, "the CLI never asked for a token"
            time.sleep(0.01)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert (child.returncode, out) == (130, "")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("obtained_at", "scope"),
    [
        (None, "read\x1b]0;pwned\x07\x1b[2J\nfake line: all good"),  # escape codes, a new line
        (-1e300, "read"),  # a time no clock can show
    ],
)
def test_status_of_a_planted_record_is_plain_lines(
    fake_env: FakeEdrv,
    make_auth: MakeAuth,
    capsys: pytest.CaptureFixture[str],
    obtained_at: float | None,
    scope: str,
) -> None:
    """Whoever can write the cache cannot make `status` print escape codes, extra lines or
    a traceback."""
    import json

    now = time.time()
    record = {
        "version": 1,
        "token": {
            "access_token": "test-planted-token",
            "obtained_at": now if obtained_at is None else obtained_at,
            "expires_at": now + 3600 if obtained_at is None else obtained_at,
            "scope": scope,
        },
        "token_requests": [],
    }
    view = make_auth()._describe()
    assert view is not None
    _plant(view.file_cache.path, json.dumps(record).encode())
    assert edrv_auth.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\x07" not in out
    assert not any(line.startswith("fake line") for line in out.splitlines())
