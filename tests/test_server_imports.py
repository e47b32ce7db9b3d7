"""The local service and the client import without Lightning, as their packages promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", ["lightning_moondream.server", "lightning_moondream.api"])
def test_package_imports_without_lightning(package: str) -> None:
    # A fresh interpreter: this one has Lightning loaded by other tests. Run from the
    # checkout's root, which ``-c`` puts first on the path, so this checkout is imported.
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, {package}; "
            "print(sorted(name for name in sys.modules "
            "if name.partition('.')[0] in ('lightning', 'pytorch_lightning')))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert completed.stdout.strip() == "[]", completed.stdout
