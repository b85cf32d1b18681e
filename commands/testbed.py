"""`fedfill testbed`: the FIMI job across containers, one per Flower component.

  build    make the image offline (base image from Debian's packages if missing, wheelhouse)
  up       SuperLink (TLS, SuperNode auth), generation service, N SuperNodes on a bridge network
  run      the job against it (the options and report of `fedfill run`), uplinks shaped per plan
  kill, restart, status, down
  pki      the CA, SuperLink certificate and node keys (docker-compose.yml's one-shot service)
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedfill.errors import UsageError


def add_arguments(parser) -> None:
    from commands.run import add_run_flags

    from deploy.image import DEFAULT_BASE_IMAGE, DEFAULT_IMAGE

    parser.add_argument("--name", default="fedfill", help="the testbed's name: prefix of its containers (default fedfill)")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = sub.add_parser("build", help="build the image with no network (base image from Debian's packages if missing)")
    build.add_argument("--base-image", default=DEFAULT_BASE_IMAGE,
                       help=f"an image with Python 3.11, venv and iproute2 (default {DEFAULT_BASE_IMAGE}, made here "
                            "with debootstrap from this host's apt mirror if missing)")
    build.add_argument("--tag", default=DEFAULT_IMAGE)

    up = sub.add_parser("up", help="start the SuperLink, the generation service and N SuperNodes")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--scenario", help="scenario JSON whose device i profiles node i (default: FIMI's draw)")
    up.add_argument("--image", default=DEFAULT_IMAGE)
    up.add_argument("--port", type=int, default=9000, help="the SuperLink's port on 127.0.0.1 (default 9000)")
    up.add_argument("--runs-dir", default="runs", help="where reports go (mounted into the SuperLink container)")
    up.add_argument("--memory", default="1g", help="memory limit of each node container (default 1g)")
    up.add_argument("--no-generator", action="store_true", help="no generation service: local data only")
    up.add_argument("--dataset", default="digits", help="the embedded dataset whose shipped generator the service "
                    "serves: digits (default) or mnist5k; `testbed run --dataset` must name the same")
    up.add_argument("--seed", type=int, default=0, help="seed of the device draw when no --scenario")
    up.add_argument("--preset", choices=("fimi", "ondemand"), default="fimi",
                    help="whose devices to draw when no --scenario: FIMI's (the classifier job) or ODQ's, "
                         "error demands included (the ddpm job)")

    run = sub.add_parser("run", help="run the job against the testbed; the report of `fedfill run`")
    run.add_argument("--out", default="", help="report directory under the runs dir (default RUNS_DIR/testbed)")
    run.add_argument("--uplink-scale", type=float, default=1.0,
                     help="each node's egress is shaped to the plan's uplink rate times this (default 1)")
    run.add_argument("--timeout", type=float, default=3600.0)
    add_run_flags(run, skip=("num_partitions",))  # the testbed's

    board = sub.add_parser("add-board", help="a node container that runs a board's bundle (`fedfill board bundle`), "
                                             "with a copy of a board's sysfs tree and its data mounted")
    board.add_argument("bundle", help="the bundle directory, made for this testbed: --superlink NAME-superlink:8000 "
                                      "--pki (the testbed's pki directory)")
    board.add_argument("--mount", action="append", default=[], metavar="HOST_DIR:CONTAINER_DIR",
                       help="a host directory the board sees read-only (its sysfs tree, its data-dir); repeatable")

    kill = sub.add_parser("kill", help="kill containers (names like node-2, superlink) or a random fraction of nodes")
    kill.add_argument("names", nargs="*")
    kill.add_argument("--fraction", type=float, default=0.0)
    kill.add_argument("--seed", type=int)
    kill.add_argument("--at", choices=("train", "upload"),
                      help="kill each node in this phase of its next round (it holds there, its log says so, then it "
                           "is killed); a run must be going on")
    kill.add_argument("--wait-s", type=float, default=300.0, metavar="S",
                      help="with --at: give up (killing nothing) when a node is not there within S seconds (300)")
    restart = sub.add_parser("restart", help="restart containers (names like node-2, superlink)")
    restart.add_argument("names", nargs="+")
    sub.add_parser("status", help="each container: role, state, CPU quota, memory, node id, shaped uplink")
    down = sub.add_parser("down", help="remove every container, network and key the testbed made")
    down.add_argument("--force", action="store_true", help="also while a run is going on (it ends unfinished)")

    pki = sub.add_parser("pki", help="write the CA, the SuperLink certificate and node keys")
    pki.add_argument("--out", required=True)
    pki.add_argument("--nodes", type=int, required=True)
    pki.add_argument("--names", nargs="+", default=["superlink"], help="the SuperLink's DNS names (certificate SANs)")
    register = sub.add_parser("register", help="register the node keys of a PKI directory with a SuperLink "
                                               "(keys already registered are kept)")
    register.add_argument("--superlink", required=True, metavar="HOST:PORT")
    register.add_argument("--pki", required=True, help="the directory `fedfill testbed pki` wrote")
    register.add_argument("--nodes", type=int, required=True)
    register.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the SuperLink (default 60)")


def run(args) -> int:
    return {"build": _build, "up": _up, "run": _run, "kill": _kill, "restart": _restart, "status": _status,
            "down": _down, "pki": _pki, "register": _register, "add-board": _add_board}[args.action](args)


def _testbed(args):
    from deploy.testbed import Testbed

    return Testbed(args.name)


def _build(args) -> int:
    import time

    from deploy.image import build_image
    from deploy.testbed import docker_client

    started = time.monotonic()
    image_id = build_image(docker_client(), args.tag, args.base_image)
    print(f"image {args.tag} ({image_id[:19]}) built in {time.monotonic() - started:.0f} s")
    return 0


def _up(args) -> int:
    from commands.run import node_configs

    check_up_options(args)
    configs = node_configs(args.nodes, args.scenario, seed=args.seed, profiles_always=True, preset=args.preset)
    testbed = _testbed(args)
    state = testbed.up(configs, image=args.image, port=args.port, runs_dir=Path(args.runs_dir),
                       memory=args.memory, generator=not args.no_generator, dataset=args.dataset)
    print(f"testbed {state.name}: SuperLink on 127.0.0.1:{state.port} (TLS, SuperNode auth), "
          f"{len(state.nodes)} nodes, reports in {state.runs_dir}")
    _print_status(testbed.status())
    return 0


def check_up_options(args) -> None:
    """What `testbed up` is given, before any container starts (a bad memory limit would
    otherwise fail at the first node, with the SuperLink already up)."""
    from commands.run import check_report_dir

    if args.nodes < 1:
        raise UsageError(f"--nodes {args.nodes}: must be at least 1")
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: must be 0 or more (numpy's generators refuse negative seeds)")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be in 1..65535")
    if not args.no_generator:
        from fedfill.data import embedded
        from generation.config import CheckpointError, shipped_checkpoint

        try:
            shipped_checkpoint(args.dataset)
            args.dataset = embedded(args.dataset)  # its canonical name, as `testbed run` compares it
        except CheckpointError as err:
            raise UsageError(f"--dataset {args.dataset}: {err}; or bring the testbed up with --no-generator") from None
    check_report_dir("--runs-dir", Path(args.runs_dir))
    try:
        from docker.errors import DockerException
        from docker.utils import parse_bytes
    except ImportError:
        return  # the testbed says how to install the Docker SDK when it needs it
    try:
        memory = parse_bytes(args.memory)
    except DockerException as err:
        raise UsageError(f"--memory {args.memory}: {err}") from None
    if memory < MIN_MEMORY:
        raise UsageError(f"--memory {args.memory}: Docker's smallest memory limit is 6m; a node needs about 1g")


MIN_MEMORY = 6 * 2**20  # Docker refuses a container memory limit below 6 MiB


def _add_board(args) -> int:
    mounts = {}
    for spec in args.mount:
        host, sep, target = spec.rpartition(":")
        if not sep or not host or not target.startswith("/"):
            raise UsageError(f"--mount {spec!r}: expected HOST_DIR:/CONTAINER_DIR")
        mounts[host] = target
    testbed = _testbed(args)
    node = testbed.add_board(Path(args.bundle), mounts)
    print(f"board {node.container}: node id {node.node_id}, node config {node.config}")
    _print_status(testbed.status())
    return 0


def _run(args) -> int:
    import time

    from deploy.local import flower_environment
    import math

    from fedfill.config import RunConfig
    from fedfill.data import embedded
    from commands.checks import check_job, check_settings
    from commands.run import drive, interrupts_stop_the_run, prepare_out

    from deploy.shaper import UplinkShaper
    from deploy.testbed import GENERATOR_PORT

    if not (math.isfinite(args.uplink_scale) and args.uplink_scale > 0):
        raise UsageError(f"--uplink-scale {args.uplink_scale}: must be a positive number (1: the plan's rate)")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout {args.timeout}: must be a positive number of seconds")
    # the settings alone first: a typo needs no Docker; the nodes' count comes with the testbed
    check_settings(RunConfig.from_args(args, num_partitions=1))
    testbed = _testbed(args)
    state = testbed.state()
    runs_dir = Path(state.runs_dir)
    out = Path(args.out).resolve() if args.out else runs_dir / "testbed"
    if not out.is_relative_to(runs_dir):
        raise UsageError(f"--out must be under the testbed's runs directory {runs_dir} (the only host directory "
                         "its SuperLink container sees)")
    job = RunConfig.from_args(args, out_dir=str(out), num_partitions=len(state.nodes),
                              generator_address=f"{testbed.generator}:{GENERATOR_PORT}" if state.generator else "")
    if state.generator and embedded(job.dataset) != state.dataset:
        raise UsageError(f"--dataset {job.dataset}: the testbed's generation service serves {state.dataset}'s "
                         f"generator; `fedfill testbed down` and `up --dataset {job.dataset}` (or `--no-generator`)")
    check_job(job, [node.config for node in state.nodes])
    started = time.monotonic()
    testbed.ensure_running(state)
    # a driver that was killed left its ServerApp running: stop it before anything reads the
    # checkpoint, so the resumed run is the only one writing the report
    for run_id in testbed.stop_runs(state, wait_s=60.0):
        print(f"  stopped run {run_id}, left running by an earlier driver")
    out = prepare_out(out, args.resume)
    env = flower_environment(testbed.connect_cli(state))
    shaper = UplinkShaper(testbed, out, {n.node_id: n.container for n in state.nodes}, args.uplink_scale)
    print(f"fedfill testbed run: {job.job} job, {job.policy} on {args.dataset}, {len(state.nodes)} nodes of testbed "
          f"{state.name}, {args.rounds} rounds, uplinks shaped to the plan x {args.uplink_scale:g} -> {out}")
    shaper.start()
    with interrupts_stop_the_run():
        try:
            code = drive(job, out, env, started, args.timeout, watch=lambda: testbed.stopped_nodes(state))
        finally:
            shaper.stop()
            testbed.stop_runs(state)  # an interrupted driver leaves no ServerApp running in the SuperLink
    for error in shaper.errors:
        print(f"  shaping: {error}", file=sys.stderr)
    from deploy.uplink_report import print_uplink_table, write_uplink_report

    print_uplink_table(write_uplink_report(out))
    return code


def _kill(args) -> int:
    if not args.names and not 0 < args.fraction <= 1:
        raise UsageError("name the containers to kill, or give --fraction between 0 and 1")
    if args.at and not 0 < args.wait_s < float("inf"):
        raise UsageError(f"--wait-s {args.wait_s}: a positive number of seconds")
    testbed = _testbed(args)
    killed = testbed.kill(args.names, args.fraction, args.seed, at=args.at, wait_s=args.wait_s)
    print("killed:", " ".join(killed))
    for name, line in getattr(testbed, "holds", {}).items():
        print(f"  {name} was holding: {line}")
    return 0


def _restart(args) -> int:
    _testbed(args).restart(args.names)
    print("restarted:", " ".join(args.names))
    return 0


def _status(args) -> int:
    _print_status(_testbed(args).status())
    return 0


def _print_status(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("container", "role", "state", "cpus", "memory", "node id", "partition", "uplink")
    for row in rows:
        memory = f"{row['memory'] / 2**30:.1f} GiB" if row["memory"] else ""
        table.add_row(row["container"], row["role"], row["state"], f"{row['cpus']:.2f}" if row["cpus"] else "",
                      memory, str(row["node_id"] or ""), "" if row["partition"] is None else str(row["partition"]),
                      row["uplink"])
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _down(args) -> int:
    from deploy.testbed import Testbed, docker_client

    testbed = Testbed(args.name, docker_client())
    running = [] if args.force else testbed.runs_in_flight()
    if running:
        raise UsageError(f"run {', '.join(map(str, running))} is still going on in the SuperLink; removing the "
                         "testbed would end it unfinished. Stop its `fedfill testbed run` (Ctrl-C stops the run "
                         "too), or `fedfill testbed down --force`")
    removed = testbed.down()
    print(f"removed {len(removed)}: {' '.join(removed)}" if removed else "nothing to remove")
    return 0


def _pki(args) -> int:
    from deploy.pki import write_pki

    pki = write_pki(Path(args.out), args.nodes, tuple(args.names))
    print(f"CA {pki.ca_cert}, SuperLink certificate for {', '.join(args.names)}, {args.nodes} node keys in {pki.root}")
    return 0


def _register(args) -> int:
    import tempfile
    import time

    from deploy.flower_cli import AlreadyRegistered, register_supernode, write_flwr_connection
    from deploy.pki import Pki

    pki = Pki.at(Path(args.pki))
    with tempfile.TemporaryDirectory(prefix="fedfill-flwr-") as home:
        write_flwr_connection(Path(home), args.superlink, root_certificates=pki.ca_cert)
        for k in range(args.nodes):
            deadline = time.monotonic() + args.wait
            while True:
                try:
                    node_id = register_supernode(pki.node_public_key(k), Path(home))
                    print(f"node {k}: registered, node id {node_id}")
                    break
                except AlreadyRegistered:
                    print(f"node {k}: its key was already registered")
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(2.0)  # the SuperLink may still be starting
    return 0
