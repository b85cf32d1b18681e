"""What the server and a device say to each other: every record key, and the builders and
readers of each message. The ClientApp and the strategy both import this module and never
each other, so a key or a field is named once.

  QUERY reply     ConfigRecord "profile": the device profile (PROFILE_FIELDS; never the
                  class histogram, only D_loc leaves the device), and PARTITION_FIELD when
                  the node config names the node's partition (reports name nodes by it);
                  or, from a node that cannot take part (its own data unusable), no profile
                  and ConfigRecord "note" saying why: the node sits the run out
  TRAIN           ArrayRecord "arrays": the global model as one Array "payload" whose bytes
                  are the codec's payload at 32 bits (raw float32, exact for the float32
                  models of both jobs). Flower moves every record, array and chunk as an
                  object with a request of its own at each hop: a message is 5 objects so,
                  2L + 3 for a model of L layers as Flower's per-layer record (33 for the
                  classifier, 421 for the UNet). A model with other dtypes goes per layer.
                  ConfigRecord "config": this node's own plan entry (NodePlan) and the
                  round's train config
  TRAIN reply     ArrayRecord "update": one Array whose bytes are the codec's payload
                  (stype CODEC_STYPE); MetricRecord "metrics": TrainMetrics, "num-examples"
                  being the FedAvg weight D_loc + D_gen (FIMI S4); ConfigRecord "note": what
                  the device did about synthetic data, in words; ConfigRecord "runtime":
                  where the ClientApp ran ("ray-node": the Ray node id on Flower's
                  simulation engine), left out where there is nothing to say
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedfill.codec import MAX_BITS, MIN_BITS
from fedfill.codec import VERSION as CODEC_VERSION

ARRAYS_KEY = "arrays"  # Flower's default arrayrecord_key: the global model
CONFIG_KEY = "config"  # Flower's default configrecord_key: the node's plan and train config
PROFILE_KEY = "profile"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"
NOTE_KEY = "note"
RUNTIME_KEY = "runtime"
RAY_NODE_KEY = "ray-node"
CODEC_STYPE = f"fedfill.codec/v{CODEC_VERSION}"  # Array.stype of a quantized update

# A device profile as the planner reads it (scenario JSON device fields, SI units). The
# node-config keys of a real device are the same names in kebab-case (`f-max-hz`, ...).
PROFILE_FIELDS = ("f_max_hz", "eps", "p_max_w", "gain")  # what an operator must give, all or none
# bits: the device's fixed upload width; quant_error: its relative error demand ([ODQ]);
# codec_constant: K of its last update (fedfill.codec.codec_constant), which the server keeps
# up to date from the replies so that its next bits are planned on its own statistics
OPTIONAL_PROFILE_FIELDS = {"bits": int, "quant_error": float, "codec_constant": float}  # name -> type
PARTITION_FIELD = "partition_id"  # the node's partition id in its profile: a name for it, not planned on
# priced offloading [GenMEN]: C_n, the step-images (sampler steps of one image) a device can run a
# round, public; its preference theta_n (node config THETA_KEY) is never put in a profile or message
CAPACITY_FIELD = "gen_capacity"
THETA_KEY = "gen-theta"


def node_config_key(profile_field: str) -> str:
    return profile_field.replace("_", "-")


class ReplyError(ValueError):
    """A reply that cannot be used, with the reason the server logs."""


def _shown(value) -> str:
    """A value as a reason quotes it: a hostile node's megabyte string is cut short."""
    if isinstance(value, int) and abs(value) >= 10**30:  # (repr fails beyond 4,300 digits)
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4,000'} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _figure(value, where: str, *, whole: bool = False, positive: bool = False, signed: bool = False,
            at_most: float | None = None):
    """`value` if it is a finite number (not a bool) that fits the rule, else ReplyError naming
    `where`: non-negative unless `signed`, non-zero if `positive`, whole if `whole`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyError(f"{where} must be a number, got {_shown(value)}")
    try:
        x = float(value)
    except OverflowError:  # an integer beyond float range
        x = math.inf
    if not math.isfinite(x):
        raise ReplyError(f"{where} must be finite, got {_shown(value)}")
    if (x < 0 and not signed) or (positive and x <= 0):
        raise ReplyError(f"{where} must be {'positive' if positive else 'non-negative'}, got {_shown(value)}")
    if whole and x != math.floor(x):
        raise ReplyError(f"{where} must be a whole number, got {_shown(value)}")
    if at_most is not None and x > at_most:
        raise ReplyError(f"{where} must be at most {at_most:g}, got {_shown(value)}")
    return value


def _bits(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        raise ReplyError(f"{where} must be an integer from {MIN_BITS} to {MAX_BITS}, got {_shown(value)}")
    return value


# ---------------------------------------------------------------------------- QUERY
def profile_reply(profile: dict) -> RecordDict:
    return RecordDict({PROFILE_KEY: ConfigRecord(profile)})


def sit_out_reply(reason: str) -> RecordDict:
    """A node's answer to QUERY when it cannot take part: the reason, and no profile (so the
    server never plans it; the round goes on with the others)."""
    return RecordDict({NOTE_KEY: ConfigRecord({"note": reason or "no reason given"})})


def read_profile(content: RecordDict) -> dict:
    """The node's device profile, checked field by field, or ReplyError naming the field at
    fault: D_loc and PROFILE_FIELDS finite positive numbers, the optional fields of their type
    and range, the partition id a whole number or a name, every other field (a board's
    figures, for the report) text, numbers or lists of them. So a profile read here is one the
    planner accepts and the report can write as JSON: one node's broken profile costs that
    node its place, not the run."""
    if PROFILE_KEY not in content.config_records:
        note = content.config_records.get(NOTE_KEY)
        if note is not None:
            raise ReplyError(f"the node sits out: {str(note.get('note', ''))[:200]}")
        raise ReplyError("no device profile in the reply")
    profile = dict(content.config_records[PROFILE_KEY])
    for name in ("d_loc", *PROFILE_FIELDS):
        if name not in profile:
            raise ReplyError(f"profile: missing field '{name}'")
        _figure(profile[name], f"profile field '{name}'", positive=True)
    if "bits" in profile:
        _bits(profile["bits"], "profile field 'bits'")
    if "quant_error" in profile:
        _figure(profile["quant_error"], "profile field 'quant_error' (a relative error demand)", positive=True,
                at_most=math.nextafter(1.0, 0.0))
    if "codec_constant" in profile:
        _figure(profile["codec_constant"], "profile field 'codec_constant'", positive=True)
    if CAPACITY_FIELD in profile:
        _figure(profile[CAPACITY_FIELD], f"profile field '{CAPACITY_FIELD}' (step-images a round)", positive=True,
                at_most=MAX_CAPACITY)
    partition = profile.get(PARTITION_FIELD)
    if partition is not None and not isinstance(partition, str):
        _figure(partition, f"profile field '{PARTITION_FIELD}'", whole=True)
    for name, value in profile.items():
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, bytes) for item in items):
            raise ReplyError(f"profile field '{name}' holds bytes: a profile is text and numbers")
    return profile


# ---------------------------------------------------------------------------- TRAIN
@dataclass(frozen=True)
class NodePlan:
    """One device's share of a round's plan, as the device receives it."""

    server_round: int
    policy: str
    d_gen: int  # synthetic samples to train on (the plan's continuous amount, rounded)
    f_hz: float
    b_hz: float
    p_w: float
    eta: float
    bits: int
    t_cmp_s: float
    t_com_s: float
    e_cmp_j: float
    e_com_j: float
    # the device's relative error demand E||u - Q(u)||^2 / ||u||^2 ([ODQ]); 0: none, the
    # plan's bits are sent as they are
    error_demand: float = 0.0
    # how its synthetic samples reach it [MEG], where the server planned it (--delivery auto);
    # "": the run's own delivery settings. A plan without these keys (an older server) parses.
    gen_delivery: str = ""
    gen_server_steps: int = 0
    gen_state_bits: int = 0
    gen_sketch_factor: int = 0
    # priced offloading [GenMEN]: the server's price per step-image this round (the same for
    # every device); 0 with pricing off, and in a plan from an older server
    gen_price: float = 0.0

    @classmethod
    def from_plan_entry(cls, entry: dict, server_round: int, policy: str, error_demand: float = 0.0) -> "NodePlan":
        """From one device of the plan JSON (strategies.allocation's Plan.to_json)."""
        values = {f.name: entry[f.name] for f in fields(cls) if f.name in entry}
        return cls(server_round=server_round, policy=policy, **{**values, "d_gen": int(round(entry["d_gen"])),
                                                                "bits": int(entry["bits"])},
                   error_demand=float(error_demand))

    @property
    def modeled_energy_j(self) -> float:
        return self.e_cmp_j + self.e_com_j

    def to_config(self) -> dict:
        return {name.replace("_", "-"): value for name, value in asdict(self).items()}

    @classmethod
    def from_config(cls, config) -> "NodePlan":
        """From a TRAIN message's ConfigRecord; a field with a default may be missing. ReplyError
        naming the field when one is missing or not a value of its type and range (a number
        finite and non-negative, a price at most MAX_PRICE): the device refuses the plan
        rather than generate or pay on a NaN."""
        values = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in config:
                if f.default is MISSING:
                    raise ReplyError(f"plan field '{key}' missing")
                continue
            value = config[key]
            if f.type == "str":
                if not isinstance(value, str):
                    raise ReplyError(f"plan field '{key}' must be text, got {_shown(value)}")
                values[f.name] = value
                continue
            if f.name == "bits":
                values[f.name] = _bits(value, "plan field 'bits'")
                continue
            rule = dict(whole=True, at_most=MAX_EXAMPLES) if f.type == "int" else {}
            if f.name == "gen_price":
                rule["at_most"] = MAX_PRICE
            # a planned eta is signed in no policy, but the solver's figures are its own business
            _figure(value, f"plan field '{key}'", signed=f.name == "eta", **rule)
            values[f.name] = int(value) if f.type == "int" else float(value)
        return cls(**values)


MAX_PRICE = 1e15  # the stackelberg module's bound on a game's figures
MAX_CAPACITY = 1e15


def train_message_content(arrays: ArrayRecord, plan: NodePlan, train_config: ConfigRecord) -> RecordDict:
    """A fresh RecordDict per node: each carries that node's own plan (Flower's FedAvg would
    put one shared ConfigRecord in every message); the model goes as `global_model_record`
    makes it (pass the same one to every node: Flower sends an object the messages share once)."""
    return RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({**dict(train_config), **plan.to_config()})})


def global_model_record(arrays: ArrayRecord) -> ArrayRecord:
    """The global model as a TRAIN message carries it (module docstring): one codec payload at
    32 bits when every array is float32, else the per-layer record as it is."""
    from fedfill.codec import encode

    weights = arrays.to_numpy_ndarrays()
    if not all(w.dtype == "float32" for w in weights):
        return arrays
    payload = encode(weights, 32, rng=None)
    return ArrayRecord({"payload": Array(dtype="uint8", shape=(len(payload),), stype=CODEC_STYPE, data=payload)})


def read_global_model(content: RecordDict) -> list:
    """The global model's arrays from a TRAIN message, packed or per layer; ValueError when the
    packed payload is corrupt."""
    from fedfill.codec import decode

    arrays = content[ARRAYS_KEY]
    packed = arrays.get("payload") if len(arrays) == 1 else None
    if packed is not None and packed.stype == CODEC_STYPE:
        return decode(packed.data)
    return arrays.to_numpy_ndarrays()


# ---------------------------------------------------------------------------- TRAIN reply
@dataclass(frozen=True)
class TrainMetrics:
    """The per-node figures of a round, sent in a MetricRecord (Flower's per-node metrics)."""

    num_examples: int  # D_loc + D_gen: the FedAvg weight
    d_gen_used: int
    train_seconds: float  # measured
    train_loss: float
    upload_bytes: int  # the codec payload
    modeled_energy_j: float  # the plan's E_cmp + E_com
    bits: int = 32  # the width sent: the plan's, raised where the plan's missed the error demand
    error_expected: float = 0.0  # exact E||u - Q(u)||^2 / ||u||^2 of the sent width on this update
    error_measured: float = 0.0  # ||u - Q(u)||^2 / ||u||^2 of the payload actually sent
    codec_constant: float = 0.0  # K of this update (fedfill.codec.codec_constant): plans the next bits
    # The round's fill of synthetic samples [MEG] (0 where none was generated this round): bytes
    # the device received (the service's reply as serialized, and the generator the first time
    # a split delivery needed it), UNet passes and seconds on each side, and the cost model's
    # energy of the device's share of the sampling (eps * cycles * f^2, as its training's)
    gen_downlink_bytes: int = 0
    gen_server_unet_evals: int = 0
    gen_server_seconds: float = 0.0
    gen_device_unet_evals: int = 0
    gen_device_seconds: float = 0.0
    gen_device_energy_j: float = 0.0
    # Priced offloading [GenMEN] (0 with pricing off): the plan's price per step-image, the
    # images m_n the device generated this round, the sampler steps k_n of each it ran itself
    # (its best response to the price) and what the server owes it for them, p * k_n * m_n
    gen_price: float = 0.0
    gen_images: int = 0
    gen_local_steps: int = 0
    gen_payment: float = 0.0
    # The board's own energy meter (fedfill.board) over the local step (data, training,
    # quantization; the upload happens after the reply is made): joules and seconds, None
    # where the node has no sensor (then no key is sent: a figure is never invented)
    measured_energy_j: float | None = None
    measured_s: float | None = None
    # When the ClientApp's process began and when its train handler did (Unix seconds, the
    # node's clock): the server sets them against its own push and pull times to say where a
    # round's seconds go (devices.csv's delivery_s, launch_s, handler_s). None: not known.
    process_started_at: float | None = None
    handler_started_at: float | None = None
    # The Ray node the ClientApp ran on (simulation engine; "" elsewhere). Text, so it travels
    # in the reply's "runtime" ConfigRecord: a MetricRecord holds numbers only, and Flower
    # averages it.
    ray_node: str = ""

    def to_record(self) -> MetricRecord:
        """Plain ints and floats (a numpy scalar would pass MetricRecord's check and fail when
        Flower counts the reply's bytes); a figure that is None is left out, text is not a metric."""
        cast = {"int": int, "float": float}
        return MetricRecord({f.name.replace("_", "-"): cast[f.type.split(" ")[0]](getattr(self, f.name))
                             for f in fields(self) if getattr(self, f.name) is not None and f.type != "str"})


WEIGHT_KEY = "num-examples"  # Flower's FedAvg weighted_by_key
# Figures the server reads per node and never averages: a board's meter (only nodes with
# sensors send it, and Flower's FedAvg needs every reply's MetricRecord to hold the same keys)
# and the task's timestamps (an average of clock readings means nothing)
METER_METRICS = ("measured-energy-j", "measured-s")  # only from a node with sensors
TASK_TIME_METRICS = ("process-started-at", "handler-started-at")
NODE_ONLY_METRICS = (*METER_METRICS, *TASK_TIME_METRICS)


def train_reply(payload: bytes, metrics: TrainMetrics, note: str) -> RecordDict:
    """The reply; no note record when there is nothing to say (Flower 1.41's count_bytes
    refuses a ConfigRecord holding an empty string)."""
    update = Array(dtype="uint8", shape=(len(payload),), stype=CODEC_STYPE, data=payload)
    records = {UPDATE_KEY: ArrayRecord({"payload": update}), METRICS_KEY: metrics.to_record()}
    if note:
        records[NOTE_KEY] = ConfigRecord({"note": note})
    if metrics.ray_node:
        records[RUNTIME_KEY] = ConfigRecord({RAY_NODE_KEY: metrics.ray_node})
    return RecordDict(records)


MAX_EXAMPLES = 2**53  # a sample count float64 holds exactly: the FedAvg weights then sum without overflow
# The rule of every TrainMetrics figure but the node-only ones (key -> _figure's keywords; bits apart)
_METRIC_RULES = {
    WEIGHT_KEY: dict(whole=True, positive=True, at_most=MAX_EXAMPLES), "d-gen-used": dict(whole=True),
    "train-seconds": {}, "train-loss": dict(signed=True), "upload-bytes": dict(whole=True),
    "modeled-energy-j": {}, "error-expected": {}, "error-measured": {}, "codec-constant": {},
    "gen-downlink-bytes": dict(whole=True), "gen-server-unet-evals": dict(whole=True), "gen-server-seconds": {},
    "gen-device-unet-evals": dict(whole=True), "gen-device-seconds": {}, "gen-device-energy-j": {},
    "gen-price": dict(at_most=MAX_PRICE), "gen-images": dict(whole=True, at_most=MAX_EXAMPLES),
    "gen-local-steps": dict(whole=True, at_most=MAX_EXAMPLES), "gen-payment": {},
}
# the priced offloading's figures of a node: in devices.csv; the server settles the round from them
PRICING_METRICS = ("gen-price", "gen-images", "gen-local-steps", "gen-payment")
# the fill's figures: per node in devices.csv, summed over the round's used replies in rounds.csv
GENERATION_METRICS = tuple(key for key in _METRIC_RULES if key.startswith("gen-") and key not in PRICING_METRICS)


def read_train_reply(content: RecordDict) -> tuple[bytes, dict, str]:
    """(codec payload, metrics by key, note), or ReplyError naming what is wrong.

    Every TrainMetrics figure must be there (the node-only ones may be) and be a finite number
    within its range: Flower averages the MetricRecords only when all hold the same keys, and
    a NaN or a 1e308 weight would poison the average. Keys the contract does not name are
    left out of the metrics returned; the node-only figures are returned as sent (the strategy
    keeps only sensible ones)."""
    record = content.array_records.get(UPDATE_KEY)
    array = record.get("payload") if record is not None else None
    if array is None:
        raise ReplyError("no quantized update in the reply")
    if array.stype != CODEC_STYPE:
        raise ReplyError(f"update of serialization type {_shown(array.stype)}, expected {CODEC_STYPE!r}")
    metrics = content.metric_records.get(METRICS_KEY)
    if metrics is None:
        raise ReplyError("no metrics in the reply")
    for key, rule in _METRIC_RULES.items():
        if key not in metrics:
            raise ReplyError(f"metric '{key}' missing from the reply")
        _figure(metrics[key], f"metric '{key}'", **rule)
    if "bits" not in metrics:
        raise ReplyError("metric 'bits' missing from the reply")
    _bits(metrics["bits"], "metric 'bits'")
    if metrics["d-gen-used"] > metrics[WEIGHT_KEY]:
        raise ReplyError(f"metric 'd-gen-used' {metrics['d-gen-used']} exceeds {WEIGHT_KEY} {metrics[WEIGHT_KEY]}")
    note_record = content.config_records.get(NOTE_KEY)
    note = note_record.get("note", "") if note_record is not None else ""
    if not isinstance(note, str):
        raise ReplyError(f"the reply's note must be text, got {type(note).__name__}")
    known = (*_METRIC_RULES, "bits", *NODE_ONLY_METRICS)
    return array.data, {key: metrics[key] for key in known if key in metrics}, note


def node_figure(metrics, key: str) -> float | None:
    """A node-only figure (NODE_ONLY_METRICS) of a reply's metrics as a float, or None where
    the node sent none or one that is not a finite non-negative number: a meter's nonsense is
    no figure, and no reason to drop the node's update."""
    try:
        return float(_figure(metrics[key], f"metric '{key}'")) if key in metrics else None
    except ReplyError:
        return None


MAX_RAY_NODE = 128  # Ray's node ids are 56 hex digits; a longer text is no node id


def read_ray_node(content: RecordDict) -> str:
    """The Ray node a reply's ClientApp ran on, or "" where it sent none or one that is not a
    Ray node id (hex digits): a report column, never a reason to drop the update."""
    record = content.config_records.get(RUNTIME_KEY)
    node = record.get(RAY_NODE_KEY, "") if record is not None else ""
    if not isinstance(node, str) or not 0 < len(node) <= MAX_RAY_NODE:
        return ""
    return node if all(c in "0123456789abcdefABCDEF" for c in node) else ""


def reply_bytes(content: RecordDict) -> int:
    """Bytes a reply carried, as Flower counts its records (payload, keys and values). A record
    Flower 1.41's count_bytes trips on (an empty string or an empty list in it: a node's
    reply, so never a reason to stop the round) is counted here by the same rule."""
    total = 0
    for record in content.values():
        try:
            total += record.count_bytes()
        except (ValueError, IndexError):
            total += sum(len(key) + _value_bytes(value) for key, value in record.items())
    return total


def _value_bytes(value) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(item) for item in value)
    if isinstance(value, (str, bytes)):
        return len(value)
    return 1 if isinstance(value, bool) else 8  # ints and floats go as 64 bits
