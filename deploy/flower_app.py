"""The Flower app (FAB) a run submits, written from the installed package.

The app directory holds only a pyproject.toml: Flower's `load_app` puts the installed FAB's
directory first on sys.path, finds no code there, and imports `server.app` / `client.app`
from the environment fedfill is installed in. So a wheel install, a container or a board
bundle runs exactly the installed code, with no source tree, and runtime dependency
installation has nothing to install. `fedfill run` uses this; the repository's own
pyproject.toml keeps a [tool.flwr.app] (for `flwr run .` from a checkout) that a test holds
equal to what is written here.
"""

from __future__ import annotations

from pathlib import Path

import fedfill
from fedfill.config import RunConfig, toml_value

PUBLISHER = "fedfill"
COMPONENTS = {"serverapp": "server.app:app", "clientapp": "client.app:app"}


def flower_app_pyproject(config: RunConfig | None = None) -> str:
    """pyproject.toml of the app: name, version, components and the run config's defaults."""
    config = config or RunConfig()
    lines = ["# Written by fedfill (deploy/flower_app.py): the components are imported from the",
             "# environment fedfill is installed in; this FAB carries no code.",
             "[project]", 'name = "fedfill"', f"version = {toml_value(fedfill.__version__)}",
             'description = "fedfill\'s ServerApp and ClientApp, from the installed fedfill package"', "",
             "[tool.flwr.app]", f"publisher = {toml_value(PUBLISHER)}", "",
             "[tool.flwr.app.components]",
             *(f"{name} = {toml_value(ref)}" for name, ref in COMPONENTS.items()), "",
             "[tool.flwr.app.config]",
             *(f"{key} = {toml_value(value)}" for key, value in config.to_run_config().items())]
    return "\n".join(lines) + "\n"


def write_flower_app(directory: Path, config: RunConfig | None = None) -> Path:
    """Write the app into `directory` (created; any other file there would go into the FAB,
    so it must hold nothing else) and return it, ready for `flwr run DIRECTORY`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    extra = sorted(p.name for p in directory.iterdir() if p.name != "pyproject.toml")
    if extra:
        raise ValueError(f"{directory} must hold only the app's pyproject.toml, found {', '.join(extra)}")
    (directory / "pyproject.toml").write_text(flower_app_pyproject(config))
    return directory
