"""The house's import rules, read from the code itself (every import statement, including the
ones inside functions, since a lazy import is still a dependency):

- the allocation solvers import only numpy, scipy and the standard library;
- the shared core (fedfill/) imports no role (server, client, strategies, generation, deploy);
- the client never imports the server or the strategy, and the server never the client;
- product code uses Flower's public API only (no flwr.common.serde, no flwr.supercore).

And one rule read from a running interpreter: loading the ClientApp loads neither the
strategy nor the solvers' scipy.optimize (a fresh ClientApp process pays for every import).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("server", "client", "strategies", "generation", "deploy")
GENERATED = {"generation_pb2.py", "generation_pb2_grpc.py"}


def imports_of(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from x import submodule`
    return names


def files_under(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if p.name not in GENERATED)


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_rules_see_imports_inside_functions():
    """The reader itself: a lazy import counts (the ClientApp imports the codec inside a function)."""
    assert "fedfill.codec" in imports_of(ROOT / "client" / "app.py")


@pytest.mark.parametrize("path", files_under("strategies/allocation"), ids=lambda p: p.name)
def test_allocation_solvers_import_only_numpy_scipy_and_the_standard_library(path):
    allowed = {"numpy", "scipy", "strategies", "__future__"} | set(sys.stdlib_module_names)
    foreign = {name for name in imports_of(path) if top(name) not in allowed}
    inside = {name for name in imports_of(path) if top(name) == "strategies" and not name.startswith("strategies.allocation")}
    assert not foreign | inside, f"{path.name} imports {sorted(foreign | inside)}"


@pytest.mark.parametrize("path", files_under("fedfill"), ids=lambda p: p.name)
def test_the_shared_core_imports_no_role(path):
    roles = {name for name in imports_of(path) if top(name) in ROLES}
    assert not roles, f"{path.name} imports {sorted(roles)}"


@pytest.mark.parametrize("path", files_under("client"), ids=lambda p: p.name)
def test_the_client_imports_neither_server_nor_strategy(path):
    bad = {name for name in imports_of(path)
           if top(name) == "server" or name.startswith("strategies.fimi_strategy") or name == "strategies.allocation"}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", files_under("server", "strategies"), ids=lambda p: p.name)
def test_the_server_side_never_imports_the_client(path):
    assert not {name for name in imports_of(path) if top(name) == "client"}


@pytest.mark.parametrize("path", files_under("fedfill", "server", "client", "strategies", "generation", "deploy"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_product_code_uses_flowers_public_api(path):
    internals = ("flwr.common.serde", "flwr.supercore", "flwr.proto", "flwr.server", "flwr.cli", "flwr.supernode")
    private = {name for name in imports_of(path) if any(name == m or name.startswith(m + ".") for m in internals)}
    wrapped = WRAPPED_FLOWER_INTERNALS.get(str(path.relative_to(ROOT)), set())
    private = {name for name in private if not any(name == w or name.startswith(w + ".") for w in wrapped)}
    assert not private, f"{path.name} imports {sorted(private)}"


# The one wrapper of Flower internals, pinned to the flwr it was written for (FLOWER_VERSION
# there; tests/test_warm_clientapp.py checks that the waits it wraps are still there).
WRAPPED_FLOWER_INTERNALS = {
    "client/supernode.py": {"flwr.supernode.start_client_internal", "flwr.supernode.cli.flower_supernode"}}


def test_loading_the_client_app_loads_no_solver_and_no_strategy():
    code = ("import sys, client.app; "
            "from strategies.allocation.augmentation import synthetic_request; "
            "from strategies.allocation.presets import drawn_device_profile; "
            "drawn_device_profile('fimi', 1, 3, 0); drawn_device_profile('ondemand', 1, 3, 0); "
            "synthetic_request('fimi', [3, 0, 1], 4); "
            "bad = [m for m in ('strategies.fimi_strategy', 'strategies.allocation.policies', 'scipy.optimize', "
            "'server', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
