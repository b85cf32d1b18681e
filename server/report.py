"""What a run leaves behind: rounds.csv, devices.csv, drops.csv, plan_round_N.json, summary.json,
plots, checkpoint.

A row is made of two Flower MetricRecords: the strategy's round costs (energy and latency
from the cost model, cumulated here; uplink bytes as Flower counts the replies' records;
training seconds as the devices measured them; `sampled`, the nodes the round sampled
(--fraction of those connected, at least --min-nodes, those the planner left out included);
`dropped` updates and its classes, which add up to it: dropped_no_reply, dropped_unusable (an error, undecodable, wrong shape, NaN),
dropped_norm (beyond the round's norm bound), dropped_duplicate (a node's second reply in a
round), dropped_offline (its device trace turned it off mid-round)); the virtual clock: virtual_s,
where it stands at the round's end (the modeled round latencies, and the waits for a device to
come on under --traces, summed), virtual_wait_s, this round's wait, beside wall_s, the real
seconds) and the job's central evaluation, plus `dropped_nodes`: the nodes whose update was not
merged, by partition id (the Flower node id where the node did not report one), joined by ';'.
`read_rounds` is the one reader of rounds.csv (the report resuming, `fedfill run` showing
progress, `fedfill compare` tabulating).

devices.csv has a row per planned node and round (and one more per duplicate reply a node
sent, status "dropped"), as the strategy hands them over with the round's costs (its
NODE_FIGURES): the node (its Flower node id) and partition; the plan's bits_planned, modeled
t_cmp_s and t_com_s and the uplink rate that sends M x bits in t_com_s (plan_uplink_bps, bit/s); the bits the device sent, its error demand and the expected and
measured relative error of what it sent; energy_j (the cost model at the bits sent) and
e_cmp_j (its local-step part) beside measured_energy_j and measured_s (the board's own meter
over the local step, fedfill.board; empty where the node has no sensor); the measured
train_s (the device's clock); where the rest of the node's part of the round went: delivery_s
(from the server's push to the ClientApp's train handler), launch_s (the part of it from the
ClientApp process's start: imports and Flower's hand-over), handler_s (from the handler's start
to its reply: data, training, quantizing) and upload_s (server.timed_grid: from the reply's
creation to the server holding it); reply_bytes (the reply's records as Flower counts them), status "used" or "dropped" with the reason, and ray_node (the Ray node id the
ClientApp ran on, simulation engine; empty elsewhere). upload.png plots measured against
modeled upload seconds, energy.png measured against modeled local-step energy.
Rows of a round are written with its rounds.csv row, so a resumed run rewrites none twice.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np

from fedfill import contract

# Per-round columns after the job's evaluation metrics; the cumulative ones come first.
CUMULATIVE = ("energy_j", "latency_s", "uplink_bytes")
# the classes of `dropped` (strategies.fimi_strategy.DROP_CLASSES)
DROPPED_BY_CLASS = ("dropped_no_reply", "dropped_unusable", "dropped_norm", "dropped_duplicate", "dropped_offline")
# the fill of synthetic samples [MEG]: the round's sums over the used replies (fedfill.contract)
GENERATION_COLUMNS = tuple(key.replace("-", "_") for key in contract.GENERATION_METRICS)
GENERATION_INTEGERS = {column for column in GENERATION_COLUMNS if not column.endswith(("_seconds", "_j"))}
# priced offloading [GenMEN] (strategies.pricing): the round's price per step-image, the
# step-images the service and the devices ran, the payments, the realised leader utility and the
# oracle's; empty with pricing off
PRICING_COLUMNS = ("gen_price", "gen_server_steps", "gen_device_steps", "gen_payments", "leader_utility",
                   "leader_utility_oracle")
# the norm screen (strategies.screening): the round's median update norm and the bound it set,
# empty in a round it did not judge; and how many updates it clipped
SCREEN_COLUMNS = ("norm_median", "norm_bound", "clipped")
COST_COLUMNS = (*CUMULATIVE, "round_energy_j", "round_latency_s", "round_uplink_bytes", "sampled", "updates",
                "dropped", *DROPPED_BY_CLASS, *SCREEN_COLUMNS, "wall_s", "virtual_s", "virtual_wait_s", "train_s_max", "train_s_sum", "synthetic_used", "train_loss",
                "dropped_nodes", *GENERATION_COLUMNS, *PRICING_COLUMNS)
INTEGER_COLUMNS = {"round", "uplink_bytes", "round_uplink_bytes", "sampled", "updates", "dropped", *DROPPED_BY_CLASS, "clipped",
                   "synthetic_used", *GENERATION_INTEGERS, "gen_server_steps", "gen_device_steps"}
TEXT_COLUMNS = {"dropped_nodes"}  # kept as written, empty included
# devices.csv: the round, then the strategy's figures of a node (strategies.fimi_strategy.NODE_FIGURES)
NODES_CSV = "devices.csv"
NODE_COLUMNS = ("round", "node", "partition_id", "bits_planned", "bits", "error_demand", "error_expected",
                "error_measured", "t_cmp_s", "t_com_s", "energy_j", "e_cmp_j", "measured_energy_j", "measured_s",
                "plan_uplink_bps", "train_s", "delivery_s", "launch_s", "handler_s", "upload_s", "reply_bytes",
                "status", "reason", "ray_node", "gen_planned", *GENERATION_COLUMNS,
                *(key.replace("-", "_") for key in contract.PRICING_METRICS))
NODE_INTEGER_COLUMNS = {"round", "node", "partition_id", "bits_planned", "bits", "reply_bytes", *GENERATION_INTEGERS,
                        "gen_images", "gen_local_steps"}
NODE_TEXT_COLUMNS = {"status", "reason", "ray_node", "gen_planned"}
DROP_COLUMNS = ("round", "node", "reason")


def _integer(text: str) -> int:
    """An integer written as 12 or 12.0; a 64-bit Flower node id exactly (a float would round it)."""
    try:
        return int(text)
    except ValueError:
        return int(float(text))


def _read_csv(path: str | Path, integers: set[str], texts: set[str]) -> list[dict]:
    """Rows typed: text columns as written, others int or float; an empty number is left out."""
    with open(path) as fh:
        return [{k: v if k in texts else _integer(v) if k in integers else float(v)
                 for k, v in row.items() if k in texts or v != ""}
                for row in csv.DictReader(fh)]


def read_rounds(path: str | Path) -> list[dict]:
    """rounds.csv as a list of rows, integers and floats typed, `dropped_nodes` a string."""
    return _read_csv(path, INTEGER_COLUMNS, TEXT_COLUMNS)


def read_nodes(path: str | Path) -> list[dict]:
    """devices.csv as a list of rows, typed; a figure not known (no reply) is left out."""
    return _read_csv(path, NODE_INTEGER_COLUMNS, NODE_TEXT_COLUMNS)


def node_label(node: dict) -> str:
    """A node's name in rounds.csv and plots: its partition id, else its Flower node id."""
    return str(node["partition_id"] if node.get("partition_id") is not None else node["node"])


class RunReport:
    def __init__(self, out_dir: str | Path, meta: dict, metrics: tuple[str, ...] = ("accuracy", "loss")):
        self._last = time.monotonic()
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.metrics = metrics  # the job's evaluation columns; the first is the headline
        self.columns = ("round", *metrics, *COST_COLUMNS)
        self.rows: list[dict] = []
        self.node_rows: list[dict] = []
        self._costs: dict[int, dict] = {}
        self._nodes: dict[int, list[dict]] = {}

    def resume_from(self, last_round: int) -> None:
        """Take back the rows up to the checkpointed round, so the cumulative costs go on (and
        the per-node rows and drops of a round that never finished go)."""
        self.rows = [row for row in read_rounds(self.dir / "rounds.csv") if row["round"] <= last_round]
        nodes = self.dir / NODES_CSV
        self.node_rows = [row for row in read_nodes(nodes) if row["round"] <= last_round] if nodes.exists() else []
        drops = self.dir / "drops.csv"
        if drops.exists():
            with open(drops) as fh:
                kept = [row for row in csv.DictReader(fh) if int(row["round"]) <= last_round]
            self._write_csv(drops, DROP_COLUMNS, kept)

    def write_plan(self, server_round: int, plan, node_ids: list[int]) -> None:
        data = plan.to_json()
        data["node_ids"] = node_ids
        (self.dir / f"plan_round_{server_round}.json").write_text(json.dumps(data, indent=1) + "\n")

    def round_costs(self, server_round: int, record, nodes: list[dict]) -> None:
        """The strategy's MetricRecord of a round (kebab-case keys) and its figures of each
        planned node (NODE_FIGURES), kept until the round's evaluation writes them."""
        self._costs[server_round] = {key.replace("-", "_"): value for key, value in record.items()}
        self._nodes[server_round] = [{"round": server_round, **node} for node in nodes]

    def add_round(self, server_round: int, evaluation: dict) -> dict:
        costs = self._costs.pop(server_round, {})
        previous = self.rows[-1] if self.rows else {"energy_j": 0.0, "latency_s": 0.0, "uplink_bytes": 0}
        row = {"round": server_round, **{m: evaluation[m] for m in self.metrics}}
        for key in CUMULATIVE:
            zero = 0 if key in INTEGER_COLUMNS else 0.0  # a column keeps one type, round 0 included
            row[key] = previous[key] + costs.get(key, zero)
            row[f"round_{key}"] = costs.get(key, zero)
        row.update({key: costs.get(key, 0) for key in ("sampled", "updates", "dropped", *DROPPED_BY_CLASS,
                                                       "clipped", "synthetic_used")})
        row.update({key: costs.get(key, "") for key in ("norm_median", "norm_bound")})
        row.update({key: costs.get(key, 0.0) for key in ("train_s_max", "train_s_sum")})
        row.update({key: costs.get(key, 0 if key in GENERATION_INTEGERS else 0.0) for key in GENERATION_COLUMNS})
        row.update({key: costs.get(key, "") for key in PRICING_COLUMNS})  # none with pricing off
        row["train_loss"] = costs.get("train_loss", "")  # none before round 1 or when no update came
        # measured: wall time of the round as the server saw it
        row["wall_s"] = time.monotonic() - self._last
        self._last = time.monotonic()
        # modeled: the virtual clock (round 0, and a resumed report older than the column: as before)
        row["virtual_s"] = costs.get("virtual_s", previous.get("virtual_s", 0.0))
        row["virtual_wait_s"] = costs.get("virtual_wait_s", 0.0)
        nodes = self._nodes.pop(server_round, [])
        dropped = [node for node in nodes if node["status"] == "dropped"]
        merged = {node["node"] for node in nodes if node["status"] == "used"}  # a duplicate's first reply stands
        row["dropped_nodes"] = ";".join(dict.fromkeys(node_label(node) for node in dropped
                                                      if node["node"] not in merged))
        self.rows.append(row)
        self._write_csv(self.dir / "rounds.csv", self.columns, self.rows)
        if nodes:
            self.node_rows.extend(nodes)
            self._write_csv(self.dir / NODES_CSV, NODE_COLUMNS, self.node_rows)
        if dropped:  # every update not averaged, with the reason (also in devices.csv)
            path = self.dir / "drops.csv"
            new = not path.exists()
            with open(path, "a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=DROP_COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerows({"round": server_round, "node": node["node"], "reason": node["reason"]}
                                 for node in dropped)
        return row

    @staticmethod
    def _write_csv(path: Path, columns, rows: list[dict]) -> None:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)

    def summary(self, extra: dict | None = None) -> dict:
        headline = self.metrics[0]
        values = [r[headline] for r in self.rows if r["round"] > 0]
        last = self.rows[-1] if self.rows else dict.fromkeys(CUMULATIVE, 0)
        out = {**self.meta, "rounds": len(values),
               f"best_{headline}": max(values) if values else None,
               f"final_{headline}": values[-1] if values else None,
               **{key: last[key] for key in CUMULATIVE},
               # the modeled time beside the real: the virtual clock at the end, the rounds' wall seconds
               "virtual_s": last.get("virtual_s", 0.0), "wall_s": float(sum(r.get("wall_s", 0.0) for r in self.rows)),
               **(extra or {})}
        (self.dir / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
        return out

    def plot(self) -> Path | None:
        """accuracy.png (the headline metric against cumulative energy and time), upload.png and
        energy.png."""
        self.plot_uploads()
        self.plot_energy()
        if len(self.rows) < 2:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        headline = self.metrics[0]
        values = np.array([r[headline] for r in self.rows])
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].plot([r["energy_j"] for r in self.rows], values, marker=".")
        axes[0].set_xlabel("cumulative device energy (J, cost model)")
        axes[1].plot([r["latency_s"] / 3600 for r in self.rows], values, marker=".")
        axes[1].set_xlabel("cumulative latency (h, cost model)")
        for ax in axes:
            ax.set_ylabel(f"global test {headline}")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{self.meta.get('policy', '')} on {self.meta.get('dataset', '')}")
        fig.tight_layout()
        path = self.dir / f"{headline}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def plot_uploads(self) -> Path | None:
        """upload.png: each node's measured upload seconds against the plan's T_com, one point
        per reply (a link shaped to the plan's rate lands on the y = x line)."""
        return self._plot_measured_against_modeled(
            "t_com_s", "upload_s", "upload.png", "modeled upload T_com (s, plan)",
            "measured upload (s, reply created -> pulled)", "uploads", floor=1e-3)

    def plot_energy(self) -> Path | None:
        """energy.png: each node's energy over its local step as its board measured it against
        the cost model's E_cmp (eps is configured or drawn, never measured: the gap is the
        model's), only where nodes have sensors."""
        return self._plot_measured_against_modeled(
            "e_cmp_j", "measured_energy_j", "energy.png", "modeled E_cmp (J, cost model)",
            "measured (J, board's rails over the local step)", "local steps")

    def _plot_measured_against_modeled(self, modeled: str, measured: str, filename: str, xlabel: str,
                                       ylabel: str, what: str, floor: float = 1e-9) -> Path | None:
        """A devices.csv figure as measured against its model: one point per node and round,
        log-log, with the y = x line; nothing when no row has both."""
        rows = [row for row in self.node_rows if row.get(measured) is not None and row.get(modeled)]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

        fig, ax = plt.subplots(figsize=(5.5, 5))
        labels = sorted({node_label(row) for row in rows}, key=lambda label: (len(label), label))
        for label in labels:
            mine = [row for row in rows if node_label(row) == label]
            ax.scatter([row[modeled] for row in mine], [max(row[measured], floor) for row in mine],
                       label=f"node {label}", s=18)
        values = [row[modeled] for row in rows] + [max(row[measured], floor) for row in rows]
        low, high = min(values) / 2, max(values) * 2
        ax.plot([low, high], [low, high], color="grey", lw=1, ls="--", label="measured = modeled")
        ax.set(xscale="log", yscale="log", xlim=(low, high), ylim=(low, high), xlabel=xlabel, ylabel=ylabel)
        subs = (1.0, 2.0, 5.0) if high / low < 1e3 else (1.0,)  # plain numbers at 1, 2, 5 x 10^k, or 10^k
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(LogLocator(subs=subs))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2 if len(labels) > 8 else 1)
        ax.set_title(f"{len(rows)} {what}, {len(labels)} nodes")
        fig.tight_layout()
        path = self.dir / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
