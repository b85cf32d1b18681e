"""A run's whole configuration, checked before any process starts.

A bad value that slips through costs minutes: Ray, the SuperLink and the generation service
come up, and the run dies inside every ClientApp (or trains nobody) with a traceback. Here
each one stops the command at once as a UsageError (exit 2) naming the option, the value,
why, and what would work. `fedfill run`, `fedfill compare` (every policy, before the first
run) and `fedfill testbed run` all call `check_job`.

Three stages, cheapest first, so that a typo costs no data loading:
  settings    each value alone (check_settings)
  the split   the Dirichlet partitioner itself on the clients' pool (check_split)
  round 1     the strategy's own planning on the devices the nodes will report (check_first_plan)
"""

from __future__ import annotations

import json
import logging
import math
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import fields, replace

from fedfill.codec import MAX_BITS, MIN_BITS
from fedfill.config import DELIVERIES, RunConfig, check_aggregation, check_attack, key_of, sampled_count
from fedfill.data import SYNTHETIC_DIGITS, embedded
from fedfill.errors import UsageError
from strategies.allocation.scenario import system_range

# what the generation service serves (generation.service.GenerationService.check)
GENERATOR_STEPS = (1, 1000)
GENERATOR_GUIDANCE = (0.0, 20.0)


def flag_of(name: str) -> str:
    """The `fedfill run` option of a run-config field."""
    field = next(f for f in fields(RunConfig) if f.name == name)
    return field.metadata["flag"] or "--" + key_of(name)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# field -> (is the value good, what would work); NaN fails every comparison, so `_finite` first
_RULES = {
    "num_partitions": (lambda v: v >= 1, "at least 1"),
    "fraction_train": (lambda v: _finite(v) and 0 < v <= 1,
                       "in (0, 1]: the fraction of the connected nodes a round samples (1: every node)"),
    "rounds": (lambda v: v >= 1, "at least 1"),
    "dirichlet_alpha": (lambda v: _finite(v) and v > 0,
                        "a positive number (0.1: a few classes per node; 100: near IID)"),
    "seed": (lambda v: v >= 0, "0 or more (numpy's generators refuse negative seeds)"),
    "local_epochs": (lambda v: 1 <= v <= system_range("tau")[1], "at least 1, at most {:g}".format(system_range("tau")[1])),
    "lr": (lambda v: _finite(v) and v > 0, "a positive finite number"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "t_max_s": (lambda v: _finite(v) and system_range("t_max_s")[0] <= v <= system_range("t_max_s")[1],
                "in [{:g}, {:g}] seconds (the planner's range)".format(*system_range("t_max_s"))),
    "synthetic_fraction": (lambda v: _finite(v) and v >= 0, "0 or a positive number (0.5: half as much again)"),
    "generator_steps": (lambda v: GENERATOR_STEPS[0] <= v <= GENERATOR_STEPS[1],
                        "in {}..{} (what the generation service serves)".format(*GENERATOR_STEPS)),
    "generator_guidance": (lambda v: _finite(v) and GENERATOR_GUIDANCE[0] <= v <= GENERATOR_GUIDANCE[1],
                           "in [{:g}, {:g}] (what the generation service serves)".format(*GENERATOR_GUIDANCE)),
    "lora_rank": (lambda v: v >= 1, "at least 1"),
    "delta_max": (lambda v: _finite(v) and 0 < v < 1, "in (0, 1): a learning error (FIMI sweeps 0.15 to 0.3)"),
    "pseudo_label_threshold": (lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]: a class probability"),
    "node_wait_s": (lambda v: _finite(v) and v >= 0, "0 or a positive number of seconds"),
    "reply_timeout_s": (lambda v: _finite(v) and v > 0, "a positive number of seconds"),
    "delivery_downlink_bps": (lambda v: _finite(v) and v > 0, "a positive rate in bit/s"),
    "delivery_rx_power_w": (lambda v: _finite(v) and v >= 0, "0 or a positive power in W"),
    "delivery_server_passes": (lambda v: v >= 0, "0 (no limit) or a positive number of UNet passes"),
}


def check_settings(job: RunConfig) -> None:
    """Each value alone, and the files the run reads: no data loaded, no model built."""
    for name, (good, works) in _RULES.items():
        value = getattr(job, name)
        if not good(value):
            raise UsageError(f"{flag_of(name)} {value}: must be {works}")
    try:
        check_aggregation(job.aggregation, job.trim_beta, job.norm_bound, job.norm_screen)
        check_attack(job.attack, job.attackers, job.num_partitions)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not 1 <= job.min_train_nodes <= job.num_partitions:
        raise UsageError(f"{flag_of('min_train_nodes')} {job.min_train_nodes}: must be in 1..{job.num_partitions}: "
                         f"a round cannot sample more than the {job.num_partitions} nodes of the fleet "
                         f"({flag_of('num_partitions')})")
    check_synthetic_use(job)
    check_delivery(job)
    check_pricing(job)
    if job.learning_fit:
        check_learning_fit(job.learning_fit)
    if job.traces:
        check_traces(job.traces, job.num_partitions)
    if embedded(job.dataset) and job.data_dir:
        raise UsageError(f"--data-dir {job.data_dir}: {job.dataset} is embedded and reads no directory; "
                         "name the dataset that lives there (--dataset cifar10, gtsrb, fmnist or cinic10)")
    if job.dataset.lower() == SYNTHETIC_DIGITS and job.job != "classifier":
        raise UsageError(f"--dataset {job.dataset} --job {job.job}: the {job.job} job fine-tunes a generator on the "
                         "devices' real data, and synthetic-digits' training data is a generator's own draw; "
                         "use --dataset digits")


def check_traces(path: str, nodes: int) -> None:
    """--traces: a trace file this fleet can run on (strategies.allocation.traces): well formed,
    every device of 0..nodes-1 and no other, one of them on at some time."""
    from strategies.allocation.traces import TraceError, load_traces

    try:
        load_traces(path).check_fleet(nodes)
    except TraceError as err:
        raise UsageError(f"--traces {path}: {err}") from None


def check_delivery(job: RunConfig) -> None:
    """A delivery mode the service can make: a hand-off step inside the sampler's steps, the
    codec's widths, a sketch factor that divides the image (checked against the generator by
    the service; here against the dataset's images: 8 pixels a side for digits, 28 for mnist5k)."""
    flag = flag_of("delivery")
    if job.delivery not in (*DELIVERIES, "auto"):
        raise UsageError(f"{flag} {job.delivery}: choose one of {', '.join(DELIVERIES)} or auto")
    if job.delivery == "image":
        return
    if job.synthetic_use == "server":
        raise UsageError(f"{flag} {job.delivery}: with --synthetic-use server the devices get no synthetic data")
    steps = job.delivery_server_steps or job.generator_steps // 2
    if job.delivery in ("state", "sketch") and not 1 <= steps <= job.generator_steps - 1:
        raise UsageError(f"{flag_of('delivery_server_steps')} {job.delivery_server_steps}: the hand-off must be a "
                         f"step in 1..{job.generator_steps - 1} of the {job.generator_steps} generator steps")
    if job.delivery == "state" and not MIN_BITS <= job.delivery_state_bits <= MAX_BITS:
        raise UsageError(f"{flag_of('delivery_state_bits')} {job.delivery_state_bits}: must be in "
                         f"{MIN_BITS}..{MAX_BITS}")
    factor = job.delivery_sketch_factor
    if job.delivery != "sketch":
        return
    side = run_test_set(job).images.shape[1]
    if factor < 2 or side % factor:
        divisors = ", ".join(str(r) for r in range(2, side + 1) if side % r == 0)
        raise UsageError(f"{flag_of('delivery_sketch_factor')} {factor}: must be at least 2 and divide the image "
                         f"size ({job.dataset}: {side} pixels a side, so {divisors})")


def check_pricing(job: RunConfig) -> None:
    """Priced offloading [GenMEN]: a pricing the server knows, its figures in range, a split
    delivery for the devices' share, a refresh fraction, and a pricer checkpoint of the kind
    and the number of devices of the run."""
    from fedfill.config import parse_pricing

    flag = flag_of("pricing")
    refresh = job.synthetic_refresh
    if not (_finite(refresh) and 0 <= refresh <= 1):
        raise UsageError(f"{flag_of('synthetic_refresh')} {refresh}: must be a fraction in [0, 1]")
    try:
        kind, _ = parse_pricing(job.pricing)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if kind == "off":
        if job.pricer:
            raise UsageError(f"{flag_of('pricer')} {job.pricer}: it prices with --pricing gdm or ppo")
        return
    for name, low, works in (("pricing_server_cost", 0.0, "a positive finite cost per step-image"),
                             ("pricing_budget_s", 0.0, "a positive number of seconds")):
        value = getattr(job, name)
        if not (_finite(value) and low < value <= 1e15):
            raise UsageError(f"{flag_of(name)} {value}: must be {works}")
    if not (_finite(job.pricing_revenue) and 0 <= job.pricing_revenue <= 1e15):
        raise UsageError(f"{flag_of('pricing_revenue')} {job.pricing_revenue}: must be 0 or a positive finite number")
    if job.delivery != "state":
        raise UsageError(f"{flag} {job.pricing}: a device runs the last k of the sampler steps the service hands it "
                         f"over (k = 0: the service's images, k = all: a seed); add --delivery state, not "
                         f"--delivery {job.delivery}")
    if job.generator_checkpoint:
        from generation.checkpoint import load_generator
        from generation.config import CheckpointError

        try:
            config, _ = load_generator(job.generator_checkpoint)
        except CheckpointError:
            config = None  # check_generator says why
        if config is not None and config.model != "ddpm":
            raise UsageError(f"{flag} {job.pricing}: the generator {job.generator_checkpoint} is a "
                             f"{config.model}, with no sampler steps to share; use a diffusion checkpoint")
    if job.pricer:
        if kind not in ("gdm", "ppo"):
            raise UsageError(f"{flag_of('pricer')} {job.pricer}: only --pricing gdm or ppo reads a pricer")
        from strategies.learned.pricers import PricerError, load_pricer

        try:
            pricer = load_pricer(job.pricer)
        except (PricerError, ImportError, OSError, RuntimeError) as err:
            raise UsageError(f"{flag_of('pricer')} {job.pricer}: {err}") from None
        if pricer.kind != kind:
            raise UsageError(f"{flag_of('pricer')} {job.pricer}: a {pricer.kind} pricer, not {kind}")
        if pricer.draw.devices != job.num_partitions:
            raise UsageError(f"{flag_of('pricer')} {job.pricer}: trained for {pricer.draw.devices} devices, the run "
                             f"has {job.num_partitions} (leave --pricer out to train one at start)")


def check_synthetic_use(job: RunConfig) -> None:
    """SEMI and SST are baselines of the classifier job; SST's devices train on local data
    only ([FIMI]'s SST plans as TFL), so a policy that hands them synthetic data is refused."""
    from fedfill.config import SYNTHETIC_USES
    from strategies.allocation.policies import parse_policy

    flag = flag_of("synthetic_use")
    if job.synthetic_use not in SYNTHETIC_USES:
        raise UsageError(f"{flag} {job.synthetic_use}: choose one of {', '.join(SYNTHETIC_USES)}")
    if job.synthetic_use != "labelled" and job.job != "classifier":
        raise UsageError(f"{flag} {job.synthetic_use}: SEMI and SST are baselines of the classifier job, "
                         f"not of --job {job.job}")
    if job.synthetic_use == "server":
        try:
            base = parse_policy(job.policy)[0]
        except ValueError:
            return  # the policy's own check names it
        if base != "tfl":
            raise UsageError(f"{flag} server: the server keeps the synthetic data and its devices get none, so "
                             f"plan them without it (--policy tfl, as FIMI's SST), not --policy {job.policy}")


def check_learning_fit(path: str) -> None:
    """The fit the server plans with: a JSON object with finite alpha, beta, gamma (what
    `fedfill fit-learning` writes), refused here rather than when the ServerApp starts."""
    from pathlib import Path

    from strategies.allocation import LearningModel

    flag = flag_of("learning_fit")
    if not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file (write one with `fedfill fit-learning`, or leave the "
                         "option out for the fit shipped with the dataset)")
    try:
        model = LearningModel.load(path)
    except (ValueError, TypeError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise UsageError(f"{flag} {path}: not a learning-model fit JSON from `fedfill fit-learning` "
                         f"({str(err).splitlines()[0][:160]})") from None
    if not all(_finite(v) for v in (model.alpha, model.beta, model.gamma)) or model.alpha <= 0 or model.beta <= 0:
        raise UsageError(f"{flag} {path}: alpha {model.alpha}, beta {model.beta}, gamma {model.gamma}: "
                         "the power law needs finite numbers with alpha and beta above 0")


def check_generator(option: str, path: str, job: RunConfig) -> None:
    """A generator checkpoint the generation service will load, drawing the run's classes at
    its image size: refused here, not after the engine started."""
    from generation.checkpoint import load_generator
    from generation.config import CheckpointError

    try:
        config, _ = load_generator(path)
    except CheckpointError as err:
        raise UsageError(f"{option} {path}: {err}") from None
    test = run_test_set(job)
    drawn = (config.image_size, config.image_size, config.channels)
    if config.num_classes != test.num_classes or drawn != test.images.shape[1:]:
        raise UsageError(f"{option} {path}: it draws {config.num_classes} classes of {'x'.join(map(str, drawn))} "
                         f"images, {job.dataset} has {test.num_classes} of {'x'.join(map(str, test.images.shape[1:]))}"
                         " (train one on it: fedfill generator train --dataset ...)")


def clients_pool(job: RunConfig):
    """The pool the nodes' partitions come from, as every process of the run derives it."""
    from jobs import run_split

    return _dataset_part(job, lambda: run_split(job).clients)


def run_test_set(job: RunConfig):
    """The run's test set: its classes and image shape are the ones every model and generator
    of the run must fit, read without drawing any device's data (jobs.held_out)."""
    from jobs import held_out

    return _dataset_part(job, lambda: held_out(job).test)


def _dataset_part(job: RunConfig, part):
    """`part()`, a dataset that cannot be read refused with the reason."""
    try:
        return part()
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--dataset {job.dataset}" + (f" --data-dir {job.data_dir}" if job.data_dir else "")
                         + f": {err}") from None


def check_split(job: RunConfig):
    """The nodes' partitions, made by the partitioner each node runs; where it refuses, the
    largest node count it accepts for this alpha and seed. Returns the partitions."""
    from fedfill.partition import dirichlet_partition

    labels = clients_pool(job).labels
    try:
        return dirichlet_partition(labels, job.num_partitions, job.dirichlet_alpha, job.seed)
    except ValueError as err:
        most = largest_node_count(labels, job.dirichlet_alpha, job.seed, job.num_partitions)
        raise UsageError(f"--nodes {job.num_partitions}: the Dirichlet split refuses it ({err}, the clients' "
                         f"pool of {job.dataset}); at most --nodes {most} works with --alpha {job.dirichlet_alpha} "
                         f"and --seed {job.seed}" + (" (the split moves samples to short nodes, so no alpha "
                                                     "gives more)" if most else "")
                         + ("; --dataset synthetic-digits draws 50 training images a device for any fleet"
                            if job.dataset.lower() == "digits" else "")) from None


def largest_node_count(labels, alpha: float, seed: int, refused: int) -> int:
    """The largest node count below `refused` that the partitioner accepts (0: none), found
    by bisection over the partitioner itself, so the answer is what the nodes will do."""
    from fedfill.partition import dirichlet_partition

    def accepted(nodes: int) -> bool:
        try:
            dirichlet_partition(labels, nodes, alpha, seed)
        except ValueError:
            return False
        return True

    low, high = 0, refused  # accepted(low) holds (0 vacuously), accepted(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if accepted(middle) else (low, middle)
    return low


def planned_profiles(job: RunConfig, node_configs: list[dict], sizes: list[int], preset: str) -> dict[int, dict] | None:
    """The profiles the nodes will report in their QUERY reply (fedfill.profile's rule, the
    ClientApp's), with D_loc their partition's size. None where a node reads a board or its
    own files: only it knows its profile."""
    from fedfill.profile import node_profile
    from strategies.allocation.presets import drawn_device_profile

    profiles = {}
    for k, config in enumerate(node_configs):
        if config.get("data-dir") or config.get("sysfs-root"):
            return None
        partition = int(config.get("partition-id", k))
        profiles[k] = node_profile(config, sizes[partition], lambda: drawn_device_profile(
            preset, partition, job.num_partitions, job.seed))  # noqa: B023 - called at once
    return profiles


@contextmanager
def _quiet_flower():
    """The strategy logs every infeasible plan (and Flower its settings) as warnings: not
    while probing budgets."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_first_plan(job: RunConfig, profiles: dict[int, dict], with_generator: bool | None = None) -> None:
    """Round 1's plan as the strategy makes it (devices that make it infeasible sit out), for
    as many devices as a round samples (which ones, Flower's node ids decide: a draw of the
    fleet stands in for them): a budget that plans nobody trains nobody, so refuse it and name
    the smallest --t-max that plans every device."""
    import numpy as np

    from jobs import load_job
    from server.app import run_system
    from strategies.fimi_strategy import FimiFedAvg

    job_impl = load_job(job)
    model_params = int(sum(w.size for w in job_impl.initial_weights()))
    compute_params = job_impl.compute_params()

    count = sampled_count(len(profiles), job.fraction_train, job.min_train_nodes)
    sampled = sorted(np.random.default_rng(job.seed).choice(list(profiles), size=count, replace=False).tolist())

    def planned(t_max: float):
        system = run_system(replace(job, t_max_s=t_max), model_params, profiles, job_impl.preset, compute_params,
                            with_generator)
        with _quiet_flower():
            strategy = FimiFedAvg(system, job.policy, profiles, seed=job.seed, bits_rule=job.bits_rule)
            return strategy.plan_round(1, sampled)

    plan, nodes = planned(job.t_max_s)
    if nodes:
        return
    why = "; ".join(f"{r['constraint']}: {r['message']}" for r in plan.reasons) or "no device can be planned"
    smallest = smallest_t_max(lambda t: len(planned(t)[1]) == count, job.t_max_s)
    works = f"--t-max {smallest:.3g} or more plans every device" if smallest else "no --t-max up to 1e6 s plans them"
    devices = f"the {count} devices" + (f" sampled of {len(profiles)}" if count < len(profiles) else "")
    raise UsageError(f"{flag_of('t_max_s')} {job.t_max_s:g}: the {job.policy} plan of round 1 leaves every one of "
                     f"{devices} out ({why}); {works}")


def smallest_t_max(plans_all, refused: float, limit: float = 1e6) -> float | None:
    """A budget above `refused` for which `plans_all(t_max)` holds, within 10 % of the
    smallest (None when even `limit` fails): doubling, then bisection. Each feasible plan
    costs the planner a second or more, hence the coarse answer."""
    high = max(refused, 1e-3) * 2
    while not plans_all(high):
        if high >= limit:
            return None
        high *= 2
    low = high / 2 if high / 2 > refused else refused
    while high / low > 1.1:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if plans_all(middle) else (middle, high)
    return high


def check_job(job: RunConfig, node_configs: list[dict] | None = None, with_generator: bool | None = None) -> None:
    """Everything about a run that can be known before it starts, cheapest first. Round 1's
    plan is checked where the nodes' profiles can be known: `node_configs` (the testbed's,
    a scenario's), else the drawn profiles of simulated nodes; pass [] when the nodes are
    someone else's (--superlink). `with_generator`: whether the run will have a generation
    service (default: whether the job names one's address; `fedfill run` starts its own)."""
    check_settings(job)
    from jobs import job_class

    try:
        job_class(job.job).check(job)  # CheckpointError is a ValueError
    except ValueError as err:
        raise UsageError(str(err)) from None
    partitions = check_split(job)
    if node_configs == []:
        return
    from jobs import load_job

    configs = node_configs or [{"partition-id": k, "num-partitions": job.num_partitions}
                               for k in range(job.num_partitions)]
    profiles = planned_profiles(job, configs, [len(p) for p in partitions], load_job(job).preset)
    if profiles is not None:
        check_first_plan(job, profiles, with_generator)


# ---------------------------------------------------------------------------- a Ray cluster
RAY_CONNECT_TIMEOUT_S = 5.0  # a TCP connection to the head's GCS port
RAY_PROBE_TIMEOUT_S = 30.0  # a Ray driver's connection and its look at the nodes (about 1 s here)
# Run as a driver of its own, in a process of its own: ray.init retries an address that does not
# answer for a minute or more, and a timeout here ends the process, never this one.
_RAY_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, include_dashboard=False)
nodes = [{"id": n["NodeID"], "ip": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU", 0),
          "gpus": n["Resources"].get("GPU", 0)} for n in ray.nodes() if n["Alive"] and n["Resources"]]
print(json.dumps({"ray": ray.__version__, "here": ray.util.get_node_ip_address(), "nodes": nodes}))
"""


def check_ray_cluster(option: str, address: str, cpus: int, gpus: float, *, local_generator: bool = False) -> str:
    """The Ray cluster at `address` (HOST:PORT of its head, or auto) answers a driver of this
    interpreter (the same Python and Ray versions: Ray refuses others) within seconds, and one
    of its nodes has room for a ClientApp of `cpus` CPUs and `gpus` of a GPU (Flower sizes its
    actor pool node by node the same way, and stops the run, minutes in, where no node has).
    With the generation service started here (`local_generator`), every node must be on this
    machine: the service listens on loopback. Returns the cluster in words; UsageError otherwise."""
    if "://" in address:
        raise UsageError(f"{option} {address}: a Ray Client address; give the head's GCS address HOST:PORT "
                         "(what `ray start --head` prints, port 6379 by default)")
    if address != "auto":
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UsageError(f"{option} {address}: expected HOST:PORT of the Ray head (port 6379 by default) or auto")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
        except OSError as err:
            raise UsageError(f"{option} {address}: no Ray cluster answers there ({err.strerror or err}); start "
                             f"one with `ray start --head --port {port}` or give the address its head printed") from None
    try:
        probe = subprocess.run([sys.executable, "-c", _RAY_PROBE, address], capture_output=True, text=True,
                               timeout=RAY_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UsageError(f"{option} {address}: no Ray answered a driver there within {RAY_PROBE_TIMEOUT_S:.0f} s "
                         "(is it the head's GCS port, the one `ray start --head` printed?)") from None
    if probe.returncode != 0:
        lines = [line.strip() for line in probe.stderr.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
        raise UsageError(f"{option} {address}: a Ray driver could not join the cluster: {reason[:400]}")
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    nodes = found["nodes"]
    # Flower's pool_size_from_resources: whole ClientApps per node, GPUs only where asked for
    fits = [int(n["cpus"] // cpus) if not gpus else min(int(n["cpus"] // cpus), int(n["gpus"] / gpus))
            for n in nodes]
    if sum(fits) == 0:
        have = ", ".join(f"{n['cpus']:g} CPUs" + (f" {n['gpus']:g} GPUs" if n["gpus"] else "") for n in nodes)
        raise UsageError(f"{option} {address}: no node of the cluster ({have or 'no node with resources'}) has room "
                         f"for a ClientApp of {cpus} CPUs" + (f" and {gpus:g} GPU" if gpus else "")
                         + "; lower --client-cpus" + (" or --client-gpus" if gpus else "") + " or add nodes")
    elsewhere = sorted({n["ip"] for n in nodes} - {found["here"]})
    if local_generator and elsewhere:
        raise UsageError(f"{option} {address}: nodes on other machines ({', '.join(elsewhere)}) cannot reach the "
                         "generation service --generator auto starts on this machine's loopback; start one they "
                         "reach and pass --generator HOST:PORT, or run with --generator none")
    total = sum(n["cpus"] for n in nodes)
    gpu_total = sum(n["gpus"] for n in nodes)
    return (f"Ray {found['ray']}, {len(nodes)} node{'s' if len(nodes) != 1 else ''}, {total:g} CPUs"
            + (f", {gpu_total:g} GPUs" if gpu_total else "") + f", room for {sum(fits)} ClientApps at a time")
