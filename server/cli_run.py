"""`fedfill run`: the FIMI job on Flower, from one command.

--engine simulation: a simulation SuperLink (Ray) with N virtual SuperNodes.
--engine deployment: a real SuperLink and N SuperNodes as separate processes on loopback,
each node's device profile from --scenario when given.
Either way deploy/local.py starts every Flower process in its own process group, with a
private Flower home in the output directory and runtime dependency installation off; the
Flower app is written from the installed package (deploy/flower_app.py), so no source tree
is needed. It runs `flwr run`, shows each round as the report grows, and ends every process
it started.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from fedfill import contract
from fedfill.errors import UsageError
from fedfill.config import RunConfig, add_flags, run_config_toml
from server.report import read_rounds


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


def run(args) -> int:
    if args.num_partitions < 1 or args.rounds < 1:
        raise UsageError("--nodes and --rounds must be at least 1")
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
    if args.resume and not (out / "checkpoint.npz").exists():
        raise UsageError(f"nothing to resume: no checkpoint.npz in {out}")
    if not args.resume:  # a fresh run leaves no rows or plans of an older one behind
        for stale in [*out.glob("plan_round_*.json"), out / "rounds.csv", out / "drops.csv", out / "checkpoint.npz"]:
            stale.unlink(missing_ok=True)
    from deploy.flower_app import write_flower_app
    from deploy.local import LocalFederation, LocalSimulation, flower_environment, stop_group

    home = out / ".flwr"
    env = flower_environment(home)
    app_dir = write_flower_app(out / "app")
    print(f"fedfill run: {args.policy} on {args.dataset}, {args.num_partitions} nodes, {args.rounds} rounds, "
          f"{args.engine} engine -> {out}")
    started = time.monotonic()
    federation = generation = process = None
    shown, interrupted = 0, False
    # SIGTERM (kill, a scheduler) stops the run like Ctrl-C: the finally below ends every
    # process of the run, where Python's default would exit and leave them running.
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if generator_mode == "auto":
            from deploy.local import GenerationProcess

            generation = GenerationProcess(out / "logs", out / "generator-cache")
            generation.start()
            job = replace(job, generator_address=generation.address)
            print(f"  generation service up on {generation.address}")
        (out / "run_config.toml").write_text(run_config_toml(job))
        if args.engine == "simulation":
            federation = LocalSimulation(out / "logs", env=env)
            # Flower's simulation settings travel with the run, not in the connection
            # (`options.` there is deprecated in 1.41).
            simulation = ["--federation-config", f"num-supernodes={args.num_partitions} client-resources-num-cpus=1"]
        else:
            federation = LocalFederation(out / "logs", env=env, node_configs=node_configs)
            simulation = []
        federation.start()  # assigned first: an interrupted start is stopped below too
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedfill"\n\n[superlink.fedfill]\naddress = "{federation.address}"\n'
            "insecure = true\n")
        command = ["flwr", "run", str(app_dir), "fedfill", "--run-config", str(out / "run_config.toml"),
                   *simulation, "--stream"]
        with open(out / "flwr.log", "w") as log_file:
            process = subprocess.Popen(command, cwd=out, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                shown = _follow(process, out / "rounds.csv", started, args.timeout,
                                federation if args.engine == "deployment" else None)
            finally:
                stop_group(process)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: end every process of the run (below), no traceback
        print("fedfill run: interrupted, stopping every process of the run", file=sys.stderr)
        interrupted = True
    finally:
        if federation is not None:
            federation.stop()
        if generation is not None:
            generation.stop()
        signal.signal(signal.SIGTERM, previous_sigterm)
    if interrupted:
        return 130
    if process.returncode != 0 or shown <= args.rounds:  # rows 0..rounds, resumed or not
        tail = (out / "flwr.log").read_text(errors="replace").splitlines()[-15:]
        print("fedfill run: the Flower run did not finish; last lines of flwr.log:", *tail, sep="\n  ", file=sys.stderr)
        return 1
    print(f"report: {out}/rounds.csv, summary.json, accuracy.png, plan_round_N.json ({time.monotonic() - started:.0f} s)")
    return 0


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


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
    for config, device in zip(configs, devices):  # the contract's profile fields, under node-config keys
        config.update({contract.node_config_key(name): device[name]
                       for name in (*contract.PROFILE_FIELDS, *contract.OPTIONAL_PROFILE_FIELDS) if name in device})
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
