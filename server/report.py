"""What a run leaves behind: rounds.csv, plan_round_N.json, summary.json, plots, checkpoint.

Energy and latency are the cost model's (cumulative); uplink bytes are what the replies
actually carried, measured on the serialized messages.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

ROUND_COLUMNS = ("round", "accuracy", "loss", "energy_j", "latency_s", "uplink_bytes",
                 "round_energy_j", "round_latency_s", "round_uplink_bytes", "updates", "dropped",
                 "wall_s", "train_s_max", "train_s_sum", "synthetic_used")


class RunReport:
    def __init__(self, out_dir: str | Path, meta: dict):
        import time

        self._clock = time.monotonic
        self._last = self._clock()
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.rows: list[dict] = []

    def resume_from(self, last_round: int) -> None:
        """Take back the rows up to the checkpointed round, so the cumulative costs go on."""
        with open(self.dir / "rounds.csv") as fh:
            rows = [row for row in csv.DictReader(fh) if int(row["round"]) <= last_round]
        numeric = {k: (int if k in ("round", "uplink_bytes", "round_uplink_bytes", "updates", "dropped",
                                    "synthetic_used") else float) for k in ROUND_COLUMNS}
        self.rows = [{k: numeric[k](float(v)) for k, v in row.items() if k in numeric} for row in rows]

    def write_plan(self, server_round: int, plan, node_ids: list[int]) -> None:
        data = plan.to_json()
        data["node_ids"] = node_ids
        (self.dir / f"plan_round_{server_round}.json").write_text(json.dumps(data, indent=1) + "\n")

    def add_round(self, server_round: int, accuracy: float, loss: float, costs: dict) -> dict:
        previous = self.rows[-1] if self.rows else {"energy_j": 0.0, "latency_s": 0.0, "uplink_bytes": 0}
        row = {"round": server_round, "accuracy": accuracy, "loss": loss,
               "energy_j": previous["energy_j"] + costs.get("energy_j", 0.0),
               "latency_s": previous["latency_s"] + costs.get("latency_s", 0.0),
               "uplink_bytes": previous["uplink_bytes"] + costs.get("uplink_bytes", 0),
               "round_energy_j": costs.get("energy_j", 0.0), "round_latency_s": costs.get("latency_s", 0.0),
               "round_uplink_bytes": costs.get("uplink_bytes", 0), "updates": costs.get("updates", 0),
               "dropped": len(costs.get("dropped", [])),
               # measured: wall time of the round as the server saw it, and the clients' own training time
               "wall_s": self._clock() - self._last, "train_s_max": costs.get("train_s_max", 0.0),
               "train_s_sum": costs.get("train_s_sum", 0.0), "synthetic_used": costs.get("synthetic_used", 0)}
        self._last = self._clock()
        self.rows.append(row)
        with open(self.dir / "rounds.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=ROUND_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        return row

    def summary(self) -> dict:
        accuracies = [r["accuracy"] for r in self.rows if r["round"] > 0]
        out = {**self.meta, "rounds": len(accuracies),
               "best_accuracy": max(accuracies) if accuracies else None,
               "final_accuracy": accuracies[-1] if accuracies else None,
               "energy_j": self.rows[-1]["energy_j"] if self.rows else 0.0,
               "latency_s": self.rows[-1]["latency_s"] if self.rows else 0.0,
               "uplink_bytes": self.rows[-1]["uplink_bytes"] if self.rows else 0}
        (self.dir / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
        return out

    def plot(self) -> Path | None:
        if len(self.rows) < 2:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        acc = np.array([r["accuracy"] for r in self.rows])
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].plot([r["energy_j"] for r in self.rows], acc, marker=".")
        axes[0].set_xlabel("cumulative device energy (J, cost model)")
        axes[1].plot([r["latency_s"] / 3600 for r in self.rows], acc, marker=".")
        axes[1].set_xlabel("cumulative latency (h, cost model)")
        for ax in axes:
            ax.set_ylabel("global test accuracy")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{self.meta.get('policy', '')} on {self.meta.get('dataset', '')}")
        fig.tight_layout()
        path = self.dir / "accuracy.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
