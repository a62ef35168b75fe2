"""Development sessions, the same ones CI runs.

    nox                   # lint, typing, tests on every Python, lowest
    nox -s tests-3.12     # the tests on one Python
    nox -s tryout         # the offline try-out (examples/tryout.py)
    nox -s tests -- -k cli   # arguments after -- go to pytest

The Pythons are found on PATH (as GitHub's setup-python leaves them) or, when
pyenv is installed, in pyenv's versions folder, even those pyenv has not
activated.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import nox
from packaging.requirements import Requirement

nox.needs_version = ">=2024.3.2"  # nox.project.load_toml
nox.options.sessions = ["lint", "typing", "tests", "lowest"]

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]  # what pyproject.toml's classifiers claim
ROOT = Path(__file__).resolve().parent


def _pyenv_root() -> Path | None:
    if os.environ.get("PYENV_ROOT"):
        return Path(os.environ["PYENV_ROOT"])
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return None
    result = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=False)  # noqa: S603
    return Path(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else None


def _put_pyenv_pythons_on_path() -> None:
    """Put the newest pyenv-installed patch release of each claimed Python first on PATH.

    pyenv's shims only run the versions pyenv has activated; the interpreters
    themselves live in `$(pyenv root)/versions/X.Y.Z/bin`.
    """
    root = _pyenv_root()
    if root is None or not (root / "versions").is_dir():
        return
    found = []
    for python in PYTHONS:
        releases = []
        for folder in (root / "versions").iterdir():
            match = re.fullmatch(rf"{re.escape(python)}\.(\d+)", folder.name)
            if match and (folder / "bin" / f"python{python}").exists():
                releases.append((int(match.group(1)), folder / "bin"))
        if releases:
            found.append(str(max(releases)[1]))
    if found:
        os.environ["PATH"] = os.pathsep.join([*found, os.environ.get("PATH", "")])


_put_pyenv_pythons_on_path()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite, with the newest allowed dependencies."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHONS[0])
def lowest(session: nox.Session) -> None:
    """The test suite on the oldest Python with the lowest allowed direct dependencies.

    The floors are read from pyproject.toml: `requests`, `httpx`, `httpcore`,
    `filelock` and the `redis` extra are each pinned to their `>=` bound.
    """
    project = nox.project.load_toml(ROOT / "pyproject.toml")["project"]
    floors = {}
    for line in [*project["dependencies"], *project["optional-dependencies"]["redis"]]:
        requirement = Requirement(line)
        bounds = [spec.version for spec in requirement.specifier if spec.operator in (">=", "~=")]
        if len(bounds) != 1:
            session.error(f"{line!r} in pyproject.toml needs exactly one lower bound (>=)")
        floors[requirement.name] = bounds[0]
    constraints = Path(session.create_tmp()) / "lowest-constraints.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in floors.items()))
    session.log("lowest direct dependencies: " + ", ".join(constraints.read_text().split()))
    session.install("-c", str(constraints), "-e", ".[test,redis]")
    check = (
        "import sys\n"
        "from importlib.metadata import version\n"
        "from packaging.version import Version\n"
        f"floors = {floors!r}\n"
        "wrong = {n: version(n) for n, v in floors.items() if Version(version(n)) != Version(v)}\n"
        "print('installed:', {n: version(n) for n in floors})\n"
        "sys.exit(f'not the lowest versions: {wrong}' if wrong else 0)\n"
    )
    session.install("packaging")
    session.run("python", "-c", check)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict on the module as a vendored copy sees it (its hard dependencies only: no
    redis, and requests' own annotations, not types-requests), then with types-requests and
    every extra, with the typing test of the public API."""
    project = nox.project.load_toml(ROOT / "pyproject.toml")["project"]
    session.install(*project["dependencies"], "mypy>=1.10")
    # A reused environment (nox -r) still holds what the second step installs.
    session.run("python", "-m", "pip", "uninstall", "--yes", "--quiet", "redis", "types-requests")
    session.run("mypy", "--strict", "edrv_auth.py")
    session.install("-e", ".[test]", "types-requests")
    session.run("mypy", "--strict", "edrv_auth.py", "tests/typing_api.py")


@nox.session
def tryout(session: nox.Session) -> None:
    """The offline try-out: a fake eDRV on 127.0.0.1 and a token's whole life."""
    session.install("-e", ".")
    session.run("python", "examples/tryout.py")
