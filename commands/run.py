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

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from fedfill import contract
from fedfill.errors import UsageError
from fedfill.config import RunConfig, add_flags, run_config_toml, sampled_count
from fedfill.data import real_dataset
from server.report import read_rounds


def add_run_flags(parser, skip: tuple[str, ...] = ()) -> None:
    """The run-config flags of `fedfill run` and `fedfill testbed run`, each checked as it is
    parsed: the jobs and bit rules as choices, a policy by the planner's own parser."""
    from fedfill.config import SYNTHETIC_USES
    from jobs import JOBS
    from strategies.allocation.policies import parse_policy

    def policy(name: str) -> str:
        try:
            parse_policy(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return name

    add_flags(parser, choices={"job": tuple(JOBS), "bits_rule": ("codec", "theorem1"), "trainable": ("full", "lora"),
                               "synthetic_use": SYNTHETIC_USES},
              types={"policy": policy}, skip=skip)


def add_arguments(parser) -> None:
    parser.add_argument("--engine", choices=("simulation", "deployment"), default="simulation",
                        help="Flower's simulation engine (Ray) or its deployment engine (real SuperLink/SuperNode processes)")
    parser.add_argument("--clientapp", choices=("warm", "flower"), default="warm",
                        help="deployment engine: warm (default) starts each task's ClientApp from a process that "
                             "imported Flower and the app once (fedfill supernode); flower: Flower's SuperNode as "
                             "it ships")
    parser.add_argument("--scenario", help="scenario JSON whose device i profiles SuperNode i (deployment engine)")
    parser.add_argument("--kill-at", action="append", default=[], metavar="NODE:ROUND:PHASE",
                        help="deployment engine, fault injection: kill SuperNode NODE (its partition, from 0) in "
                             "PHASE (train or upload) of ROUND, once its log shows it there; repeat for more nodes")
    parser.add_argument("--generator", default="auto", metavar="auto|none|HOST:PORT",
                        help="auto (default): start the generation service with the generator shipped for the "
                             "dataset (digits, mnist5k); "
                             "none: no synthetic data; HOST:PORT: a running service")
    parser.add_argument("--generator-checkpoint", metavar="DIR",
                        help="with --generator auto: the checkpoint the service serves (default: the diffusion model "
                             "shipped for the dataset; generation/checkpoints/DATASET-gan is the GAN baseline's)")
    parser.add_argument("--ray-address", metavar="HOST:PORT|auto",
                        help="simulation engine: run the ClientApps on the Ray cluster whose head is at HOST:PORT "
                             "(what `ray start --head` prints; auto: the one `ray start` left on this machine); "
                             "default: $RAY_ADDRESS, else a Ray of the run's own on this machine")
    parser.add_argument("--client-cpus", type=int, default=1, metavar="N",
                        help="simulation engine: CPUs Ray reserves for each ClientApp (a whole number; default 1)")
    parser.add_argument("--client-gpus", type=float, default=0.0, metavar="F",
                        help="simulation engine: the share of a GPU Ray reserves for each ClientApp (0.25: four "
                             "share a GPU; default 0)")
    parser.add_argument("--superlink", metavar="HOST:PORT",
                        help="run on a SuperLink that is already up with its nodes (a testbed, boards) instead of "
                             "starting an engine; the report directory must be the same path on its machine")
    parser.add_argument("--root-certificates", metavar="CA_CERT",
                        help="with --superlink: the CA of its TLS certificate (without it: plaintext)")
    parser.add_argument("--out", default="runs/latest", help="report directory (default: runs/latest)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    add_run_flags(parser)


def checked_job(args) -> tuple[RunConfig, str]:
    """The run's settings from the flags, and how it gets its generator (auto, none or an
    address), with everything checked (commands.checks) before any process starts."""
    from commands.checks import check_job

    check_launcher_options(args)
    generator_mode = args.generator
    if generator_mode == "auto" and args.job == "ddpm":
        generator_mode = "none"  # the ddpm job trains on local data only ([ODQ])
    if generator_mode == "auto" and args.generator_checkpoint:
        from commands.checks import check_generator

        check_generator("--generator-checkpoint", args.generator_checkpoint, RunConfig.from_args(args))
    elif generator_mode == "auto":
        from generation.config import CheckpointError, shipped_checkpoint

        try:
            shipped_checkpoint(args.dataset)
        except CheckpointError as err:
            print(f"fedfill run: {err}, and pass --generator-checkpoint DIR (or --generator HOST:PORT of its "
                  "service). Running without synthetic data.")
            generator_mode = "none"
    if generator_mode == "auto" and args.superlink:
        raise UsageError("with --superlink, name the generation service its nodes reach (--generator HOST:PORT) "
                         "or run without one (--generator none)")
    if generator_mode == "none" and args.synthetic_use != "labelled":
        raise UsageError(f"--synthetic-use {args.synthetic_use}: the synthetic samples come from a generation "
                         "service; use --generator auto or HOST:PORT")
    if generator_mode == "none" and args.delivery != "image":
        raise UsageError(f"--delivery {args.delivery}: the devices share the sampling with a generation service; "
                         "use --generator auto or HOST:PORT")
    checkpoint = str(Path(args.generator_checkpoint).resolve()) if args.generator_checkpoint else ""
    traces = str(Path(args.traces).resolve()) if args.traces else ""  # the ServerApp runs elsewhere
    job = RunConfig.from_args(args, out_dir=str(Path(args.out).resolve()), generator_checkpoint=checkpoint, traces=traces,
                              generator_address="" if generator_mode in ("auto", "none") else generator_mode)
    # a scenario profiles the deployment engine's nodes; a SuperLink's nodes are someone else's
    configs = [] if args.superlink else node_configs(args.num_partitions, args.scenario) if args.scenario else None
    check_job(job, configs, with_generator=generator_mode != "none")
    from jobs import forget_data

    forget_data()  # the checks drew the devices' data (and warmed its disk cache); the driver keeps none
    return job, generator_mode


def check_launcher_options(args) -> None:
    """The options of `fedfill run` that are not run settings: the engine, the addresses, the
    files and the report directory."""
    if args.scenario and (args.engine != "deployment" or args.superlink):
        raise UsageError(f"--scenario {args.scenario}: it profiles the SuperNodes the deployment engine starts; "
                         "add --engine deployment" + (" and leave out --superlink (its nodes have their own profiles)"
                                                      if args.superlink else ""))
    if args.clientapp != "warm" and (args.engine != "deployment" or args.superlink):
        raise UsageError(f"--clientapp {args.clientapp}: it chooses the SuperNodes the deployment engine starts; "
                         "add --engine deployment" + (" and leave out --superlink" if args.superlink else ""))
    args.kill_at = parse_kill_at(args.kill_at, args.num_partitions, args.rounds)
    if args.kill_at and (args.engine != "deployment" or args.superlink):
        raise UsageError(f"--kill-at {args.kill_at[0]}: it kills SuperNodes the deployment engine starts; add --engine "
                         "deployment" + (" and leave out --superlink (`fedfill testbed kill --at` for a testbed's "
                                         "nodes)" if args.superlink else ""))
    if args.generator_checkpoint and args.generator != "auto":
        raise UsageError("--generator-checkpoint chooses what --generator auto serves; a running service "
                         "serves its own")
    if args.root_certificates and not args.superlink:
        raise UsageError("--root-certificates goes with --superlink")
    if args.root_certificates and not Path(args.root_certificates).is_file():
        raise UsageError(f"--root-certificates {args.root_certificates}: no such file (the PEM CA certificate of "
                         "the SuperLink's TLS certificate)")
    if args.superlink:
        check_address("--superlink", args.superlink)
    check_ray_options(args)
    if args.generator not in ("auto", "none"):
        check_address("--generator", args.generator, "auto, none or HOST:PORT of a running generation service")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout {args.timeout}: must be a positive number of seconds")
    check_report_dir("--out", Path(args.out))


def check_ray_options(args) -> None:
    """--ray-address (or $RAY_ADDRESS) and the per-ClientApp resources: the simulation engine's,
    and a cluster that answers and has room for one ClientApp (commands.checks.check_ray_cluster,
    a few seconds) before anything starts."""
    simulation = args.engine == "simulation" and not args.superlink
    given = "--ray-address" if args.ray_address else "RAY_ADDRESS"
    if args.ray_address and not simulation:
        raise UsageError(f"--ray-address {args.ray_address}: Ray runs Flower's simulation engine; leave out "
                         + ("--superlink" if args.superlink else "--engine deployment"))
    # the environment's address is for every Ray tool: it steers the simulation engine only
    args.ray_address = (args.ray_address or os.environ.get("RAY_ADDRESS") or None) if simulation else None
    if args.ray_address == "local":  # Ray's own word for a Ray of this process's own
        args.ray_address = None
    if args.client_cpus < 1:
        raise UsageError(f"--client-cpus {args.client_cpus}: at least 1 (Flower reserves whole CPUs)")
    if not (math.isfinite(args.client_gpus) and args.client_gpus >= 0):
        raise UsageError(f"--client-gpus {args.client_gpus}: 0 or a positive share of a GPU")
    if not simulation and (args.client_cpus != 1 or args.client_gpus != 0):
        raise UsageError("--client-cpus and --client-gpus size the simulation engine's ClientApps; "
                         "leave out " + ("--superlink" if args.superlink else "--engine deployment"))
    if args.ray_address and getattr(args, "ray_cluster_at", None) != args.ray_address:  # once per address
        from commands.checks import check_ray_cluster

        args.ray_cluster_at = args.ray_address
        args.ray_cluster = check_ray_cluster(given, args.ray_address, args.client_cpus, args.client_gpus,
                                             local_generator=args.generator == "auto")


def simulation_options(args) -> list[str]:
    """`flwr run`'s federation config of a simulation: the nodes and each ClientApp's Ray
    resources. Flower 1.41 takes no Ray address here (nor num_cpus when Ray is a cluster's:
    ray.init refuses them then); the simulation's Ray finds the cluster by RAY_ADDRESS."""
    config = f"num-supernodes={args.num_partitions} client-resources-num-cpus={args.client_cpus}"
    if args.client_gpus:
        config += f" client-resources-num-gpus={args.client_gpus!r}"
    return ["--federation-config", config]


def parse_kill_at(specs: list, nodes: int, rounds: int) -> list:
    """`--kill-at NODE:ROUND:PHASE` specs as deploy.local.KillAt, each naming a node the engine
    starts (0..nodes-1), a round of the run (1..rounds) and a phase (train, upload), at most one
    per node; UsageError naming what is wrong otherwise."""
    from client.faults import PHASES
    from deploy.local import KillAt

    faults: list[KillAt] = []
    for spec in specs:
        if isinstance(spec, KillAt):  # checked already
            faults.append(spec)
            continue
        parts = str(spec).split(":")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            raise UsageError(f"--kill-at {spec}: expected NODE:ROUND:PHASE, e.g. 2:3:upload")
        node, server_round, phase = int(parts[0]), int(parts[1]), parts[2]
        if node >= nodes:
            raise UsageError(f"--kill-at {spec}: there is no node {node}; the run starts nodes 0..{nodes - 1} (--nodes)")
        if not 1 <= server_round <= rounds:
            raise UsageError(f"--kill-at {spec}: there is no round {server_round}; the run has rounds 1..{rounds} "
                             "(--rounds)")
        if phase not in PHASES:
            raise UsageError(f"--kill-at {spec}: phase {phase!r}: choose {' or '.join(PHASES)}")
        if any(fault.node == node for fault in faults):
            raise UsageError(f"--kill-at {spec}: node {node} is killed once already (a killed node stays down)")
        faults.append(KillAt(node, server_round, phase))
    return faults


def check_report_dir(option: str, out: Path) -> None:
    """A directory there, or one that can be made: no file in its place or above it."""
    out = out.resolve()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{option} {out}: {existing} is a file; the report needs a directory")


def check_address(option: str, address: str, expected: str = "HOST:PORT") -> None:
    """HOST:PORT with a port in 1..65535 (gRPC's form; [v6]:port too)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"{option} {address}: expected {expected}, with a port in 1..65535")


def run(args) -> int:
    job, generator_mode = checked_job(args)
    out = prepare_out(Path(args.out), args.resume)
    configs = [] if args.superlink else node_configs(args.num_partitions, args.scenario)
    from deploy.flower_cli import write_flwr_connection
    from deploy.local import LocalFederation, LocalSimulation, flower_environment

    home = out / ".flwr"
    env = flower_environment(home)
    engine = f"the SuperLink at {args.superlink}" if args.superlink else f"{args.engine} engine"
    if getattr(args, "ray_cluster", None):
        engine += f" on the Ray cluster at {args.ray_address} ({args.ray_cluster})"
    sampled = sampled_count(args.num_partitions, job.fraction_train, job.min_train_nodes)
    print(f"fedfill run: {job.job} job, {job.policy} on {args.dataset}, {args.num_partitions} nodes"
          + (f" ({sampled} sampled a round)" if sampled < args.num_partitions else "")
          + f", {args.rounds} rounds, {engine} -> {out}")
    if real_dataset(job.dataset) != job.dataset:
        from jobs import training_data

        print(f"  training data {training_data(job)}")
    started = time.monotonic()
    federation = generation = None
    with interrupts_stop_the_run():
        try:
            if generator_mode == "auto":  # it loads while the engine starts
                from deploy.local import GenerationProcess
                from generation.config import shipped_checkpoint

                checkpoint = job.generator_checkpoint or str(shipped_checkpoint(job.dataset))  # resolved: it runs elsewhere
                generation = GenerationProcess(out / "logs", out / "generator-cache", checkpoint=checkpoint).launch()
                job = replace(job, generator_address=generation.address)
            simulation, watch = [], None
            if args.superlink:
                address, certificates = args.superlink, args.root_certificates or None
            elif args.engine == "simulation":
                # The simulation's ray.init (Flower's RayBackend, no address given) reads RAY_ADDRESS:
                # a cluster's, or "local", a Ray of the run's own even where `ray start` left one
                # on this machine (ray.init would attach to that one otherwise).
                env = {**env, "RAY_ADDRESS": args.ray_address or "local"}
                federation = LocalSimulation(out / "logs", env=env)
                # Flower's simulation settings travel with the run, not in the connection
                # (`options.` there is deprecated in 1.41).
                simulation = simulation_options(args)
            else:
                federation = LocalFederation(out / "logs", env=env, node_configs=configs, clientapp=args.clientapp,
                                             kill_at=args.kill_at)
                watch = federation.check_alive
            if federation is not None:
                federation.start()  # assigned first: an interrupted start is stopped below too
                address, certificates = federation.address, None
            if generation is not None:
                generation.wait_serving()
                print(f"  generation service up on {generation.address}")
            write_flwr_connection(home, address, root_certificates=certificates)
            return drive(job, out, env, started, args.timeout, flwr_args=simulation, watch=watch)
        finally:
            if federation is not None:
                federation.stop()
            if generation is not None:
                generation.stop()


def prepare_out(out: Path, resume: bool) -> Path:
    """The report directory: a resumed run needs its checkpoint; a fresh run leaves no rows
    or plans of an older one behind."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if resume and not (out / "checkpoint.npz").exists():
        raise UsageError(f"nothing to resume: no checkpoint.npz in {out}")
    if not resume:
        for stale in [*out.glob("plan_round_*.json"), out / "rounds.csv", out / "drops.csv", out / "checkpoint.npz"]:
            stale.unlink(missing_ok=True)
    return out


def drive(job: RunConfig, out: Path, env: dict, started: float, timeout: float, *, flwr_args=(),
          watch: Callable[[], list[str]] | None = None) -> int:
    """`flwr run` of the job on the connection in env's FLWR_HOME, each report row shown as it
    comes; `watch` names components that died (reported once, the run goes on). Returns the
    command's exit code: 0 when every round is in the report."""
    from deploy.flower_app import write_flower_app
    from deploy.local import stop_group

    app_dir = write_flower_app(out / "app")
    (out / "run_config.toml").write_text(run_config_toml(job))
    command = ["flwr", "run", str(app_dir), "fedfill", "--run-config", str(out / "run_config.toml"), *flwr_args,
               "--stream"]
    with open(out / "flwr.log", "w") as log_file:
        process = subprocess.Popen(command, cwd=out, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            shown = _follow(process, out / "rounds.csv", started, timeout, watch)
        finally:
            stop_group(process)
    if process.returncode != 0 or shown <= job.rounds:  # rows 0..rounds, resumed or not
        tail = (out / "flwr.log").read_text(errors="replace").splitlines()[-15:]
        print("fedfill run: the Flower run did not finish; last lines of flwr.log:", *tail, sep="\n  ", file=sys.stderr)
        return 1
    rows = read_rounds(out / "rounds.csv")
    print(f"virtual clock {rows[-1].get('virtual_s', 0.0):.0f} s (modeled) beside "
          f"{sum(r.get('wall_s', 0.0) for r in rows):.0f} s of real rounds")
    print(f"report: {out}/rounds.csv, devices.csv, summary.json, plots, plan_round_N.json "
          f"({time.monotonic() - started:.0f} s)")
    return 0


@contextmanager
def interrupts_stop_the_run():
    """Ctrl-C and SIGTERM (kill, a scheduler) end the run through the caller's `finally`
    blocks (every process it started is stopped) and exit 130, with no traceback; Python's
    default SIGTERM would exit and leave them running."""
    # SIGINT too: a shell starts a background job with SIGINT ignored, and Python then keeps it so
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except KeyboardInterrupt:
        print("fedfill: interrupted, stopping every process of the run", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def node_configs(num_partitions: int, scenario: str | None, *, seed: int = 0, profiles_always: bool = False,
                 preset: str = "fimi") -> list[dict]:
    """Each SuperNode's --node-config: its partition and its device profile, from the scenario
    when given, else (profiles_always) the preset's draw that a node would make for itself."""
    configs = [{"partition-id": k, "num-partitions": num_partitions} for k in range(num_partitions)]
    if scenario:
        from strategies.allocation import ScenarioError, load_scenario

        try:
            devices = load_scenario(scenario).to_json()["devices"]
        except ScenarioError as err:
            raise UsageError(str(err)) from None
        if len(devices) != num_partitions:
            raise UsageError(f"the scenario {scenario} has {len(devices)} devices but --nodes is {num_partitions}")
    elif profiles_always:
        from strategies.allocation.presets import drawn_device_profile

        devices = [drawn_device_profile(preset, k, num_partitions, seed) for k in range(num_partitions)]
    else:
        return configs
    for config, device in zip(configs, devices):  # the contract's profile fields, under node-config keys
        config.update({contract.node_config_key(name): device[name]
                       for name in (*contract.PROFILE_FIELDS, *contract.OPTIONAL_PROFILE_FIELDS) if name in device})
    return configs


def _follow(process: subprocess.Popen, rounds_csv: Path, started: float, timeout: float,
            watch: Callable[[], list[str]] | None = None) -> int:
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
                metrics = list(row)[1:list(row).index("energy_j")]  # the job's evaluation columns
                shown_metrics = "  ".join(f"{name} [green]{row[name]:.4f}[/]" for name in metrics)
                console.print(f"  round [bold]{row['round']:3d}[/]  {shown_metrics}  "
                              f"energy {row['energy_j']:9.3f} J  uplink {row['uplink_bytes'] / 1e6:8.2f} MB  "
                              f"synthetic {row['synthetic_used']:5d}  "
                              + (f"[red]dropped {dropped}[/]  " if dropped else "dropped 0  ")
                              + f"[dim][{time.monotonic() - started:5.0f} s][/]")
            shown = len(rows)
        if watch is not None:
            for name in set(watch()) - reported_dead:
                print(f"  {name} exited (see its log); the run goes on without it", file=sys.stderr, flush=True)
                reported_dead.add(name)
        if finished:
            return shown
        if time.monotonic() - started > timeout:
            print(f"fedfill run: no end after {timeout:.0f} s, stopping", file=sys.stderr)
            return shown
        time.sleep(1.0)
