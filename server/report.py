"""What a run leaves behind: rounds.csv, plan_round_N.json, summary.json, plots, checkpoint.

A row is made of two Flower MetricRecords: the strategy's round costs (energy and latency
from the cost model, cumulated here; uplink bytes as Flower counts the replies' records;
training seconds as the devices measured them) and the job's central evaluation.
`read_rounds` is the one reader of rounds.csv (the report resuming, `fedfill run` showing
progress, `fedfill compare` tabulating).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np

# Per-round columns after the job's evaluation metrics; the cumulative ones come first.
CUMULATIVE = ("energy_j", "latency_s", "uplink_bytes")
COST_COLUMNS = (*CUMULATIVE, "round_energy_j", "round_latency_s", "round_uplink_bytes", "updates", "dropped",
                "wall_s", "train_s_max", "train_s_sum", "synthetic_used", "train_loss")
INTEGER_COLUMNS = {"round", "uplink_bytes", "round_uplink_bytes", "updates", "dropped", "synthetic_used"}


def read_rounds(path: str | Path) -> list[dict]:
    """rounds.csv as a list of rows, integers and floats typed."""
    with open(path) as fh:
        return [{k: int(float(v)) if k in INTEGER_COLUMNS else float(v) for k, v in row.items() if v != ""}
                for row in csv.DictReader(fh)]


class RunReport:
    def __init__(self, out_dir: str | Path, meta: dict, metrics: tuple[str, ...] = ("accuracy", "loss")):
        self._last = time.monotonic()
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.metrics = metrics  # the job's evaluation columns; the first is the headline
        self.columns = ("round", *metrics, *COST_COLUMNS)
        self.rows: list[dict] = []
        self._costs: dict[int, dict] = {}

    def resume_from(self, last_round: int) -> None:
        """Take back the rows up to the checkpointed round, so the cumulative costs go on."""
        self.rows = [row for row in read_rounds(self.dir / "rounds.csv") if row["round"] <= last_round]

    def write_plan(self, server_round: int, plan, node_ids: list[int]) -> None:
        data = plan.to_json()
        data["node_ids"] = node_ids
        (self.dir / f"plan_round_{server_round}.json").write_text(json.dumps(data, indent=1) + "\n")

    def round_costs(self, server_round: int, record, drops: list[dict]) -> None:
        """The strategy's MetricRecord of a round (kebab-case keys), kept until the round's
        evaluation; each dropped update goes to drops.csv with its reason."""
        self._costs[server_round] = {key.replace("-", "_"): value for key, value in record.items()}
        if drops:
            path = self.dir / "drops.csv"
            new = not path.exists()
            with open(path, "a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=("round", "node", "reason"))
                if new:
                    writer.writeheader()
                writer.writerows({"round": server_round, **drop} for drop in drops)

    def add_round(self, server_round: int, evaluation: dict) -> dict:
        costs = self._costs.pop(server_round, {})
        previous = self.rows[-1] if self.rows else {"energy_j": 0.0, "latency_s": 0.0, "uplink_bytes": 0}
        row = {"round": server_round, **{m: evaluation[m] for m in self.metrics}}
        for key in CUMULATIVE:
            zero = 0 if key in INTEGER_COLUMNS else 0.0  # a column keeps one type, round 0 included
            row[key] = previous[key] + costs.get(key, zero)
            row[f"round_{key}"] = costs.get(key, zero)
        row.update({key: costs.get(key, 0) for key in ("updates", "dropped", "synthetic_used")})
        row.update({key: costs.get(key, 0.0) for key in ("train_s_max", "train_s_sum")})
        row["train_loss"] = costs.get("train_loss", "")  # none before round 1 or when no update came
        # measured: wall time of the round as the server saw it
        row["wall_s"] = time.monotonic() - self._last
        self._last = time.monotonic()
        self.rows.append(row)
        with open(self.dir / "rounds.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        return row

    def summary(self, extra: dict | None = None) -> dict:
        headline = self.metrics[0]
        values = [r[headline] for r in self.rows if r["round"] > 0]
        last = self.rows[-1] if self.rows else dict.fromkeys(CUMULATIVE, 0)
        out = {**self.meta, "rounds": len(values),
               f"best_{headline}": max(values) if values else None,
               f"final_{headline}": values[-1] if values else None,
               **{key: last[key] for key in CUMULATIVE}, **(extra or {})}
        (self.dir / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
        return out

    def plot(self) -> Path | None:
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
