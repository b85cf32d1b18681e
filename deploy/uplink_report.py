"""What the testbed's shaped links did, next to what the plan modeled: per node and round, the
plan's T_com, the rate the link was shaped to (plan rate x scale), the upload time that rate
gives the reply's wire bytes, and the measured upload seconds (devices.csv). Written as
uplink.csv and uplink.png beside the run's report.
"""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ("round", "partition_id", "node_id", "t_com_s", "shaped_bps", "reply_bytes", "expected_s", "upload_s")


def uplink_rows(out: Path) -> list[dict]:
    """One row per used update whose link was shaped that round."""
    shaped = {}
    if (out / "shaping.csv").exists():
        with open(out / "shaping.csv") as fh:
            shaped = {(int(r["round"]), int(r["node_id"])): float(r["rate_bps"]) for r in csv.DictReader(fh)
                      if r["applied_at"]}
    from server.report import NODES_CSV, read_nodes

    if not (out / NODES_CSV).exists():
        return []
    rows = []
    for r in read_nodes(out / NODES_CSV):
        key = (r["round"], r["node"])
        if r["status"] != "used" or key not in shaped or r.get("upload_s") is None:
            continue
        rate = shaped[key]
        rows.append({"round": key[0], "partition_id": r.get("partition_id", ""), "node_id": key[1],
                     "t_com_s": r["t_com_s"], "shaped_bps": rate, "reply_bytes": r["reply_bytes"],
                     "expected_s": 8 * r["reply_bytes"] / rate, "upload_s": r["upload_s"]})
    return rows


def write_uplink_report(out: Path) -> list[dict]:
    rows = uplink_rows(out)
    if not rows:
        return rows
    with open(out / "uplink.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for partition in sorted({r["partition_id"] for r in rows}, key=str):
        mine = [r for r in rows if r["partition_id"] == partition]
        ax.scatter([r["expected_s"] for r in mine], [r["upload_s"] for r in mine], label=f"node {partition}", s=28)
    top = max(max(r["expected_s"] for r in rows), max(r["upload_s"] for r in rows)) * 1.1
    ax.plot([0, top], [0, top], color="grey", lw=1, ls="--", label="measured = shaped link")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("reply bytes / shaped rate (s)")
    ax.set_ylabel("measured upload (s)")
    ax.set_title("Uplink per node and round: measured vs the shaped link")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "uplink.png", dpi=120)
    plt.close(fig)
    return rows


def print_uplink_table(rows: list[dict]) -> None:
    """Per node, means over its rounds."""
    if not rows:
        return
    print("uplink per node, mean over rounds (uplink.csv, uplink.png):")
    print(f"  {'node':>4}  {'rounds':>6}  {'plan T_com s':>12}  {'shaped Mbit/s':>13}  {'bytes/rate s':>12}  {'measured s':>10}")
    for partition in sorted({r["partition_id"] for r in rows}, key=str):
        mine = [r for r in rows if r["partition_id"] == partition]

        def mean(key: str) -> float:
            return sum(r[key] for r in mine) / len(mine)

        print(f"  {partition:>4}  {len(mine):>6}  {mean('t_com_s'):12.2f}  {mean('shaped_bps') / 1e6:13.2f}  "
              f"{mean('expected_s'):12.2f}  {mean('upload_s'):10.2f}")
