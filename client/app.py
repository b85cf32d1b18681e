"""ClientApp of the FIMI job.

query: report the device profile (never the class histogram: only D_loc leaves the device).
train: follow this round's plan — fill the missing classes with synthetic samples (eq. 47),
train tau epochs on local + synthetic data, upload the update quantized to the plan's bits.
"""

from __future__ import annotations

import functools
import time
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

from fedfill.job import JobConfig, job_split
from strategies.fimi_strategy import UPLOAD_KEY

app = ClientApp()

PROFILE_KEYS = ("f-max-hz", "eps", "p-max-w", "gain")  # node-config keys of a real device's profile
SYNTHETIC_KEY = "synthetic"  # context.state record holding this device's generated samples


@functools.lru_cache(maxsize=4)
def _partitions(job: JobConfig, num_partitions: int):
    """The clients' pool and its Dirichlet split, once per process (Ray reuses its actors)."""
    from fedfill.partition import dirichlet_partition

    pool = job_split(job).clients
    return pool, dirichlet_partition(pool.labels, num_partitions, job.dirichlet_alpha, job.seed)


def local_data(job: JobConfig, context: Context):
    """This node's Dirichlet share of the clients' pool (the same split on every process)."""
    partition_id = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", job.num_partitions))
    pool, parts = _partitions(job, num_partitions)
    return pool.subset(parts[partition_id]), partition_id, num_partitions


def device_profile(job: JobConfig, context: Context, d_loc: int, partition_id: int, num_partitions: int) -> dict:
    """The profile from the node config when the operator gave one, else drawn as in FIMI §V-A."""
    if all(k in context.node_config for k in PROFILE_KEYS):
        values = {k: float(context.node_config[k]) for k in PROFILE_KEYS}
    else:
        from strategies.allocation.presets import fimi_scenario

        drawn = fimi_scenario(num_partitions, job.seed).devices
        values = {"f-max-hz": drawn.f_max[partition_id], "eps": drawn.eps[partition_id],
                  "p-max-w": drawn.p_max[partition_id], "gain": drawn.gain[partition_id]}
    profile = {"d_loc": float(d_loc), "f_max_hz": values["f-max-hz"], "eps": values["eps"],
               "p_max_w": values["p-max-w"], "gain": values["gain"]}
    if "quant-error" in context.node_config:
        profile["quant_error"] = float(context.node_config["quant-error"])
    if "bits" in context.node_config:
        profile["bits"] = int(context.node_config["bits"])
    return profile


@app.query()
def query(message: Message, context: Context) -> Message:
    job = JobConfig.from_run_config(context.run_config)
    data, partition_id, num_partitions = local_data(job, context)
    profile = device_profile(job, context, len(data), partition_id, num_partitions)
    return Message(RecordDict({"profile": ConfigRecord(profile)}), reply_to=message)


def synthetic_request(policy: str, class_counts: np.ndarray, d_gen: int) -> np.ndarray:
    """Samples wanted per class: eq. 47 water-filling, or all for the rarest class (HDC)."""
    from strategies.allocation.fimi import augmentation_policy

    if d_gen <= 0:
        return np.zeros_like(class_counts)
    if policy == "hdc":
        request = np.zeros_like(class_counts)
        request[np.argmin(class_counts)] = d_gen
        return request
    return augmentation_policy(class_counts, d_gen)


def fetch_synthetic(job: JobConfig, context: Context, request: np.ndarray, image_shape):
    """Generated samples per the request, reusing what this device already holds.

    Returns (images, labels, note). When the service cannot be reached the device trains on
    its local data alone and says so (the note goes back in the reply metrics).
    """
    state = context.state
    held = state.array_records.get(SYNTHETIC_KEY)
    images = held["images"].numpy() if held else np.zeros((0, *image_shape), np.uint8)
    labels = held["labels"].numpy() if held else np.zeros(0, np.int64)
    have = np.bincount(labels, minlength=request.size)
    shortfall = np.maximum(request - have, 0)
    note = "cached" if shortfall.sum() == 0 else ""
    if shortfall.sum() > 0:
        if not job.generator_address:
            note = "no generation service configured: local data only"
        else:
            from generation.client import GenerationClient, GenerationUnavailable

            client = GenerationClient(job.generator_address, timeout_s=120.0, retries=2)
            seed = int(context.node_config.get("partition-id", 0)) * 1_000_003 + int(have.sum())
            try:
                new_images, new_labels = client.generate(shortfall.tolist(), seed=seed, steps=job.generator_steps,
                                                         guidance=job.generator_guidance)
            except GenerationUnavailable as err:  # an outage degrades to what the device holds, never fails the round
                note = f"generation service unavailable ({err}): trained without the missing samples"
                log(WARNING, note)
            else:
                images, labels = np.concatenate([images, new_images]), np.concatenate([labels, new_labels])
                state[SYNTHETIC_KEY] = ArrayRecord({"images": Array(images), "labels": Array(labels)})
                note = f"generated {int(shortfall.sum())}"
    # Use exactly the requested count per class from what is held.
    pick = np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(request)]).astype(int)
    return images[pick], labels[pick], note


@app.train()
def train(message: Message, context: Context) -> Message:
    from fedfill.codec import encode
    from fedfill.models import get_weights, model_for_images, set_weights, train as train_model

    job = JobConfig.from_run_config(context.run_config)
    config = message.content["config"]
    data, partition_id, _ = local_data(job, context)
    request = synthetic_request(str(config.get("policy", job.policy)), data.class_counts(), int(config.get("d-gen", 0)))
    syn_images, syn_labels, note = fetch_synthetic(job, context, request, data.images.shape[1:])
    images = np.concatenate([data.images, syn_images])
    labels = np.concatenate([data.labels, syn_labels])

    global_weights = message.content["arrays"].to_numpy_ndarrays()
    model = model_for_images(data.images.shape, data.num_classes)
    set_weights(model, global_weights)
    seed = job.seed * 1000 + int(config.get("server-round", 0)) * 100 + partition_id
    import torch

    torch.manual_seed(seed)  # dropout draws from the global generator: same seed, same run
    # One thread: a device trains alone, and on a shared host several ClientApps at two threads
    # each oversubscribe the cores and turn the measured training time into contention.
    torch.set_num_threads(int(context.node_config.get("threads", 1)))
    started = time.perf_counter()
    loss = train_model(model, images, labels, epochs=job.local_epochs, lr=job.lr, batch_size=job.batch_size, seed=seed)
    train_seconds = time.perf_counter() - started
    update = [w - g for w, g in zip(get_weights(model), global_weights)]
    bits = int(config.get("bits", 32))
    payload = encode(update, bits, np.random.default_rng(int(config.get("server-round", 0)) * 7919 + partition_id))
    log(INFO, "partition %d: %d local + %d synthetic samples (%s), %.2f s, %d bytes at %d bits",
        partition_id, len(data), len(syn_labels), note or "none asked", train_seconds, len(payload), bits)
    reply = ConfigRecord({
        "update": payload, "num-examples": int(len(labels)), "d-gen-used": int(len(syn_labels)),
        "train-seconds": train_seconds, "train-loss": float(loss), "upload-bytes": len(payload),
        "modeled-energy-j": float(config.get("e-cmp-j", 0.0)) + float(config.get("e-com-j", 0.0)),
        "note": note,
    })
    return Message(RecordDict({UPLOAD_KEY: reply}), reply_to=message)
