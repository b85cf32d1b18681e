"""fedfill's own wheel, for what carries fedfill to another machine (a board's bundle): fedfill
is on no package index, so the machine gets the very fedfill that wrote the bundle.

`build_fedfill_wheel` makes it from whichever fedfill is running:

- a source checkout (an editable install, or a checkout on sys.path): `pip wheel --no-deps`
  of a copy of the checkout, with pip's build isolation, so the build requirements are
  pyproject's (setuptools>=77), never what this interpreter happens to hold, and the copy leaves
  the checkout untouched (an in-tree build writes build/ and *.egg-info there, and a stale
  build/lib puts modules deleted since into the wheel);
- a non-editable install, which has no source tree to build: the installed distribution repacked
  as the wheel it was installed from (the files its RECORD lists, less what pip adds on install),
  with no build tools and no network.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from fedfill.errors import UsageError

DISTRIBUTION = "fedfill"
# The checkout this code runs from, or site-packages for a non-editable install.
ROOT = Path(__file__).resolve().parents[1]
# Never sources: version control, environments, build outputs, caches, run outputs, Flower app bundles.
_NOT_SOURCES = (".git", ".hg", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                ".pytest_cache", ".ruff_cache", ".mypy_cache", "runs", "*.fab")
_ADDED_ON_INSTALL = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip holds: the same files make the same wheel


def source_checkout() -> Path | None:
    """The source tree of the running fedfill (its pyproject.toml names the fedfill project), or
    None for an installed copy."""
    pyproject = ROOT / "pyproject.toml"
    try:
        name = tomllib.loads(pyproject.read_text())["project"]["name"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return None
    return ROOT if name == DISTRIBUTION else None


def build_fedfill_wheel(into: Path) -> Path:
    """Write the running fedfill's wheel into the directory `into` (made if absent); returns its path.
    A failed build (e.g. no package index to fetch setuptools from) raises UsageError."""
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    root = source_checkout()
    return _build_from_source(root, into) if root is not None else _repack_installed(into)


def _build_from_source(root: Path, into: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="fedfill-wheel-") as tmp:
        source, out = Path(tmp) / "source", Path(tmp) / "out"
        shutil.copytree(root, source, ignore=_ignore_non_sources, symlinks=True)
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                               "--disable-pip-version-check", "-w", str(out), str(source)],
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise UsageError(f"could not build fedfill's wheel from {root} (`pip wheel`, whose build isolation "
                             f"fetches setuptools from the package index):\n{(done.stdout + done.stderr)[-3000:]}")
        [wheel] = out.glob(f"{DISTRIBUTION}-*.whl")
        return Path(shutil.copy2(wheel, into / wheel.name))


def _ignore_non_sources(directory: str, names: list[str]) -> set[str]:
    ignored = set(shutil.ignore_patterns(*_NOT_SOURCES)(directory, names))
    # any virtual environment, whatever its name
    return ignored | {name for name in names if (Path(directory) / name / "pyvenv.cfg").is_file()}


def _repack_installed(into: Path) -> Path:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise UsageError(f"fedfill runs from {ROOT}, neither a source checkout nor an installed distribution: "
                         "no wheel of it can be made") from None
    files = list(dist.files or [])
    here = Path(__file__).resolve()
    if not any(dist.locate_file(f).resolve() == here for f in files):
        raise UsageError(f"the installed fedfill ({dist.locate_file('')}) is not the one running ({ROOT}): "
                         "no wheel of the running one can be made")
    [info] = {f.parts[0] for f in files if f.parts[0].endswith(".dist-info") and f.name == "METADATA"}
    scripts = {entry.name for entry in dist.entry_points if entry.group in ("console_scripts", "gui_scripts")}
    members: dict[str, bytes] = {}
    for file in files:
        if file.parts[0] == "..":  # the console scripts, which pip makes again from entry_points.txt
            if file.name not in scripts:
                raise UsageError(f"the installed fedfill has {file}, outside site-packages: it cannot be repacked "
                                 "as a wheel")
            continue
        if "__pycache__" in file.parts or (file.parts[0] == info and file.name in _ADDED_ON_INSTALL):
            continue
        members[file.as_posix()] = dist.locate_file(file).read_bytes()
    wheel_text = members.get(f"{info}/WHEEL", b"").decode()
    tags = [line.split(":", 1)[1].strip() for line in wheel_text.splitlines() if line.startswith("Tag:")]
    if not tags:  # an install with no WHEEL file: fedfill is pure Python
        tags = ["py3-none-any"]
        members[f"{info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: fedfill (deploy/wheel.py)\n"
                                    f"Root-Is-Purelib: true\nTag: {tags[0]}\n").encode()
    name = f"{DISTRIBUTION}-{dist.version.replace('-', '_')}-{tags[0]}.whl"
    path = into / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        # the .dist-info last, its RECORD at the very end, as wheels are written
        order = sorted(members, key=lambda member: (member.startswith(f"{info}/"), member))
        for member in order:
            _add(wheel, member, members[member])
        _add(wheel, f"{info}/RECORD", _record(members, f"{info}/RECORD"))
    return path


def _add(wheel: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    wheel.writestr(info, data)


def _record(members: dict[str, bytes], record: str) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for member, data in sorted(members.items()):
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        writer.writerow([member, f"sha256={digest}", len(data)])
    writer.writerow([record, "", ""])
    return out.getvalue().encode()
