"""`fedfill run`: the FIMI job on Flower, from one command.

--engine simulation: a local simulation SuperLink (Ray) with N virtual SuperNodes.
--engine deployment: a real SuperLink and N SuperNodes as separate processes on loopback
(deploy/local.py), each node's device profile from --scenario when given.
Either way it writes a private Flower home into the output directory, runs `flwr run`,
shows each round as the report grows, and ends every process it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from fedfill.errors import UsageError
from fedfill.config import RunConfig, add_flags, run_config_toml
from server.report import read_rounds
from deploy.local import free_port

PROJECT_DIR = Path(__file__).resolve().parents[1]


def add_arguments(parser) -> None:
    from fedfill.job import JOBS
    from strategies.allocation import POLICIES

    parser.add_argument("--engine", choices=("simulation", "deployment"), default="simulation",
                        help="Flower's simulation engine (Ray) or its deployment engine (real SuperLink/SuperNode processes)")
    parser.add_argument("--scenario", help="scenario JSON whose device i profiles SuperNode i (deployment engine)")
    parser.add_argument("--generator", default="auto", metavar="auto|none|HOST:PORT",
                        help="auto (default): start the generation service with the shipped digits checkpoint; "
                             "none: no synthetic data; HOST:PORT: a running service")
    parser.add_argument("--out", default="runs/latest", help="report directory (default: runs/latest)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    add_flags(parser, choices={"policy": POLICIES, "job": tuple(JOBS)})


def _end_processes_mentioning(marker: str) -> None:
    """SIGTERM (then SIGKILL) every process whose command line holds marker, with its group."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pid = int(pid_dir.name)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(os.getpgid(pid), sig)
                    time.sleep(1.0)
                except (ProcessLookupError, PermissionError):
                    break


def run(args) -> int:
    if args.num_partitions < 1 or args.rounds < 1:
        raise UsageError("--nodes and --rounds must be at least 1")
    if not (PROJECT_DIR / "pyproject.toml").exists():
        raise UsageError(f"fedfill must be installed from its source tree (pip install -e); no pyproject.toml in {PROJECT_DIR}")
    if args.dataset != "digits":
        from fedfill.data import load_dataset

        try:  # fail here, with the reason, rather than inside every ClientApp
            load_dataset(args.dataset, args.data_dir or None)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(str(err)) from None
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    generator_mode = args.generator
    if generator_mode == "auto" and args.dataset != "digits":
        print("fedfill run: no shipped generator for this dataset; train one with `fedfill generator train` "
              "and pass --generator HOST:PORT of its service. Running without synthetic data.")
        generator_mode = "none"
    job = RunConfig.from_args(args, out_dir=str(out),
                              generator_address="" if generator_mode in ("auto", "none") else generator_mode)
    node_configs = _node_configs(args)
    home = out / ".flwr"
    home.mkdir(exist_ok=True)
    control_port = free_port()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_DISABLE_UPDATE_CHECK": "1"}
    if args.resume and not (out / "checkpoint.npz").exists():
        raise UsageError(f"nothing to resume: no checkpoint.npz in {out}")
    if not args.resume:  # a fresh run leaves no rows or plans of an older one behind
        for stale in [*out.glob("plan_round_*.json"), out / "rounds.csv", out / "drops.csv", out / "checkpoint.npz"]:
            stale.unlink(missing_ok=True)
    print(f"fedfill run: {args.policy} on {args.dataset}, {args.num_partitions} nodes, {args.rounds} rounds, "
          f"{args.engine} engine -> {out}")
    started = time.monotonic()
    federation = generation = None
    try:
        if generator_mode == "auto":
            from deploy.local import GenerationProcess

            generation = GenerationProcess(out / "logs", out / "generator-cache").start()
            job = replace(job, generator_address=generation.address)
            print(f"  generation service up on {generation.address}")
        (out / "run_config.toml").write_text(run_config_toml(job))
        if args.engine == "simulation":
            connection = "local"
            (home / "config.toml").write_text(
                '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
                f"options.num-supernodes = {args.num_partitions}\noptions.backend.client-resources.num-cpus = 1\n")
        else:
            from deploy.local import LocalFederation

            federation = LocalFederation(out / "logs", node_configs).start()
            connection = "testbed"
            (home / "config.toml").write_text(
                f'[superlink]\ndefault = "testbed"\n\n[superlink.testbed]\naddress = "{federation.address}"\n'
                "insecure = true\n")
        command = ["flwr", "run", str(PROJECT_DIR), connection, "--run-config", str(out / "run_config.toml"), "--stream"]
        with open(out / "flwr.log", "w") as log_file:
            process = subprocess.Popen(command, cwd=PROJECT_DIR, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                shown = _follow(process, out / "rounds.csv", started, args.timeout, federation)
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(timeout=30)
    finally:
        if federation is not None:
            federation.stop()
        if generation is not None:
            generation.stop()
        _end_processes_mentioning(f"127.0.0.1:{control_port}")
    if process.returncode != 0 or shown <= args.rounds:  # rows 0..rounds, resumed or not
        tail = (out / "flwr.log").read_text(errors="replace").splitlines()[-15:]
        print("fedfill run: the Flower run did not finish; last lines of flwr.log:", *tail, sep="\n  ", file=sys.stderr)
        return 1
    print(f"report: {out}/rounds.csv, summary.json, accuracy.png, plan_round_N.json ({time.monotonic() - started:.0f} s)")
    return 0


def _node_configs(args) -> list[dict]:
    """Each SuperNode's --node-config: its partition and, from --scenario, its device profile."""
    configs = [{"partition-id": k, "num-partitions": args.num_partitions} for k in range(args.num_partitions)]
    if not args.scenario:
        return configs
    from strategies.allocation import ScenarioError, load_scenario

    try:
        devices = load_scenario(args.scenario).to_json()["devices"]
    except ScenarioError as err:
        raise UsageError(str(err)) from None
    if len(devices) != args.num_partitions:
        raise UsageError(f"the scenario {args.scenario} has {len(devices)} devices but --nodes is {args.num_partitions}")
    for config, device in zip(configs, devices):
        config.update({"f-max-hz": device["f_max_hz"], "eps": device["eps"], "p-max-w": device["p_max_w"],
                       "gain": device["gain"], "bits": device["bits"]})
        if "quant_error" in device:
            config["quant-error"] = device["quant_error"]
    return configs


def _follow(process: subprocess.Popen, rounds_csv: Path, started: float, timeout: float, federation=None) -> int:
    """Print each new report row while Flower runs; returns how many rows were shown."""
    from rich.console import Console

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    shown, reported_dead = 0, set()
    while True:
        finished = process.poll() is not None
        if rounds_csv.exists():
            rows = read_rounds(rounds_csv)
            for row in rows[shown:]:
                dropped = row["dropped"]
                console.print(f"  round [bold]{row['round']:3d}[/]  accuracy [green]{row['accuracy']:.4f}[/]  "
                              f"energy {row['energy_j']:9.3f} J  uplink {row['uplink_bytes'] / 1e6:8.2f} MB  "
                              f"synthetic {row['synthetic_used']:5d}  "
                              + (f"[red]dropped {dropped}[/]  " if dropped else "dropped 0  ")
                              + f"[dim][{time.monotonic() - started:5.0f} s][/]")
            shown = len(rows)
        if federation is not None:
            for name in set(federation.check_alive()) - reported_dead:
                print(f"  {name} exited (see its log); the run goes on without it", file=sys.stderr, flush=True)
                reported_dead.add(name)
        if finished:
            return shown
        if time.monotonic() - started > timeout:
            print(f"fedfill run: no end after {timeout:.0f} s, stopping", file=sys.stderr)
            return shown
        time.sleep(1.0)
