"""deploy/docker/Dockerfile (CPU) and Dockerfile.jetson (arm64, never built here: no arm64
images nor emulation on our x86 machines) read with a small parser of Dockerfile instructions:
both parse, their final stages give the same environment, working directory and command, both
install offline (the Jetson one without touching its base's CUDA torch), and every command the
images are run with (their CMD, docker-compose.yml, deploy/testbed.py) exists in the image as a
console script of fedfill or Flower and takes the arguments it is given."""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import shlex
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import distribution
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CPU, JETSON = ROOT / "deploy" / "docker" / "Dockerfile", ROOT / "deploy" / "docker" / "Dockerfile.jetson"
INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
                "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}
# Programs the images' commands use that come with the base image, not with fedfill.
BASE_PROGRAMS = {"python3", "tc"}  # tc: iproute2, which BASE_IMAGE must have for link shaping


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values = {}
        for args in self.all("ENV"):
            words = shlex.split(args)
            if "=" not in words[0]:  # legacy `ENV KEY value with spaces`
                values[words[0]] = args.split(None, 1)[1].strip()
                continue
            for word in words:
                key, _, value = word.partition("=")
                values[key] = value
        return values


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARGs, stages) of a Dockerfile: continuation lines joined, comment lines dropped
    (also inside a continued instruction, as Docker does), one (KEYWORD, arguments) per
    instruction. Raises ValueError on an unknown instruction or one before the first FROM
    other than ARG."""
    logical, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    if pending:
        raise ValueError("the file ends inside a continued instruction")
    global_args, stages = {}, []
    for instruction in logical:
        keyword, _, args = instruction.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword not in INSTRUCTIONS:
            raise ValueError(f"unknown instruction {keyword!r}")
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"{keyword} before the first FROM")
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, args))
    if not stages:
        raise ValueError("no FROM")
    return global_args, stages


def _exec_form(args: str) -> list[str]:
    value = ast.literal_eval(args)  # JSON arrays of strings are Python literals too
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.fixture(scope="module")
def dockerfiles():
    return {path.name: parse_dockerfile(path.read_text()) for path in (CPU, JETSON)}


def test_both_parse_into_stages(dockerfiles):
    for name, (global_args, stages) in dockerfiles.items():
        assert "BASE_IMAGE" in global_args, name
        assert all(stage.base == "${BASE_IMAGE}" for stage in stages), name
        names = [stage.name for stage in stages]
        for i, stage in enumerate(stages):  # COPY --from names an earlier stage
            for args in stage.all("COPY"):
                if args.startswith("--from="):
                    assert args.split()[0].removeprefix("--from=") in names[:i], (name, args)


def test_the_parser_joins_continuations_and_skips_comments():
    _, [stage] = parse_dockerfile("ARG B=x\nFROM ${B}\nENV A=1 \\\n    # note\n    C=\"two words\"\nCMD [\"a\"]\n")
    assert stage.env() == {"A": "1", "C": "two words"} and _exec_form(stage.last("CMD")) == ["a"]
    with pytest.raises(ValueError):
        parse_dockerfile("FROM x\nRUNN true\n")


def test_final_stages_agree(dockerfiles):
    cpu, jetson = dockerfiles[CPU.name][1][-1], dockerfiles[JETSON.name][1][-1]
    assert jetson.env() == cpu.env()
    assert cpu.env()["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert jetson.last("WORKDIR") == cpu.last("WORKDIR") is not None
    assert _exec_form(jetson.last("CMD")) == _exec_form(cpu.last("CMD"))
    assert jetson.last("ENTRYPOINT") == cpu.last("ENTRYPOINT")
    assert jetson.last("USER") == cpu.last("USER")


def _pip_installs(stages: list[Stage]) -> list[list[str]]:
    """The argument lists of every `pip ... install` in the RUN instructions."""
    installs = []
    for stage in stages:
        for run in stage.all("RUN"):
            for command in run.split("&&"):
                words = shlex.split(command)
                if any(w.endswith("pip") for w in words) and "install" in words:
                    installs.append(words[words.index("install") + 1:])
    return installs


def test_both_install_offline_and_jetson_keeps_its_torch(dockerfiles):
    cpu_installs, jetson_installs = _pip_installs(dockerfiles[CPU.name][1]), _pip_installs(dockerfiles[JETSON.name][1])
    assert cpu_installs and jetson_installs
    assert all("--no-index" in words for words in cpu_installs + jetson_installs)
    for words in jetson_installs:  # no resolver that could replace the base's CUDA torch, no torch asked for
        assert "--no-deps" in words and not any(w.split("==")[0] in ("torch", "torchvision") for w in words), words
    global_args, stages = dockerfiles[JETSON.name]
    assert "r36" in global_args["BASE_IMAGE"]  # JetPack 6 (L4T r36)
    assert any("torch.version.cuda" in run for stage in stages for run in stage.all("RUN"))
    assert "NOT BUILT" in JETSON.read_text().split("ARG ", 1)[0]


# Where the images are run: their own CMD, the compose project, the Docker SDK testbed.
def _compose_commands() -> list[list[str]]:
    path = ROOT / "docker-compose.yml"
    if not path.exists():
        return []
    commands = []
    for service in yaml.safe_load(path.read_text())["services"].values():
        # what the container runs: its entrypoint (the image's has none) followed by its command
        entrypoint, command = service.get("entrypoint") or [], service.get("command") or []
        if isinstance(entrypoint, list) and isinstance(command, list) and entrypoint + command:
            commands.append(entrypoint + command)
        test = (service.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test[:1] == ["CMD"]:
            commands.append(test[1:])
    return commands


def _python_commands(path: Path) -> list[list[str]]:
    """List literals in a module that are commands for the image: the first element a constant
    naming a program of ours or the base's (after "CMD" in a healthcheck); elements computed
    at run time stand in as "1", starred ones are left out."""
    if not path.exists():
        return []
    known = set(_console_scripts()) | BASE_PROGRAMS
    commands = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.List) or not node.elts:
            continue
        words = [e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else
                 None if isinstance(e, ast.Starred) else "1" for e in node.elts]
        words = [w for w in words if w is not None]
        if words[:1] == ["CMD"]:
            words = words[1:]
        if words and isinstance(node.elts[0], ast.Constant) and words[0] in known:
            commands.append(words)
    return commands


def _console_scripts() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    flower = {e.name: e.value for e in distribution("flwr").entry_points if e.group == "console_scripts"}
    return {**flower, **project}


def _argument_errors(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(args)
        except SystemExit as exit_:  # 0: --help
            return (err.getvalue().strip() or f"exit {exit_.code}") if exit_.code else None
    return None


def _fedfill_parser(subcommand: str) -> argparse.ArgumentParser:
    """fedfill's parser with `subcommand`'s arguments, as fedfill.cli.main builds it."""
    import importlib

    from fedfill.cli import SUBCOMMANDS

    parser = argparse.ArgumentParser(prog="fedfill")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name)
        if name == subcommand:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def _flower_parser(program: str) -> argparse.ArgumentParser | None:
    """Flower 1.41's own parser of a program, where it has one we can reach."""
    if program == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

        return _parse_args_run_superlink()
    if program == "flower-supernode":
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

        return _parse_args_run_supernode()
    return None


def test_every_command_the_images_run_exists():
    scripts = _console_scripts()
    assert scripts.get("fedfill") == "fedfill.cli:main"
    commands = [_exec_form(parse_dockerfile(path.read_text())[1][-1].last("CMD")) for path in (CPU, JETSON)]
    commands += _compose_commands() + _python_commands(ROOT / "deploy" / "testbed.py")
    assert len(commands) > 2
    problems = []
    for command in commands:
        program, args = command[0], command[1:]
        if program in BASE_PROGRAMS:
            continue
        if program not in scripts:
            problems.append(f"{shlex.join(command)}: no console script {program!r} in fedfill or Flower")
            continue
        if program == "fedfill" and args[:1] in (["supernode"], ["superlink"]):  # its options, then Flower's
            args = _fedfill_parser(args[0]).parse_known_args(args)[1]
            parser = _flower_parser(f"flower-{command[1]}")
        elif program == "fedfill":
            parser = _fedfill_parser(args[0] if args else "")
        else:
            parser = _flower_parser(program)
        if parser is not None and (error := _argument_errors(parser, args)):
            problems.append(f"{shlex.join(command)}: {error.splitlines()[-1]}")
    assert not problems, "\n".join(problems)
