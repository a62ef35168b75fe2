"""What pip installs: the wheel, the sdist and an editable install, built by the real backend.

Each artifact is built by hatchling's PEP 517/660 hooks, as pip and `build` call
them. These tests need the source checkout; from an installed wheel they skip.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, run_python

pytestmark = pytest.mark.skipif(
    not (ROOT / "hatch_build.py").exists(), reason="needs the source checkout"
)

#: What the project needs to build (the sdist's own contents, minus tests and extras).
BUILD_INPUTS = ["pyproject.toml", "hatch_build.py", "edrv_auth.py", "packaging", "README.md"]
BUILD_INPUTS += ["LICENSE"]


def build(hook: str, source: Path, out: Path) -> Path:
    """Call `hatchling.build.<hook>(out)` in `source`, as a build frontend does."""
    pytest.importorskip("hatchling", reason="hatchling is in the test extra")
    out.mkdir(exist_ok=True)
    code = f"import hatchling.build as b; print(b.{hook}({str(out)!r}))"
    result = run_python("-c", code, cwd=source)
    assert result.returncode == 0, result.stderr
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built once for the tests that read it."""
    return build("build_wheel", ROOT, tmp_path_factory.mktemp("wheel"))


def test_wheel_holds_exactly_the_typed_package(wheel: Path) -> None:
    """The wheel installs edrv_auth/__init__.py (the module), __main__.py and py.typed, no more."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        module = archive.read("edrv_auth/__init__.py")
    dist_info = {name for name in names if name.startswith("edrv_auth-") and ".dist-info/" in name}
    assert names - dist_info == {
        "edrv_auth/__init__.py",
        "edrv_auth/__main__.py",
        "edrv_auth/py.typed",
    }
    assert {name.split(".dist-info/")[1] for name in dist_info} >= {
        "METADATA",
        "WHEEL",
        "RECORD",
        "entry_points.txt",
        "licenses/LICENSE",
    }
    assert module == (ROOT / "edrv_auth.py").read_bytes()


def test_wheel_metadata_links_somewhere_real(wheel: Path) -> None:
    """`pip show` and the index list a project URL, and only real ones: the service it is for,
    no placeholder for a repository that has no public home."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(name).decode()
    urls = [
        line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Project-URL:")
    ]
    assert urls == ["eDRV, https://edrv.io"]


def test_sdist_holds_the_sources_tests_and_docs(tmp_path: Path) -> None:
    """The sdist carries the module, the build hook, tests, README, LICENSE and CHANGELOG."""
    sdist = build("build_sdist", ROOT, tmp_path)
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = {
        "edrv_auth.py",
        "hatch_build.py",
        "packaging/__main__.py",
        "packaging/py.typed",
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "CHANGELOG.md",
        "tests/conftest.py",
        "tests/fake_edrv.py",
        "tests/test_packaging.py",
    }
    assert expected <= names
    assert not any(name.startswith((".git/", ".ci/", ".github/")) for name in names)


def test_editable_install_imports_the_working_file(tmp_path: Path) -> None:
    """`pip install -e .` imports the project's edrv_auth.py itself: an edit shows at once."""
    project = tmp_path / "project"
    project.mkdir()
    for name in BUILD_INPUTS:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name)
        else:
            shutil.copy2(source, project / name)
    wheel = build("build_editable", project, tmp_path / "dist")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        # No copy of the module, only a path entry pointing at the project.
        assert not [name for name in archive.namelist() if name.startswith("edrv_auth/")]
        archive.extractall(site)  # noqa: S202 - the wheel just built

    # A fresh interpreter that sees this "site-packages" first, then ours for the
    # dependencies (where an installed edrv_auth, if any, comes too late to matter).
    probe = (
        "import site, sys\n"
        f"site.addsitedir({str(site)!r})\n"
        "for path in site.getsitepackages():\n"
        "    site.addsitedir(path)\n"
        "import edrv_auth\n"
        "print(edrv_auth.__file__)\n"
        "print(getattr(edrv_auth, 'EDITED', False))\n"
    )

    def run_probe() -> list[str]:
        result = run_python("-S", "-c", probe, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    module = project / "edrv_auth.py"
    assert run_probe() == [str(module), "False"]
    with module.open("a", encoding="utf-8") as file:
        file.write("\nEDITED = True\n")
    assert run_probe() == [str(module), "True"]
