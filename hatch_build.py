"""Build hook: how the one file `edrv_auth.py` becomes a typed package in the wheel.

The repository keeps a single vendorable module. A PEP 561 `py.typed` marker
only works for packages, so the wheel installs the file as
`edrv_auth/__init__.py` beside `py.typed`, plus `__main__.py` for
`python -m edrv_auth`.

An editable install (`pip install -e .`) gets none of these copies: it only
puts the repository's root on `sys.path` (`dev-mode-dirs` in pyproject.toml),
so `import edrv_auth` loads the working file and every edit is seen at once.
"""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: source in the repository -> path in the wheel
WHEEL_FILES = {
    "edrv_auth.py": "edrv_auth/__init__.py",
    "packaging/__main__.py": "edrv_auth/__main__.py",
    "packaging/py.typed": "edrv_auth/py.typed",
}


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"].update(WHEEL_FILES)
