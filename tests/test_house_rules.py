"""The house's import rules, read from the code itself (every import statement, including the
ones inside functions, since a lazy import is still a dependency).

The layer rule (docs/architecture.md), bottom to top; a module imports only from layers below
its own, or from its own package:

    0  fedfill (the shared core), strategies.allocation (the solvers: numpy, scipy, stdlib only)
    1  generation (the generator, its pipelines, trainers and service)
    2  jobs (what a device trains), strategies (the Flower strategy glue)
    3  server (what the ServerApp process loads), client (the ClientApp and SuperNode)
    4  deploy (processes, images, PKI, the testbed, board bundles)
    5  commands (the operator's commands)
    6  bench

Nothing imports commands or bench. Module paths written as strings obey the same rule: the
CLI's subcommand table names commands only, the JOBS table names jobs only, and the warm
SuperNode's preload list names only what the client layer may import. Besides the layers:
the client never imports the strategy glue nor the allocation package's __init__ (it pulls
scipy.optimize); the server never imports the client; product code uses Flower's public API
only (no flwr.common.serde, no flwr.supercore), but for one version-pinned wrapper.

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
ROLES = ("server", "client", "strategies", "generation", "jobs", "deploy", "commands")
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


# package -> layer; "strategies" is the glue, "strategies.allocation" the solvers below it
LAYERS = {"fedfill": 0, "strategies.allocation": 0, "generation": 1, "jobs": 2, "strategies": 2, "server": 3,
          "client": 3, "deploy": 4, "commands": 5, "bench": 6}


def package_of(module: str) -> str | None:
    """The layer package a module name belongs to; None for anything not ours."""
    if module == "strategies.allocation" or module.startswith("strategies.allocation."):
        return "strategies.allocation"
    return top(module) if top(module) in LAYERS else None


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_breaks(importer: str, imported: set[str]) -> list[str]:
    """The imported modules of ours that `importer` may not import: those of a layer not below
    its own, outside its own package."""
    own = package_of(importer)
    return sorted(name for name in imported
                  if (pkg := package_of(name)) is not None and pkg != own and LAYERS[pkg] >= LAYERS[own])


def test_the_layer_rule_itself():
    """The rule reads imports as meant: down is allowed, up and sideways are not."""
    assert layer_breaks("commands.run", {"server.report", "deploy.local", "fedfill.config"}) == []
    assert layer_breaks("server.app", {"commands.run", "client.app", "jobs"}) == ["client.app", "commands.run"]
    assert layer_breaks("strategies.allocation.fimi", {"strategies.fimi_strategy"}) == ["strategies.fimi_strategy"]
    assert layer_breaks("strategies.fimi_strategy", {"strategies.allocation.costs"}) == []
    assert layer_breaks("fedfill.data", {"generation.config"}) == ["generation.config"]


@pytest.mark.parametrize("path", files_under(*(p.replace(".", "/") for p in LAYERS if p != "strategies.allocation")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_imports_only_from_the_layers_below_it(path):
    breaks = layer_breaks(module_of(path), imports_of(path))
    assert not breaks, f"{path.relative_to(ROOT)} imports {breaks} (see the layer rule above)"


def test_the_modules_named_as_strings_keep_the_layer_rule_too():
    """Module paths in tables are imports all the same: each names a module that exists, in
    the layer its table is for."""
    import importlib.util

    from client.app import WARM_IMPORTS
    from fedfill.cli import SUBCOMMANDS
    from jobs import JOBS

    named = {"fedfill.cli's SUBCOMMANDS": ([m for m, _ in SUBCOMMANDS.values()], {"commands"}),
             "jobs.JOBS": ([v.split(":")[0] for v in JOBS.values()], {"jobs"}),
             "client.app's WARM_IMPORTS": ([m for m in WARM_IMPORTS if package_of(m)],
                                           {p for p, layer in LAYERS.items() if layer <= LAYERS["client"]} - {"server"})}
    for table, (modules, allowed) in named.items():
        for module in modules:
            assert package_of(module) in allowed, f"{table} names {module}, outside {sorted(allowed)}"
            assert importlib.util.find_spec(module) is not None, f"{table} names {module}, which does not exist"
    assert not layer_breaks("client.app", set(named["client.app's WARM_IMPORTS"][0]) - {"strategies.fimi_strategy"})
    assert "strategies.fimi_strategy" not in named["client.app's WARM_IMPORTS"][0]


def test_nothing_imports_the_commands():
    importers = [str(p.relative_to(ROOT)) for p in files_under(*(k for k in LAYERS if "." not in k and k != "commands"))
                 if top(module_of(p)) != "bench" and any(top(n) == "commands" for n in imports_of(p))]
    assert not importers, f"{importers} import the operator's commands"


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


@pytest.mark.parametrize("path", files_under("fedfill", "server", "client", "strategies", "generation", "jobs", "deploy",
                                                 "commands"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_product_code_uses_flowers_public_api(path):
    internals = ("flwr.common.serde", "flwr.supercore", "flwr.proto", "flwr.server", "flwr.cli", "flwr.supernode")
    private = {name for name in imports_of(path) if any(name == m or name.startswith(m + ".") for m in internals)}
    wrapped = WRAPPED_FLOWER_INTERNALS.get(str(path.relative_to(ROOT)), set())
    private = {name for name in private if not any(name == w or name.startswith(w + ".") for w in wrapped)}
    assert not private, f"{path.name} imports {sorted(private)}"


# The wrappers of Flower internals, each pinned to the flwr it was written for (FLOWER_VERSION
# there) with a test that fails when an upgrade changes what it wraps: the SuperNode's waits
# and heartbeat (tests/test_warm_clientapp.py, tests/test_replies_apart.py), the fault
# injector's hold in the SuperNode's push, the ServerApp's pull split in two
# (tests/test_replies_apart.py: the sha256 of HttpGrid.pull_messages), and the SuperLink's
# SQLite busy timeout (tests/test_flower_under_load.py).
WRAPPED_FLOWER_INTERNALS = {
    "client/supernode.py": {"flwr.supernode.start_client_internal", "flwr.supernode.cli.flower_supernode",
                            "flwr.supercore.heartbeat", "flwr.supernode.fleet_http_connection"},
    "client/faults.py": {"flwr.supernode.start_client_internal"},
    "server/timed_grid.py": {"flwr.proto.message_pb2", "flwr.proto.runtime_pb2", "flwr.supercore.constant",
                             "flwr.supercore.date", "flwr.supercore.inflatable"},
    "server/superlink.py": {"flwr.supercore.constant", "flwr.supercore.sql_mixin"}}


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
