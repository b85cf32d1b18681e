"""fedfill as a user installs it: the Flower app comes from the installed package, not a
source tree, and the repository's own Flower app says the same as the generated one.

The slow test builds a real non-editable install into a venv and runs `fedfill run` from
outside the repository (~1 min on 2 cores, most of it Ray's start).
"""

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from deploy.flower_app import COMPONENTS, flower_app_pyproject, write_flower_app
from fedfill.config import RunConfig
from tests.venvs import clean_environment, venv_over_this_environment

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_flower_app_matches_the_generated_one():
    """`flwr run .` from a checkout and `fedfill run` submit the same components and defaults."""
    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    generated = tomllib.loads(flower_app_pyproject())["tool"]["flwr"]["app"]
    assert ours["config"] == RunConfig().to_run_config() == generated["config"]
    assert ours["components"] == generated["components"] == COMPONENTS
    assert ours["publisher"] == generated["publisher"]


def test_licence_and_citation_agree_with_the_package_metadata():
    """One licence (Apache-2.0, its text in LICENSE) and one version, in pyproject.toml and
    CITATION.cff alike; Flower's build reads [project].license."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    citation = dict(re.findall(r"^([a-z-]+): *(\S.*)$", (ROOT / "CITATION.cff").read_text(), re.M))
    assert (citation["cff-version"], citation["title"]) == ("1.2.0", project["name"])
    assert (citation["license"], citation["version"]) == (project["license"], project["version"])


def test_flower_builds_a_fab_without_code_and_finds_the_installed_components(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate
    import io
    import zipfile

    app = write_flower_app(tmp_path / "app", RunConfig(rounds=3))
    # check_module=True: Flower looks the components up as `flwr run` does, here in this
    # interpreter's installed packages (the app directory holds no module)
    config, _ = load_and_validate(app / "pyproject.toml", check_module=True)
    assert config["tool"]["flwr"]["app"]["config"]["rounds"] == 3
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert sorted(names) == [".info/CONTENT", "pyproject.toml"]
    (app / "stray.py").write_text("")
    with pytest.raises(ValueError, match="stray.py"):
        write_flower_app(app)


@pytest.mark.slow
def test_fedfill_run_from_a_non_editable_install(tmp_path):
    """pip install (not -e) into a venv that sees this environment's packages (torch, flwr, and
    the editable fedfill, which the venv's own copy must shadow), then `fedfill run` from a
    directory outside the repository: the apps import the venv's fedfill.

    The wheel is built as a user's `pip install .` builds it: by this environment's pip, with
    pip's build isolation (setuptools as pyproject's build-system asks, from the package index),
    never with whatever setuptools an interpreter happens to hold (a fresh base interpreter's,
    without `wheel`, cannot build one). It is built here rather than by the venv's interpreter,
    whose isolated build would still see this environment's packages, its setuptools among
    them, through the venv's .pth."""
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info into its tree
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs", ".venv"))
    venv = tmp_path / "venv"
    python = venv_over_this_environment(venv)
    env = clean_environment()
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                            "--quiet", "-w", str(tmp_path / "wheel"), str(source)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp_path / "wheel").glob("fedfill-*.whl")
    # --ignore-installed: the editable fedfill the venv sees is left as it is, never uninstalled
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", "--ignore-installed", "--disable-pip-version-check", "--quiet",
                                str(wheel)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    shutil.rmtree(source)  # nothing may depend on a source tree from here on

    site = subprocess.run([str(python), "-c", "import fedfill, server.app; print(fedfill.__file__)"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert site.returncode == 0, site.stderr
    assert Path(site.stdout.strip()).is_relative_to(venv), site.stdout

    out = tmp_path / "run"
    done = subprocess.run([str(python), "-m", "fedfill", "run", "--nodes", "2", "--rounds", "1", "--generator", "none",
                           "--out", str(out), "--timeout", "300"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    environment = json.loads((out / "summary.json").read_text())["environment"]
    fedfill_dir = Path(environment["fedfill"])
    assert fedfill_dir.is_relative_to(venv) and not fedfill_dir.is_relative_to(ROOT), environment
    assert Path(environment["python"]) == python, "the ServerApp ran on another interpreter"
    assert not (out / ".flwr" / "runtime-envs").exists()
