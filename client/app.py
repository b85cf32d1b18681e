"""ClientApp: a device of the fleet, for any job (jobs).

query: report the device profile (never the class histogram: only D_loc leaves the device),
or sit the run out, with the reason, when the node's own data cannot be used.
train: follow this node's plan — fill the missing classes with synthetic samples (the
request rule of strategies.allocation.augmentation), train tau epochs on local + synthetic
data, upload the update quantized to the plan's bits with its figures in a MetricRecord.

It speaks to the server only through fedfill.contract: it never imports the strategy.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass, replace
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.common import log

from client import faults
from fedfill import contract
from fedfill.board import BoardProfile, EnergyMeter, read_board
from fedfill.config import RunConfig, parse_attack
from fedfill.data import ImageDataset, NodeDataError
from jobs import Job, load_job
from fedfill.profile import node_profile

app = ClientApp()

#: What the handlers import on first use, for the warm ClientApp's fork-server (client.warm)
#: to import once per node instead of once per task: the app, torch, the classifier job and
#: torch._dynamo (a first optimizer step imports it and ~800 modules with it: 1.5 s of a
#: 0.1 s step) before the node serves (WARM_FIRST); the codec, the request rule, the
#: generation client, the embedded dataset and the diffusion job (diffusers alone takes ~5 s)
#: once a task has imported them (a classifier-only node never loads diffusers).
WARM_IMPORTS = ("client.app", "torch", "jobs.classifier", "torch._dynamo", "fedfill.codec",
                "strategies.allocation.augmentation", "strategies.allocation.presets", "generation.client",
                "sklearn.datasets", "jobs.ddpm", "generation.lora", "generation.pipeline")
WARM_FIRST = 4

SYNTHETIC_KEY = "synthetic"  # context.state record holding this device's generated samples
GENERATOR_KEY = "generator-checkpoint"  # node config: the generator a split delivery is completed with;
# in context.state: the device holds it (its download was counted)
DATA_DIR_KEY = "data-dir"  # node config: the node's own files (class folders or an .npz)
SYSFS_ROOT_KEY = "sysfs-root"  # node config: read the board's profile and meter its energy there


def node_partition(run: RunConfig, context: Context) -> tuple[int, int]:
    """(partition id, number of partitions) from the node config (Flower sets them in simulation)."""
    return (int(context.node_config.get("partition-id", 0)),
            int(context.node_config.get("num-partitions", run.num_partitions)))


def local_data(run: RunConfig, job: Job, context: Context) -> ImageDataset:
    """What this node trains on: its own files when the node config names a data-dir (a real
    board), else its partition of the run's global split (simulation, the testbed). Raises
    NodeDataError when the node's own files cannot be used."""
    data_dir = str(context.node_config.get(DATA_DIR_KEY, ""))
    if data_dir:
        return job.own_data(data_dir)
    return job.node_data(*node_partition(run, context))


def board_root(context: Context) -> str | None:
    """The root of this board's sysfs when the node config names one (`sysfs-root`: "/" on a
    board, a copied tree in tests): the node then reads its profile from the board and meters
    its energy. None in simulation, where nodes share a host and a meter would measure it all."""
    root = str(context.node_config.get(SYSFS_ROOT_KEY, ""))
    return root or None


def device_profile(run: RunConfig, context: Context, d_loc: int, preset: str = "fimi",
                   board: BoardProfile | None = None) -> dict:
    """This node's profile (fedfill.profile's rule): its node config, its board, the draw."""
    def draw() -> dict:
        from strategies.allocation.presets import drawn_device_profile

        return drawn_device_profile(preset, *node_partition(run, context), run.seed)

    return node_profile(context.node_config, d_loc, draw, board.profile_fields() if board is not None else None)


@app.query()
def query(message: Message, context: Context) -> Message:
    run = RunConfig.from_run_config(context.run_config)
    job = load_job(run)
    try:
        data = local_data(run, job, context)
    except NodeDataError as err:  # the round goes on with the other nodes
        log(WARNING, "this node sits the run out: %s", err)
        return Message(contract.sit_out_reply(str(err)), reply_to=message)
    root = board_root(context)
    board = read_board(root) if root else None
    if board is not None:
        log(INFO, "board at %s: %s", root, board.profile_fields() or "nothing measurable")
    profile = device_profile(run, context, len(data), job.preset, board)
    if run.pricing != "off":  # its capacity for the server's sampler steps is public; its theta never leaves
        profile[contract.CAPACITY_FIELD] = generation_capacity(run, context, profile["f_max_hz"])
    return Message(contract.profile_reply(profile), reply_to=message)


def generation_capacity(run: RunConfig, context: Context, f_max_hz: float) -> float:
    """C_n in step-images a round (strategies.allocation.offloading): the node config's
    `gen-capacity`, else what its f_max buys in the run's budget at the generator's cycles."""
    given = context.node_config.get(contract.node_config_key(contract.CAPACITY_FIELD))
    if given is not None:
        return float(given)
    from generation.checkpoint import parameter_count
    from generation.config import shipped_checkpoint
    from strategies.allocation.offloading import step_capacity
    from strategies.allocation.presets import model_pass_cycles

    checkpoint = str(context.node_config.get(GENERATOR_KEY, "")) or run.generator_checkpoint
    cycles = model_pass_cycles(parameter_count(Path(checkpoint) if checkpoint else shipped_checkpoint(run.dataset)))
    return step_capacity(f_max_hz, run.pricing_budget_s, cycles)


def node_theta(run: RunConfig, context: Context, capacity: float) -> float:
    """This device's private preference theta_n: the node config's `gen-theta`, else (simulation,
    where a node has no config file of its own) the run's draw for its partition. Used here
    only: it is never put in the profile nor in any message."""
    given = context.node_config.get(contract.THETA_KEY)
    if given is not None:
        return float(given)
    from strategies.allocation.offloading import simulated_theta

    return simulated_theta(run.seed, node_partition(run, context)[0], capacity, run.pricing_server_cost)


def priced_delivery(run: RunConfig, context: Context, plan: contract.NodePlan, f_max_hz: float):
    """With pricing on: a function of the images m this round needs that gives the delivery
    of the device's best response k to the plan's price (the service runs the first S - k
    steps: k = 0 its images, k = S a seed) and the figures the reply reports."""
    from strategies.allocation.offloading import best_response

    steps = run.generator_steps
    capacity = generation_capacity(run, context, f_max_hz)
    theta = node_theta(run, context, capacity)

    def respond(images: int) -> tuple[dict, dict]:
        k = best_response(plan.gen_price, theta, capacity, images, steps)
        mode = "image" if k == 0 else "seed" if k >= steps else "state"
        delivery = {"delivery": mode, "server_steps": steps - k if mode == "state" else 0,
                    "state_bits": run.delivery_state_bits, "sketch_factor": run.delivery_sketch_factor}
        return delivery, {"gen_images": int(images), "gen_local_steps": int(k),
                          "gen_payment": float(plan.gen_price * k * images)}

    return respond


def delivery_of(run: RunConfig, plan: contract.NodePlan | None = None) -> dict:
    """How this round's samples reach the device: the plan's choice where the server planned
    one (--delivery auto), else the run's settings."""
    if plan is not None and plan.gen_delivery:
        return {"delivery": plan.gen_delivery, "server_steps": plan.gen_server_steps,
                "state_bits": plan.gen_state_bits or run.delivery_state_bits,
                "sketch_factor": plan.gen_sketch_factor or run.delivery_sketch_factor}
    return {"delivery": "image" if run.delivery == "auto" else run.delivery,
            "server_steps": run.delivery_server_steps or run.generator_steps // 2,
            "state_bits": run.delivery_state_bits, "sketch_factor": run.delivery_sketch_factor}


def fetch_synthetic(run: RunConfig, context: Context, request: np.ndarray, image_shape, delivery: dict | None = None,
                    *, refresh: float = 0.0, salt: int = 0, offload=None):
    """Generated samples per the request, reusing what this device already holds, delivered in
    `delivery` ([MEG]: delivery_of's; default: the service samples them), or hands part or
    all of the sampling to this device. `refresh`: the fraction of the held samples the request
    would use that are dropped first (the oldest), so they are generated anew (with `salt` in the
    seed: new images, not the service's cache). `offload(m)` (priced offloading) gives the
    delivery for the m images the round generates, and the figures it adds to the fill.

    Returns (images, labels, note, fill): the note says what happened (it goes back in the
    reply); fill holds the round's generation figures (TrainMetrics' gen_* fields, 0 where
    nothing was generated). When the service cannot be reached, or what it sent cannot be
    completed here, the device trains on what it holds and says so.
    """
    state = context.state
    held = state.array_records.get(SYNTHETIC_KEY)
    images = held["images"].numpy() if held else np.zeros((0, *image_shape), np.uint8)
    labels = held["labels"].numpy() if held else np.zeros(0, np.int64)
    have = np.bincount(labels, minlength=request.size)
    if refresh > 0 and len(labels):
        images, labels = _drop_oldest_used(images, labels, request, refresh)
        have = np.bincount(labels, minlength=request.size)
    shortfall = np.maximum(request - have, 0)
    note = "cached" if shortfall.sum() == 0 and request.sum() > 0 else ""
    fill: dict = {}
    if shortfall.sum() > 0:
        if not run.generator_address:
            note = "no generation service configured: local data only"
        else:
            from generation.client import GenerationUnavailable
            from generation.delivery import DigestMismatch

            seed = int(context.node_config.get("partition-id", 0)) * 1_000_003 + int(have.sum()) + salt
            delivery = delivery or delivery_of(run)
            priced = {}
            if offload is not None:
                delivery, priced = offload(int(shortfall.sum()))
            try:
                new_images, new_labels, fill = _generate(run, context, shortfall, seed, delivery)
                fill.update(priced)
            except GenerationUnavailable as err:  # an outage degrades to what the device holds, never fails the round
                note = f"generation service unavailable ({err}): trained without the missing samples"
                log(WARNING, note)
            except (DigestMismatch, ValueError) as err:  # a fill that cannot be completed here: dropped, said why
                note = f"{delivery['delivery']} delivery not completed ({err}): trained without the missing samples"
                log(WARNING, note)
            else:
                images, labels = np.concatenate([images, new_images]), np.concatenate([labels, new_labels])
                state[SYNTHETIC_KEY] = ArrayRecord({"images": Array(images), "labels": Array(labels)})
                mode = delivery["delivery"]
                note = f"generated {int(shortfall.sum())}" + (f" ({mode} delivery)" if mode != "image" else "")
    # Use exactly the requested count per class from what is held.
    pick = np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(request)]).astype(int)
    return images[pick], labels[pick], note, fill


def _drop_oldest_used(images: np.ndarray, labels: np.ndarray, request: np.ndarray, fraction: float):
    """The held samples less round(fraction x u) of the u ones the request would use, the
    oldest first (samples are appended as generated)."""
    used = np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(request)]).astype(int)
    drop = np.sort(used)[:int(round(fraction * len(used)))]
    keep = np.setdiff1d(np.arange(len(labels)), drop)
    return images[keep], labels[keep]


def fill_deadline_s(run: RunConfig) -> float:
    """How long a device waits for its fill: half of what the server waits for its reply
    (the rest is for training and the upload), at least 120 s. A 28x28 fill of a few hundred
    DDPM samples outlasts a fixed 120 s on a shared CPU service."""
    return max(120.0, 0.5 * run.reply_timeout_s)


def _generate(run: RunConfig, context: Context, counts: np.ndarray, seed: int, delivery: dict):
    """(images, labels, fill figures) of one request to the service in the `delivery` mode,
    completed on this device where the mode asks it to."""
    from generation.client import GenerationClient

    client = GenerationClient(run.generator_address, timeout_s=fill_deadline_s(run), retries=2)
    delivered = client.fetch(counts.tolist(), seed=seed, steps=run.generator_steps, guidance=run.generator_guidance,
                             **delivery)
    fill = {"gen_downlink_bytes": delivered.downlink_bytes, "gen_server_unet_evals": delivered.server_unet_evals,
            "gen_server_seconds": delivered.server_seconds}
    if delivered.delivery == "image":
        return delivered.images, delivered.labels, fill
    from generation.config import shipped_checkpoint
    from generation.delivery import finish

    generator = device_generator(str(context.node_config.get(GENERATOR_KEY, "")) or run.generator_checkpoint
                                 or str(shipped_checkpoint(run.dataset)))
    finished = finish(delivered, generator.config, generator.pipe, steps=run.generator_steps,
                      guidance=run.generator_guidance, seed=seed, digest=generator.digest)
    if GENERATOR_KEY not in context.state.config_records:  # the first completed split fill downloaded the generator
        fill["gen_downlink_bytes"] += generator.download_bytes
        context.state[GENERATOR_KEY] = ConfigRecord({"digest": generator.digest})
    fill.update(gen_device_unet_evals=finished.device_unet_evals, gen_device_seconds=finished.device_seconds,
                device_cycles=finished.device_unet_evals * generator.cycles_per_pass)
    return finished.images, finished.labels, fill


@dataclass(frozen=True)
class DeviceGenerator:
    """The generator a device completes split deliveries with, loaded once per process."""

    config: object
    pipe: object
    digest: str  # generation.checkpoint.weights_digest: what the service's reply must name
    download_bytes: int  # its weights files: what fetching it once costs a device
    cycles_per_pass: float  # the cost model's cycles of one UNet pass of one image


@functools.lru_cache(maxsize=2)
def device_generator(checkpoint: str) -> DeviceGenerator:
    """`checkpoint` loaded, with what the cost model needs: its weights' bytes and its cycles
    per pass ([ODQ]'s cycles per parameter, as the device's training is modeled)."""
    from generation.checkpoint import load_generator, parameter_count, weights_bytes, weights_digest
    from strategies.allocation.presets import model_pass_cycles

    path = Path(checkpoint)
    config, pipe = load_generator(path)
    return DeviceGenerator(config, pipe, weights_digest(pipe), weights_bytes(path),
                           model_pass_cycles(parameter_count(path)))


def quantize_update(update: list[np.ndarray], plan: contract.NodePlan, rng: np.random.Generator) -> tuple[bytes, dict]:
    """The codec payload of an update at the plan's bits, raised where they miss the device's
    error demand on this very update ([ODQ]'s promise kept on the device), and the figures
    that say so: bits sent, the exact expected and the measured relative error, and the codec
    constant K the server plans this device's next bits with."""
    from fedfill import codec

    bits = plan.bits
    if plan.error_demand > 0 and bits < 32:
        bits = codec.bits_for_demand(update, plan.error_demand, at_least=bits)
    payload = codec.encode(update, bits, rng)
    figures = {"bits": int(bits), "error_expected": 0.0, "error_measured": 0.0,
               "codec_constant": float(codec.codec_constant(update, bits))}
    if bits < 32:
        norm = float(sum(np.sum(np.square(u, dtype=np.float64)) for u in update))
        sent = codec.decode(payload)
        figures["error_expected"] = float(codec.relative_error(update, bits))
        figures["error_measured"] = (float(sum(np.sum(np.square(u.astype(np.float64) - s)) for u, s in zip(update, sent)))
                                     / norm if norm > 0 else 0.0)
    return payload, figures


def process_started_at() -> float | None:
    """When this process began (Unix seconds; a warm ClientApp's: when it was forked), from
    Linux's /proc; None elsewhere. With the handler's own start it shows the ClientApp's
    launch: imports and Flower's hand-over of the task."""
    try:  # the start in clock ticks since boot; /proc/uptime (0.01 s) sets it on today's clock
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def ray_node() -> str:
    """The Ray node this ClientApp runs on (the simulation engine runs it in a Ray actor, on
    whichever node of the cluster Ray placed it), "" elsewhere. Ray is only asked where this
    process loaded it already: a deployment engine's or a board's ClientApp never imports it."""
    ray = sys.modules.get("ray")
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - a report column, never a reason to fail the round
        return ""


@app.train()
def train(message: Message, context: Context) -> Message:
    """The local step, metered by the board's rails where the node has them."""
    handler_started_at = time.time()
    plan = contract.NodePlan.from_config(message.content[contract.CONFIG_KEY])
    if os.environ.get(faults.HOLD_FILE_ENV):  # fault injection (--kill-at): hold in this phase until killed
        faults.at_training(plan.server_round)
    root = board_root(context)
    meter = EnergyMeter(root).start() if root else None
    try:
        payload, metrics, note = local_step(message, context, plan)
    finally:  # a failed step still joins the meter's thread (a warm process lives on)
        reading = meter.stop() if meter is not None else None
    metrics = replace(metrics, process_started_at=process_started_at(), handler_started_at=handler_started_at,
                      ray_node=ray_node())
    if reading is not None and reading.joules is not None:
        metrics = replace(metrics, measured_energy_j=reading.joules, measured_s=reading.seconds)
    if reading is not None:
        log(INFO, "the board measured %s over %.2f s (the plan models E_cmp %.4g J)",
            f"{reading.joules:.4g} J" if reading.joules is not None else "no energy (no sensor)", reading.seconds,
            plan.e_cmp_j)
    return Message(contract.train_reply(payload, metrics, note), reply_to=message)


def local_step(message: Message, context: Context, plan: contract.NodePlan) -> tuple[bytes, contract.TrainMetrics, str]:
    """Follow the plan: synthetic samples, local training, the update through the codec."""
    from strategies.allocation.augmentation import synthetic_request

    run = RunConfig.from_run_config(context.run_config)
    job = load_job(run)
    partition_id = node_partition(run, context)[0]
    data = local_data(run, job, context)  # NodeDataError: Flower's error reply, the strategy drops the node
    request = synthetic_request(plan.policy, data.class_counts(), plan.d_gen)
    offload = None
    if run.pricing != "off":
        root = board_root(context)  # the f_max its QUERY reported, so the capacity it plays with is the public one
        profile = device_profile(run, context, len(data), job.preset, read_board(root) if root else None)
        offload = priced_delivery(run, context, plan, profile["f_max_hz"])
    syn_images, syn_labels, note, fill = fetch_synthetic(
        run, context, request, data.images.shape[1:], delivery_of(run, plan), refresh=run.synthetic_refresh,
        salt=plan.server_round * 7919 if run.synthetic_refresh > 0 else 0, offload=offload)
    if "device_cycles" in fill:  # the cost model's energy of the device's sampling, at the plan's frequency
        eps = device_profile(run, context, len(data), job.preset)["eps"]
        fill["gen_device_energy_j"] = float(eps * fill.pop("device_cycles") * plan.f_hz ** 2)
    if run.pricing != "off":
        fill["gen_price"] = plan.gen_price
    semi = {}
    if run.synthetic_use == "unlabelled":  # SEMI: the generated samples, their labels withheld
        images, labels, semi = data.images, data.labels, {"unlabelled": syn_images}
    else:
        images = np.concatenate([data.images, syn_images])
        labels = np.concatenate([data.labels, syn_labels])

    global_weights = contract.read_global_model(message.content)
    seed = run.seed * 1000 + plan.server_round * 100 + partition_id
    result = job.train(global_weights, images, labels, seed=seed, threads=int(context.node_config.get("threads", 1)),
                       **semi)
    train_seconds = result.seconds
    update = [w - g for w, g in zip(result.weights, global_weights)]
    if partition_id < run.attackers:  # an experiment's poisoned update (--attack), sent as an honest one
        update = [parse_attack(run.attack) * u for u in update]
        note = (note + "; " if note else "") + f"attacker: {run.attack}"
    payload, figures = quantize_update(update, plan, np.random.default_rng(plan.server_round * 7919 + partition_id))
    if figures["bits"] != plan.bits:
        note = (note + "; " if note else "") + (f"{plan.bits} planned bits miss the error demand "
                                                f"{plan.error_demand:.3g} on this update: sent {figures['bits']}")
    log(INFO, "partition %d: %d local + %d synthetic samples (%s), %.2f s, %d bytes at %d bits",
        partition_id, len(data), len(syn_labels), note or "none asked", train_seconds, len(payload), figures["bits"])
    metrics = contract.TrainMetrics(num_examples=int(len(data) + len(syn_labels)), d_gen_used=int(len(syn_labels)),
                                    train_seconds=train_seconds, train_loss=result.loss, upload_bytes=len(payload),
                                    modeled_energy_j=plan.modeled_energy_j, **figures, **fill)
    return payload, metrics, note
