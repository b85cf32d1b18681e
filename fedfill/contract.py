"""What the server and a device say to each other: every record key, and the builders and
readers of each message. The ClientApp and the strategy both import this module and never
each other, so a key or a field is named once.

  QUERY reply     ConfigRecord "profile": the device profile (PROFILE_FIELDS; never the
                  class histogram, only D_loc leaves the device), and PARTITION_FIELD when
                  the node config names the node's partition (reports name nodes by it);
                  or, from a node that cannot take part (its own data unusable), no profile
                  and ConfigRecord "note" saying why: the node sits the run out
  TRAIN           ArrayRecord "arrays" (the global model) and ConfigRecord "config": this
                  node's own plan entry (NodePlan) and the round's train config
  TRAIN reply     ArrayRecord "update": one Array whose bytes are the codec's payload
                  (stype CODEC_STYPE); MetricRecord "metrics": TrainMetrics, "num-examples"
                  being the FedAvg weight D_loc + D_gen (FIMI S4); ConfigRecord "note": what
                  the device did about synthetic data, in words
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedfill.codec import VERSION as CODEC_VERSION

ARRAYS_KEY = "arrays"  # Flower's default arrayrecord_key: the global model
CONFIG_KEY = "config"  # Flower's default configrecord_key: the node's plan and train config
PROFILE_KEY = "profile"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"
NOTE_KEY = "note"
CODEC_STYPE = f"fedfill.codec/v{CODEC_VERSION}"  # Array.stype of a quantized update

# A device profile as the planner reads it (scenario JSON device fields, SI units). The
# node-config keys of a real device are the same names in kebab-case (`f-max-hz`, ...).
PROFILE_FIELDS = ("f_max_hz", "eps", "p_max_w", "gain")  # what an operator must give, all or none
# bits: the device's fixed upload width; quant_error: its relative error demand (seed 000);
# codec_constant: K of its last update (fedfill.codec.codec_constant), which the server keeps
# up to date from the replies so that its next bits are planned on its own statistics
OPTIONAL_PROFILE_FIELDS = {"bits": int, "quant_error": float, "codec_constant": float}  # name -> type
PARTITION_FIELD = "partition_id"  # the node's partition id in its profile: a name for it, not planned on


def node_config_key(profile_field: str) -> str:
    return profile_field.replace("_", "-")


class ReplyError(ValueError):
    """A reply that cannot be used, with the reason the server logs."""


# ---------------------------------------------------------------------------- QUERY
def profile_reply(profile: dict) -> RecordDict:
    return RecordDict({PROFILE_KEY: ConfigRecord(profile)})


def sit_out_reply(reason: str) -> RecordDict:
    """A node's answer to QUERY when it cannot take part: the reason, and no profile (so the
    server never plans it; the round goes on with the others)."""
    return RecordDict({NOTE_KEY: ConfigRecord({"note": reason or "no reason given"})})


def read_profile(content: RecordDict) -> dict:
    if PROFILE_KEY not in content.config_records:
        note = content.config_records.get(NOTE_KEY)
        if note is not None:
            raise ReplyError(f"the node sits out: {note.get('note', '')}")
        raise ReplyError("no device profile in the reply")
    return dict(content.config_records[PROFILE_KEY])


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
    # the device's relative error demand E||u - Q(u)||^2 / ||u||^2 (seed 000); 0: none, the
    # plan's bits are sent as they are
    error_demand: float = 0.0

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
        types = {f.name: f.type for f in fields(cls)}
        cast = {"int": int, "float": float, "str": str}
        return cls(**{name: cast[types[name]](config[name.replace("_", "-")]) for name in types})


def train_message_content(arrays: ArrayRecord, plan: NodePlan, train_config: ConfigRecord) -> RecordDict:
    """A fresh RecordDict per node: each carries that node's own plan (Flower's FedAvg would
    put one shared ConfigRecord in every message)."""
    return RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({**dict(train_config), **plan.to_config()})})


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
    # The board's own energy meter (fedfill.board) over the local step (data, training,
    # quantization; the upload happens after the reply is made): joules and seconds, None
    # where the node has no sensor (then no key is sent: a figure is never invented)
    measured_energy_j: float | None = None
    measured_s: float | None = None

    def to_record(self) -> MetricRecord:
        """Plain ints and floats (a numpy scalar would pass MetricRecord's check and fail when
        Flower counts the reply's bytes); a figure that is None is left out."""
        cast = {"int": int, "float": float}
        return MetricRecord({f.name.replace("_", "-"): cast[f.type.split(" ")[0]](getattr(self, f.name))
                             for f in fields(self) if getattr(self, f.name) is not None})


WEIGHT_KEY = "num-examples"  # Flower's FedAvg weighted_by_key
# Figures only some nodes send (a board with sensors): the server reads them per node and
# never averages them (Flower's FedAvg needs every reply's MetricRecord to hold the same keys)
NODE_ONLY_METRICS = ("measured-energy-j", "measured-s")


def train_reply(payload: bytes, metrics: TrainMetrics, note: str) -> RecordDict:
    """The reply; no note record when there is nothing to say (Flower 1.41's count_bytes
    refuses a ConfigRecord holding an empty string)."""
    update = Array(dtype="uint8", shape=(len(payload),), stype=CODEC_STYPE, data=payload)
    records = {UPDATE_KEY: ArrayRecord({"payload": update}), METRICS_KEY: metrics.to_record()}
    if note:
        records[NOTE_KEY] = ConfigRecord({"note": note})
    return RecordDict(records)


def read_train_reply(content: RecordDict) -> tuple[bytes, dict, str]:
    """(codec payload, metrics by key, note), or ReplyError naming what is wrong."""
    record = content.array_records.get(UPDATE_KEY)
    array = record.get("payload") if record is not None else None
    if array is None:
        raise ReplyError("no quantized update in the reply")
    if array.stype != CODEC_STYPE:
        raise ReplyError(f"update of serialization type {array.stype!r}, expected {CODEC_STYPE!r}")
    metrics = content.metric_records.get(METRICS_KEY)
    if metrics is None:
        raise ReplyError("no metrics in the reply")
    weight = metrics.get(WEIGHT_KEY)
    if not isinstance(weight, (int, float)) or not weight > 0 or weight == float("inf"):
        raise ReplyError(f"bad {WEIGHT_KEY} {weight!r}")
    note_record = content.config_records.get(NOTE_KEY)
    note = str(note_record.get("note", "")) if note_record is not None else ""
    return array.data, dict(metrics), note


def reply_bytes(content: RecordDict) -> int:
    """Bytes a reply carried, as Flower counts its records (payload, keys and values)."""
    return sum(record.count_bytes() for record in content.values())
