"""A virtual environment for a test that installs fedfill for real (not -e) without installing its
heavy dependencies again: the venv sees this test environment's packages (torch, flwr, and the
editable fedfill, which the venv's own copy must shadow) after its own.

`python -m venv --system-site-packages` cannot give that when the tests run in a venv (the
README's command makes one): a venv made from a venv sees the base interpreter's packages, not
the venv's, and on a fresh machine the base holds neither the dependencies nor a setuptools that
can build a wheel. A .pth file in the new venv adds this environment's site directories instead
(`site.addsitedir`, so their own .pth files, the editable install's finder among them, are read,
as --system-site-packages would read them).
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path


def venv_over_this_environment(path: Path) -> Path:
    """Make a venv at `path` (no pip of its own: this environment's pip installs into it with
    `pip --python`) that sees this environment's packages after its own; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    sites = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if p in sys.path]
    (Path(own) / "_this_test_environment.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in sites) + "\n")
    return python


def clean_environment() -> dict[str, str]:
    """os.environ less what would point a subprocess at this environment's interpreter or sources."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
