"""ServerApp, for any job (jobs): profiles by QUERY, a plan per round, screened updates
merged by FedAvg (or the run's robust rule), central evaluation, a checkpoint and a report row
every round."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.common import log

import fedfill
from fedfill import contract
from fedfill.config import RunConfig, sampled_count
from fedfill.data import real_dataset
from jobs import held_out, load_job, training_data
from server.checkpoint import read_checkpoint, write_checkpoint
from server.report import RunReport
from server.timed_grid import TimedGrid
from strategies.allocation import LearningModel, ScenarioError, System, check_device_profile
from strategies.allocation.learning import shipped_fit
from strategies.allocation.presets import PAPER_OMEGA_PER_PARAM, fimi_scenario, ondemand_scenario
from strategies.fimi_strategy import FimiFedAvg, wait_for_nodes

app = ServerApp()


def collect_profiles(grid: Grid, expected: int, wait_s: float, timeout_s: float) -> dict[int, dict]:
    """Ask every online node for its device profile (a Flower QUERY message)."""
    node_ids = wait_for_nodes(grid, expected, wait_s)
    messages = [Message(RecordDict({}), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
    profiles = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        node_id = reply.metadata.src_node_id
        try:
            if reply.has_error():
                raise contract.ReplyError(reply.error.reason)
            profiles[node_id] = accept_profile(reply.content)
        except contract.ReplyError as err:
            log(WARNING, "node %d did not report a profile: %s", node_id, err)
    log(INFO, "device profiles from %d node(s)", len(profiles))
    return profiles


def accept_profile(content: RecordDict) -> dict:
    """A node's profile as the server keeps it: read and checked by the contract, its figures
    in the planner's ranges; ReplyError naming the field otherwise (the node sits out)."""
    profile = contract.read_profile(content)
    try:
        check_device_profile(profile)
    except ScenarioError as err:
        raise contract.ReplyError(str(err)) from None
    return profile


def learning_model(run: RunConfig) -> LearningModel | None:
    """The run's learning-model fit: the file it names, else the one shipped for its dataset
    (synthetic-digits: the digits' one, whose test set it keeps)."""
    return LearningModel.load(run.learning_fit) if run.learning_fit else shipped_fit(real_dataset(run.dataset))


def run_system(run: RunConfig, model_params: int, profiles: dict[int, dict], preset: str = "fimi",
               compute_params: int | None = None, with_generator: bool | None = None) -> System:
    """The job's paper system with this run's model size, T_max and local epochs, for the
    devices a round samples (--fraction of the fleet): they share the round's band.

    ondemand ([ODQ §IV-A]): no synthetic data; C, the cycles per sample, scaled to the
    size of the network a step runs through (`compute_params`, Job.compute_params: the whole
    UNet under LoRA too; default `model_params`, the exchanged size) from [ODQ]'s
    3.25 Mcycles for 37M parameters.

    fimi ([FIMI §V-A]), with the run's learning fit.

    [FIMI] gives no zeta; we set it so that the error target at [FIMI]'s Delta_max
    (0.2) asks, on average, for `synthetic_fraction` more data per device than it holds
    (design choice, see README); the run's own Delta_max then moves the target from there
    ([FIMI Fig. 5f]: a smaller one asks for more synthetic data). `with_generator`: whether
    the run has a generation service (default: whether it names one's address).
    """
    per_round = max(1, sampled_count(len(profiles), run.fraction_train, run.min_train_nodes))
    if preset == "ondemand":
        base = ondemand_scenario(per_round, run.seed).system
        return replace(base, model_params=float(model_params),
                       omega=PAPER_OMEGA_PER_PARAM * (compute_params or model_params),
                       t_max_s=run.t_max_s, tau=float(run.local_epochs))
    learning = learning_model(run)
    base = fimi_scenario(per_round, run.seed, learning).system
    mean_d_loc = float(np.mean([p["d_loc"] for p in profiles.values()])) if profiles else 1.0
    model = learning or LearningModel(base.alpha, base.beta, base.gamma)
    target_mean_error = float(model.error(mean_d_loc * (1.0 + run.synthetic_fraction)))
    zeta = base.rounds * (1.0 - target_mean_error) / -math.log(base.delta_max)
    # without a generation service no synthetic sample can arrive: plan none, rather than a
    # plan (and its modeled energy) for samples no device will train on
    with_generator = bool(run.generator_address) if with_generator is None else with_generator
    d_gen_max = 2.0 * mean_d_loc if with_generator else 0.0
    return replace(base, model_params=float(model_params), t_max_s=run.t_max_s, tau=float(run.local_epochs),
                   bandwidth_hz=1e6 * per_round, zeta=zeta, d_gen_max=d_gen_max, delta_max=run.delta_max)


def server_synthetic_set(run: RunConfig, local_samples: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic data a server keeps (SST's, and what CLSD trains on): as much as FIMI's
    error target asks for on average (synthetic_fraction x the devices' `local_samples`),
    spread evenly over the classes, from the run's generation service."""
    from generation.client import GenerationClient

    from strategies.allocation.augmentation import synthetic_request

    if not run.generator_address:
        raise RuntimeError("the server's synthetic data needs a generation service (--generator)")
    total = int(round(run.synthetic_fraction * local_samples))
    counts = synthetic_request("fimi-uniform", np.zeros(num_classes), total)
    client = GenerationClient(run.generator_address, timeout_s=600.0, retries=2)
    return client.generate(counts.tolist(), seed=run.seed * 1_000_003 + 999_983, steps=run.generator_steps,
                           guidance=run.generator_guidance)


def complementary_update(run: RunConfig, job, profiles: dict[int, dict]):
    """SST's server update: every round the server trains the global model on the synthetic
    data it keeps (server_synthetic_set), as a device would (tau epochs, the job's step), and
    hands the change over."""
    images, labels = server_synthetic_set(run, int(sum(p["d_loc"] for p in profiles.values())), job.num_classes)
    log(INFO, "SST: the server keeps %d synthetic samples and trains on them every round", len(labels))

    def update(weights: list[np.ndarray], server_round: int):
        result = job.train(weights, images, labels, seed=run.seed * 1000 + server_round * 100 + 99)
        return [w - g for w, g in zip(result.weights, weights)], len(labels), result.loss

    return update


def environment() -> dict:
    """What this ServerApp runs on: a run on another interpreter or torch than the installed
    ones (Flower's runtime dependency installation) shows here."""
    import torch

    return {"python": sys.executable, "torch": torch.__version__, "fedfill": str(Path(fedfill.__file__).parent)}


def delivery_planner(run: RunConfig):
    """--delivery auto: a function of the planned devices' profiles and synthetic counts that
    picks each one's delivery [MEG] with strategies.allocation.delivery, under the run's fill
    budget (its round budget T_max), downlink rate, receive power and service capacity; the
    generator's size and cycles per pass from its checkpoint's weights."""
    from generation.checkpoint import parameter_count, weights_bytes
    from generation.config import shipped_checkpoint
    from strategies.allocation.delivery import DeliveryProblem, solve_delivery
    from strategies.allocation.presets import model_pass_cycles

    checkpoint = Path(run.generator_checkpoint) if run.generator_checkpoint else shipped_checkpoint(run.dataset)
    cycles, download = model_pass_cycles(parameter_count(checkpoint)), weights_bytes(checkpoint)
    image_shape = tuple(held_out(run).test.images.shape[1:])  # [H, W, C]
    side = image_shape[0]
    factors = tuple(r for r in (2, 4) if side % r == 0) or (side,)

    def plan(profiles: dict[int, dict], images: dict[int, int]) -> dict[int, dict]:
        nodes = list(images)
        problem = DeliveryProblem(
            images=[images[n] for n in nodes], eps=[profiles[n]["eps"] for n in nodes],
            f_max=[profiles[n]["f_max_hz"] for n in nodes], downlink_bps=run.delivery_downlink_bps,
            steps=run.generator_steps, image_bytes=int(np.prod(image_shape)), cycles_per_pass=cycles,
            t_fill_s=run.t_max_s, holds_generator=[bool(profiles[n].get("holds_generator")) for n in nodes],
            generator_bytes=download, server_capacity=run.delivery_server_passes or math.inf,
            downlink_weight=run.delivery_rx_power_w, sketch_factors=factors)
        solved = solve_delivery(problem)
        if not solved.feasible:  # the service's images, as without a planner, and why
            log(WARNING, "delivery plan infeasible: %s; the service sends images", "; ".join(solved.reasons))
            return {n: {"gen_delivery": "image"} for n in nodes}
        gap = solved.objective - solved.lower_bound
        log(INFO, "delivery plan: %s; the devices' fill %.4g J (Lagrangian bound %.4g J, gap %.2g), %d server "
            "UNet passes", ", ".join(sorted({o.mode for o in solved.options})), solved.objective, solved.lower_bound,
            gap, int(solved.server_passes.sum()))
        return {n: {"gen_delivery": o.mode, "gen_server_steps": o.handoff, "gen_state_bits": o.bits,
                    "gen_sketch_factor": o.factor} for n, o in zip(nodes, solved.options)}

    return plan


# a pricer trained at start: environment steps (4000 GDM steps take about 30 s on one idle CPU core)
PRICER_TRAIN_STEPS = {"gdm": 4000, "ppo": 4000, "random": 0}


def pricing_of(run: RunConfig, profiles: dict[int, dict], out_dir: Path):
    """--pricing: the round pricing of strategies.pricing for these nodes, or None (off). A
    learned pricer is loaded from --pricer, or trained at start for this many nodes (saved in
    the report's pricer/). The thetas the devices of a simulation draw are recomputed here for
    the oracle only (the report's leader_utility_oracle, and --pricing exact, which is it):
    no other pricing reads them."""
    from fedfill.config import parse_pricing
    from strategies.allocation.offloading import simulated_theta
    from strategies.pricing import RoundPricing

    kind, fixed = parse_pricing(run.pricing)
    if kind == "off":
        return None
    missing = [n for n, p in profiles.items() if contract.CAPACITY_FIELD not in p]
    if missing:
        raise RuntimeError(f"--pricing {run.pricing}: node(s) {missing} reported no {contract.CAPACITY_FIELD}")
    thetas = {n: simulated_theta(run.seed, p[contract.PARTITION_FIELD], p[contract.CAPACITY_FIELD],
                                 run.pricing_server_cost)
              for n, p in profiles.items() if p.get(contract.PARTITION_FIELD) is not None}
    pricing = RoundPricing(kind, profiles=profiles, steps=run.generator_steps, server_cost=run.pricing_server_cost,
                           revenue=run.pricing_revenue, refresh=run.synthetic_refresh, fixed_price=fixed,
                           thetas=thetas if len(thetas) == len(profiles) else None, seed=run.seed)
    if kind in ("gdm", "ppo", "random"):
        most_images = int(np.ceil(2.0 * max(p["d_loc"] for p in profiles.values())))  # the plan's d_gen_max
        pricing.pricer = learned_pricer(run, kind, [pricing.capacity[n] for n in pricing.order], most_images,
                                        out_dir)
    return pricing


def learned_pricer(run: RunConfig, kind: str, capacities: list[float], most_images: int, out_dir: Path):
    """--pricer's checkpoint when it plays this many devices, else one trained now and saved
    under pricer/: on games of this fleet's public figures (its capacities, in the order the
    pricing plays them), each device needing 1 to `most_images` images, and thetas drawn from
    the leader's prior (entry prices in the simulation's range): what the leader knows of the
    game it will play, and nothing it does not."""
    from strategies.allocation.offloading import ENTRY_RANGE, device_game
    from strategies.learned.envs import GameDraw
    from strategies.learned.pricers import load_pricer, save_pricer, train_pricer

    devices = len(capacities)
    if run.pricer:
        pricer = load_pricer(run.pricer)
        if pricer.kind == kind and pricer.draw.devices == devices:
            log(INFO, "pricing: the %s pricer of %s", kind, run.pricer)
            return pricer
        log(WARNING, "pricing: %s is a %s pricer of %d devices; %d reported a profile: training one for them",
            run.pricer, pricer.kind, pricer.draw.devices, devices)
    steps = PRICER_TRAIN_STEPS[kind]
    public = device_game(np.ones(devices), capacities, np.ones(devices), run.generator_steps,
                         run.pricing_server_cost, run.pricing_revenue)
    draw = GameDraw.around(public, entry=ENTRY_RANGE, weight_range=(1, max(most_images, 1)))
    started = time.monotonic()
    pricer = train_pricer(kind, draw, steps, seed=run.seed)
    saved = save_pricer(pricer, out_dir / "pricer")
    log(INFO, "pricing: trained a %s pricer for %d devices (%d environment steps on this fleet's public figures, "
        "%.0f s), saved in %s", kind, devices, steps, time.monotonic() - started, saved)
    return pricer


def device_traces(run: RunConfig, profiles: dict[int, dict]):
    """--traces: the trace of every device (checked before the run started; again here, as a
    file can change), or None. Each node must name its partition: the trace is keyed by it."""
    if not run.traces:
        return None
    from strategies.allocation.traces import TraceError, load_traces

    unnamed = [n for n, p in profiles.items() if p.get(contract.PARTITION_FIELD) is None]
    try:
        traces = load_traces(run.traces)
        traces.check_fleet(run.num_partitions)
    except TraceError as err:
        raise RuntimeError(f"--traces {run.traces}: {err}") from None
    if unnamed:
        raise RuntimeError(f"--traces: node(s) {unnamed} reported no partition id, which the trace is keyed by")
    log(INFO, "device traces from %s: %d devices", run.traces, len(traces.devices))
    return traces


class DivergedModel(RuntimeError):
    """The global model went non-finite: every later round would train from NaN, so stop."""


def check_finite(server_round: int, weights: list[np.ndarray], evaluation: dict[str, float], lr: float,
                 watched: tuple[str, ...] = ()) -> None:
    """Stop a run whose merged model, or one of its `watched` test figures (Job.finite_metrics),
    is no longer finite, before its checkpoint is overwritten. An update can be finite yet so
    large that the model's outputs overflow (mnist5k at the digits' lr: norms of 8e10, loss NaN
    after the merge)."""
    if all(np.isfinite(w).all() for w in weights) and all(math.isfinite(evaluation[k]) for k in watched):
        return
    raise DivergedModel(f"round {server_round}: the merged model is no longer finite ({evaluation}); an update "
                        f"diverged and was merged. Lower --lr (now {lr:g}) or screen updates (--norm-bound); "
                        f"the checkpoint keeps round {server_round - 1}'s model")


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunConfig.from_run_config(context.run_config)
    grid = TimedGrid(grid)  # replies pulled every 0.1 s, not Flower's 3 s, and each one's upload timed
    job = load_job(run)
    weights = job.initial_weights()
    model_params = int(sum(w.size for w in weights))
    out_dir = Path(run.out_dir)
    profiles = collect_profiles(grid, run.num_partitions, run.node_wait_s, run.reply_timeout_s)
    if not profiles:
        raise RuntimeError("no node reported a device profile: nothing to train")
    system = run_system(run, model_params, profiles, job.preset, job.compute_params())
    report = RunReport(out_dir, {"job": run.job, "policy": run.policy, "dataset": run.dataset,
                                 "aggregation": run.aggregation, "norm_bound": run.norm_bound,
                                 "norm_screen": run.norm_screen, "alpha": run.dirichlet_alpha, "seed": run.seed,
                                 "nodes": len(profiles), "fraction": run.fraction_train,
                                 "min_nodes": run.min_train_nodes, "training_data": training_data(run),
                                 "model_params": model_params}, metrics=job.metrics)
    (out_dir / "system.json").write_text(json.dumps(system.__dict__, indent=1) + "\n")
    (out_dir / "profiles.json").write_text(json.dumps({str(k): v for k, v in profiles.items()}, indent=1) + "\n")
    strategy = FimiFedAvg(system, run.policy, profiles, seed=run.seed, node_wait_s=run.node_wait_s,
                          on_plan=report.write_plan, on_round_metrics=report.round_costs,
                          upload_seconds=grid.upload_seconds, pushed_at=grid.pushed_at, addressee=grid.addressee,
                          fraction_train=run.fraction_train, min_train_nodes=run.min_train_nodes,
                          bits_rule=run.bits_rule,
                          aggregation=run.aggregation, trim_beta=run.trim_beta, norm_bound=run.norm_bound,
                          norm_screen=run.norm_screen,
                          complementary_update=(complementary_update(run, job, profiles)
                                                if run.synthetic_use == "server" else None),
                          delivery_planner=delivery_planner(run) if run.delivery == "auto" else None,
                          pricing=pricing_of(run, profiles, out_dir), traces=device_traces(run, profiles))
    initial, done = ArrayRecord(weights), 0
    checkpoint = out_dir / "checkpoint.npz"
    resumed_run = run.resume and checkpoint.exists()  # also from round 0's checkpoint, where done is 0
    if resumed_run:
        done, resumed = read_checkpoint(checkpoint, weights)
        initial = ArrayRecord(resumed)
        report.resume_from(done)
        strategy.round_offset = done
        strategy.clock = report.rows[-1].get("virtual_s", 0.0) if report.rows else 0.0
        # the adaptive screen's memory of the steps the model took while it was learning
        strategy.screen.peak_median = max((row["norm_median"] for row in report.rows if "norm_median" in row),
                                          default=0.0)
        log(INFO, "resuming after round %d of %d from %s", done, run.rounds, checkpoint)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and resumed_run:
            return None  # the resumed model was evaluated when it was saved
        server_round += done
        weights = arrays.to_numpy_ndarrays()
        evaluation = job.evaluate(weights)
        row = report.add_round(server_round, evaluation)
        check_finite(server_round, weights, evaluation, run.lr, job.finite_metrics)
        write_checkpoint(checkpoint, server_round, weights)
        log(INFO, "round %d: %s, energy so far %.3f J, uplink %.2f MB", server_round,
            ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items()), row["energy_j"], row["uplink_bytes"] / 1e6)
        return MetricRecord(evaluation)

    final = initial
    if run.rounds > done:
        result = strategy.start(grid, initial, num_rounds=run.rounds - done, timeout=run.reply_timeout_s,
                                train_config=ConfigRecord({"local-epochs": run.local_epochs}), evaluate_fn=evaluate)
        final = result.arrays
    saved = job.save(final.to_numpy_ndarrays(), out_dir)
    summary = report.summary({"environment": environment(), **({"model": saved} if saved else {})})
    report.plot()
    log(INFO, "done: best %s %s, energy %.3f J; report in %s", job.metrics[0], summary[f"best_{job.metrics[0]}"],
        summary["energy_j"], out_dir)
