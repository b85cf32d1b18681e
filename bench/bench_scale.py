"""The cost curve of large fleets: per-round time, start-up and peak memory as the fleet grows.

    python bench/bench_scale.py                 # 100, 1,000, 5,000 devices x 20, 100 sampled, one Ray
                                                # node and a two-node cluster, 3 rounds each: ~15 min
                                                # on 2 quiet cores (7 min a Ray), ~23 at load 3-10
    python bench/bench_scale.py --quick         # 100 and 1,000 devices, 20 sampled, one node (2.5 min at load 6)
    python bench/bench_scale.py --fleets 5000 --sampled 100 --clusters one --out scale.json

Each configuration is one `fedfill run --dataset synthetic-digits --nodes N --fraction S/N
--min-nodes S --rounds 3` on the simulation engine. The fill is the shipped GAN's
(--generator-checkpoint generation/checkpoints/digits-gan, ~1 s a round) and not the default
DDPM's (about a minute at 100 sampled devices), so that a round's figure is the machinery's and
the fleet's, not the generator's. A round is the mean of rounds 2-3's `wall_s` (round 1 pays the
Ray workers' first imports); start-up is the command's start to round 0's row in rounds.csv,
and `profiles` the start to profiles.json (the checks, the engine's start and the QUERY of every
device). Memory: the resident set of every process of the run's tree, summed, sampled every
0.5 s (psutil, else /proc); `driver` is `fedfill run` and `flwr run` (cli), the SuperLink, and
the ServerApp's process (simulation: Flower runs its simulation engine there too), `ray` Ray's (GCS, raylet, workers: on the cluster, the cluster's processes
too, idle ones included), the generation service apart. The planner's share is the plan's
`solve_seconds` (plan_round_N.json) over the round. Last, the planner alone (solve_plan, no
Flower) on the fimi preset at 10,000 devices, as if every device of a fleet were planned.

Goals (issue 25): 1,000 devices at most 1.5x the round of 100 at the same sampled count (ratio
measured in this run, same cluster), start-up for 1,000 devices under 60 s, and the driver's
memory not growing per device beyond the profiles (its growth from the smallest fleet to the
largest is set beside profiles.json's size). A configuration that does not finish within
--timeout is stopped and reported as far as it got.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GAN = ROOT / "generation" / "checkpoints" / "digits-gan"
MiB = 1024 * 1024
DRIVER = ("cli", "superlink", "simulation")  # the driver's processes (module docstring)


def process_tree(pid: int) -> list[int]:
    """pid and its descendants, by parent links (psutil, else /proc)."""
    try:
        import psutil

        try:
            root = psutil.Process(pid)
            return [pid, *(child.pid for child in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []
    except ImportError:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        tree, todo = [], [pid]
        while todo:
            current = todo.pop()
            tree.append(current)
            todo.extend(children.get(current, []))
        return tree


def rss_and_role(pid: int) -> tuple[int, str] | None:
    """A process's resident bytes and which part of the run it is (module docstring), or None
    when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    name = next((line.split(None, 1)[1] for line in status.splitlines() if line.startswith("Name:")), "")
    if "generator serve" in cmdline:
        role = "generator"
    elif (name.startswith("ray::") or cmdline.startswith("ray::") or "raylet" in cmdline or "gcs_server" in cmdline
          or "/ray/" in cmdline or "default_worker" in cmdline):
        role = "ray"
    elif "flower-superlink" in cmdline:
        role = "superlink"
    elif "flwr-simulation" in cmdline:
        role = "simulation"  # the ServerApp and Flower's simulation engine (its per-node state)
    else:
        role = "cli"  # fedfill run, flwr run
    return rss, role


class MemorySampler:
    """Peak summed RSS by role over the trees of `roots`, sampled on each `sample()` call."""

    def __init__(self, roots: list[int], exclude: set[int] | None = None):
        self.roots, self.exclude = roots, exclude or set()
        self.peak = dict.fromkeys((*DRIVER, "driver", "ray", "generator", "total"), 0)

    def sample(self) -> None:
        sums = dict.fromkeys((*DRIVER, "ray", "generator"), 0)
        pids = {pid for root in self.roots for pid in process_tree(root)} - self.exclude  # the trees overlap
        for pid in pids:
            found = rss_and_role(pid)
            if found:
                sums[found[1]] += found[0]
        sums["total"] = sum(sums.values())
        sums["driver"] = sum(sums[role] for role in DRIVER)
        for key, value in sums.items():
            self.peak[key] = max(self.peak[key], value)


def round_rows(out: Path) -> list[dict]:
    try:
        with open(out / "rounds.csv") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error):
        return []


def start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def superlink_marks(log: Path, started_wall: float) -> dict:
    """Seconds from the command's start to the SuperLink serving (`engine`), `flwr run`'s start
    of the run (`run`) and the ServerApp's process taking its task (`serverapp`), from the
    SuperLink log's UTC timestamps; what is not there is left out."""
    from datetime import datetime

    marks = {}
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return marks
    for key, needle in (("engine", "Uvicorn running"), ("run", "/control/start-run"),
                        ("serverapp", "/runtime/pull-task-input")):
        line = next((line for line in lines if needle in line and line[:4].isdigit()), None)
        if line:
            stamp = datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
            marks[key] = stamp - started_wall
    return marks


def stop_run(process: subprocess.Popen) -> None:
    """Interrupt `fedfill run` (it stops what it started), then kill what of its tree is left,
    each by its id and only if it is still the same process: this bench's processes only."""
    pids = {pid: start_time(pid) for pid in process_tree(process.pid) if pid != process.pid}
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid, began in pids.items():
        if began is None or start_time(pid) != began:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_config(nodes: int, sampled: int, rounds: int, timeout: float, ray_address: str | None,
               cluster_pids: list[int], keep: Path | None) -> dict:
    """One `fedfill run` of the configuration, measured (module docstring)."""
    out = Path(tempfile.mkdtemp(prefix=f"scale-{nodes}-{sampled}-"))
    command = [sys.executable, "-m", "fedfill", "run", "--dataset", "synthetic-digits", "--nodes", str(nodes),
               "--fraction", repr(sampled / nodes), "--min-nodes", str(sampled), "--rounds", str(rounds),
               "--generator-checkpoint", str(GAN), "--out", str(out), "--timeout", str(timeout + 60)]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        command += ["--ray-address", ray_address]
    started, started_wall = time.monotonic(), time.time()
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = MemorySampler([process.pid, *cluster_pids], exclude={os.getpid()})
    startup = profiles_at = None
    timed_out = False
    while process.poll() is None:
        sampler.sample()
        now = time.monotonic() - started
        if profiles_at is None and (out / "profiles.json").exists():
            profiles_at = (out / "profiles.json").stat().st_mtime - started_wall
        if startup is None and any(r.get("round") == "0" for r in round_rows(out)):
            startup = now
        if now > timeout:
            timed_out = True
            stop_run(process)
            break
        time.sleep(0.5)
    total = time.monotonic() - started
    log.close()
    rows = [r for r in round_rows(out) if r.get("round", "").isdigit()]
    walls = {int(r["round"]): float(r["wall_s"]) for r in rows if r.get("wall_s")}
    later = [walls[r] for r in sorted(walls) if r >= 2]
    plans = {}
    for path in out.glob("plan_round_*.json"):
        try:
            plans[int(path.stem.rsplit("_", 1)[1])] = json.loads(path.read_text()).get("solve_seconds")
        except (ValueError, json.JSONDecodeError):
            pass
    plan_later = [plans[r] for r in sorted(plans) if r >= 2 and plans[r] is not None]
    devices = []
    if (out / "devices.csv").exists():
        with open(out / "devices.csv") as fh:
            devices = list(csv.DictReader(fh))
    ran_on = {r.get("ray_node") for r in devices if r.get("ray_node")}
    size = lambda name: (out / name).stat().st_size if (out / name).exists() else None  # noqa: E731
    result = {
        "nodes": nodes, "sampled": sampled, "ray": "cluster" if ray_address else "one node",
        "rc": process.returncode, "timed_out": timed_out, "total_s": total, "startup_s": startup,
        "profiles_s": profiles_at, "startup_marks_s": superlink_marks(out / "logs" / "superlink.log", started_wall),
        "rounds_done": max(walls) if walls else 0, "wall_s": walls,
        "round_s": sum(later) / len(later) if later else None,
        "plan_s": sum(plan_later) / len(plan_later) if plan_later else None,
        "peak_mib": {k: v / MiB for k, v in sampler.peak.items()},
        "profiles_json_bytes": size("profiles.json"), "devices_csv_rows": len(devices),
        "ray_nodes_used": len(ran_on),
    }
    if process.returncode not in (0, None) or timed_out:
        result["log_tail"] = (out.parent / f"{out.name}.log").read_text()[-3000:]
    if keep:
        shutil.copytree(out, keep / out.name, ignore=shutil.ignore_patterns("generator-cache", ".flwr", "app"),
                        dirs_exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    (out.parent / f"{out.name}.log").unlink(missing_ok=True)
    return result


class TwoNodeCluster:
    """A head and a worker node with 1 CPU each on this machine (ray.cluster_utils.Cluster), in
    a temp dir of its own: a plain ray.init() here would find and join a cluster left in Ray's
    default one, and so could someone else's."""

    def __enter__(self):
        from ray.cluster_utils import Cluster

        self.temp = tempfile.mkdtemp(prefix="ffscale-", dir="/tmp")  # short: Unix socket paths
        self.before = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = self.temp
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": f"{self.temp}/ray",
                                                                     "include_dashboard": False})
        self.cluster.add_node(num_cpus=1)
        self.cluster.wait_for_nodes()
        return self

    @property
    def address(self) -> str:
        return self.cluster.address

    def pids(self) -> list[int]:
        """The cluster's processes (children of this one): their trees hold the Ray workers."""
        return [pid for pid in process_tree(os.getpid()) if pid != os.getpid()]

    def __exit__(self, *exc):
        self.cluster.shutdown()
        shutil.rmtree(self.temp, ignore_errors=True)
        if self.before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = self.before


def ray_address_landed() -> bool:
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--help"], cwd=ROOT, capture_output=True, text=True)
    return "--ray-address" in done.stdout


def planner_time(devices: int) -> dict:
    from strategies.allocation import solve_plan
    from strategies.allocation.presets import fimi_scenario

    started = time.perf_counter()
    scenario = fimi_scenario(devices, 0)
    drawn = time.perf_counter() - started
    started = time.perf_counter()
    plan = solve_plan(scenario, "fimi")
    return {"devices": devices, "draw_s": drawn, "solve_s": time.perf_counter() - started,
            "feasible": bool(getattr(plan, "feasible", True))}


def flower_poll_sweep(nodes: int, in_flight: int) -> float | None:
    """Seconds of one sweep of Flower 1.41's simulation engine over its nodes
    (vce_api.add_messages_to_queue: get_message_ins for every node, then 0.1 s of sleep, in the
    ServerApp's process), with `in_flight` messages in the in-memory LinkState: each call scans
    every stored message, so a sweep is nodes x in-flight. Its real code on stand-in messages
    (only the fields it reads); None where Flower's internals moved."""
    from types import SimpleNamespace as NS

    try:
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.superlink.federation.noop_federation_manager import NOOP_FEDERATION_ID, NoOpFederationManager

        state = InMemoryLinkState(NoOpFederationManager(simulation=True), ObjectStoreFactory().store())
        state.run_ids[1] = NS(run=NS(federation_id=NOOP_FEDERATION_ID))
        now = time.time()
        for k in range(in_flight):  # delivered, awaiting their replies: as in a round
            state.message_ins_store[str(k)] = NS(metadata=NS(created_at=now, ttl=3600.0, src_node_id=0,
                                                             dst_node_id=-1 - k, run_id=1, delivered_at="x"))
        started = time.perf_counter()
        for node in range(nodes):
            state.get_message_ins(node_id=node, limit=1)
        return time.perf_counter() - started
    except (ImportError, AttributeError, TypeError, KeyError):
        return None


def fmt(value, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"


def print_row(r: dict) -> None:
    ratio = r.get("vs_smallest")
    m = r["peak_mib"]
    status = "ok" if r["rc"] == 0 else (f"stopped at {r['timeout']:.0f} s" if r["timed_out"] else f"rc {r['rc']}")
    print(f"{r['ray']:>9} {r['nodes']:>6} {r['sampled']:>4} | {fmt(r['startup_s'], '.1f', 7)} "
          f"{fmt(r['profiles_s'], '.1f', 7)} | {fmt(r['wall_s'].get(1), '.2f', 6)} {fmt(r['round_s'], '.2f', 7)} "
          f"{fmt(ratio, '.2f', 5)} {fmt(r['plan_s'], '.2f', 6)} | {m['driver']:7.0f} {m['ray']:7.0f} "
          f"{m['generator']:5.0f} {m['total']:7.0f} | {r['rounds_done']:>2} {status}"
          + "".join(f"; {k} {v:.1f} s" for k, v in r["startup_marks_s"].items()), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 devices, 20 sampled, one node")
    parser.add_argument("--fleets", default="100,1000,5000")
    parser.add_argument("--sampled", default="20,100")
    parser.add_argument("--clusters", default="one,two", help="one (a Ray of the run's own), two (a two-node cluster)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="stop a configuration after this many seconds")
    parser.add_argument("--planner-devices", type=int, default=10000)
    parser.add_argument("--keep", help="copy each run's report (no cache) under this directory")
    parser.add_argument("--out", help="write the figures here (JSON)")
    args = parser.parse_args()
    fleets = [100, 1000] if args.quick else [int(n) for n in args.fleets.split(",")]
    sampled_counts = [20] if args.quick else [int(n) for n in args.sampled.split(",")]
    clusters = ["one"] if args.quick else [c for c in args.clusters.split(",") if c]
    if "two" in clusters and not ray_address_landed():
        print("fedfill run has no --ray-address here: the two-node cluster is left out")
        clusters.remove("two")
    keep = Path(args.keep).resolve() if args.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the start")
    print(f"{'ray':>9} {'fleet':>6} {'samp':>4} | {'start s':>7} {'prof s':>7} | {'rnd1 s':>6} {'rnd2-3':>7} "
          f"{'x100':>5} {'plan s':>6} | {'drv MiB':>7} {'ray MiB':>7} {'gen':>5} {'all MiB':>7} | done")
    results: list[dict] = []
    for kind in clusters:
        cluster = TwoNodeCluster() if kind == "two" else None
        try:
            if cluster:
                cluster.__enter__()
            for sampled in sampled_counts:
                for nodes in fleets:
                    if sampled > nodes:
                        continue
                    result = run_config(nodes, sampled, args.rounds, args.timeout,
                                        cluster.address if cluster else None, cluster.pids() if cluster else [], keep)
                    result["timeout"] = args.timeout
                    base = next((r for r in results if r["ray"] == result["ray"] and r["sampled"] == sampled
                                 and r["nodes"] == min(fleets)), None)
                    if base and base["round_s"] and result["round_s"]:
                        result["vs_smallest"] = result["round_s"] / base["round_s"]
                    results.append(result)
                    print_row(result)
                    if "log_tail" in result:
                        print("   ", result["log_tail"][-800:].replace("\n", "\n    "))
        finally:
            if cluster:
                cluster.__exit__(None, None, None)
    planner = planner_time(args.planner_devices)
    print(f"\nplanner alone (fimi preset, seed 0): {planner['devices']} devices drawn in {planner['draw_s']:.2f} s, "
          f"planned in {planner['solve_s']:.2f} s")
    sweeps = {f"{n}x{m}": flower_poll_sweep(n, m) for n in fleets
              for m in sorted({*sampled_counts, *([n] if n <= 1000 else [])})}  # n x n: the QUERY at start
    print("Flower's simulation poll, one sweep over the nodes (nodes x messages in flight): "
          + ", ".join(f"{k} {v * 1000:.0f} ms" if v is not None else f"{k} -" for k, v in sweeps.items()))
    print("start s: to round 0's row; prof s: to profiles.json (checks, engine start, QUERY); rnd2-3: mean wall_s; "
          f"x100: that over the {min(fleets)}-device fleet's, same sampled count and Ray; plan s: the planner's "
          "solve_seconds in rounds 2-3; MiB: peak summed RSS; engine/run/serverapp: the SuperLink serving, flwr "
          "run's start of the run, the ServerApp's process taking its task (s from the command)")

    goals = {}
    for r in results:
        if r["nodes"] == 1000 and r.get("vs_smallest") is not None:
            goals[f"{r['ray']}, {r['sampled']} sampled: 1,000 devices' round <= 1.5x 100's "
                  f"({r['vs_smallest']:.2f}x)"] = r["vs_smallest"] <= 1.5
        if r["nodes"] == 1000 and r["startup_s"] is not None:
            goals[f"{r['ray']}, {r['sampled']} sampled: 1,000 devices start in < 60 s ({r['startup_s']:.0f} s)"] = \
                r["startup_s"] < 60
    growth = []
    for kind in {r["ray"] for r in results}:
        for sampled in sampled_counts:
            runs = sorted((r for r in results if r["ray"] == kind and r["sampled"] == sampled and r["rounds_done"]),
                          key=lambda r: r["nodes"])
            if len(runs) >= 2 and runs[0]["profiles_json_bytes"] and runs[-1]["profiles_json_bytes"]:
                small, large = runs[0], runs[-1]
                extra = large["nodes"] - small["nodes"]
                driver = (large["peak_mib"]["driver"] - small["peak_mib"]["driver"]) * MiB / extra
                profiles = (large["profiles_json_bytes"] - small["profiles_json_bytes"]) / extra
                parts = {role: (large["peak_mib"].get(role, 0) - small["peak_mib"].get(role, 0)) * MiB / extra
                         for role in DRIVER}
                growth.append({"ray": kind, "sampled": sampled, "from": small["nodes"], "to": large["nodes"],
                               "driver_bytes_per_device": driver, "by_process": parts,
                               "profiles_json_bytes_per_device": profiles})
                print(f"{kind}, {sampled} sampled: the driver grows {driver / 1024:.1f} KiB a device from "
                      f"{small['nodes']} to {large['nodes']} ("
                      + ", ".join(f"{role} {value / 1024:.1f}" for role, value in parts.items())
                      + f"; profiles.json: {profiles:.0f} B a device; devices.csv rows "
                      f"{small['devices_csv_rows']} -> {large['devices_csv_rows']})")
    print("\n== goals ==")
    for name, ok in goals.items():
        print(f"  [{'met' if ok else 'MISSED'}] {name}")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "load_at_start": load, "runs": results,
                                              "planner": planner, "poll_sweep_s": sweeps, "driver_growth": growth, "goals": goals},
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
