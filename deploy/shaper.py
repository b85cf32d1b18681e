"""Each round, every planned node's uplink shaped to the rate its plan gives it.

The ServerApp writes plan_round_N.json before it sends the round's models; this thread sees
the file within a poll interval and reshapes the nodes' egress (tc, via the testbed) while they
download and train, before they upload. shaping.csv records each rate and when it was applied,
so a reply that beat its shaping shows up as a measured upload far below the modeled one.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


class UplinkShaper(threading.Thread):
    def __init__(self, testbed, out: Path, containers_by_node_id: dict[int, str], scale: float = 1.0,
                 poll_s: float = 0.1):
        super().__init__(daemon=True, name="uplink-shaper")
        self.testbed, self.out, self.containers, self.scale, self.poll_s = \
            testbed, out, containers_by_node_id, scale, poll_s
        self.errors: list[str] = []
        self._halt = threading.Event()
        # plans already in the directory (an older run, or the rounds before a resume) are not ours
        self._seen = {p.name: p.stat().st_mtime for p in out.glob("plan_round_*.json")}

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def run(self) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            while not self._halt.is_set():
                for plan_file in sorted(self.out.glob("plan_round_*.json")):
                    try:
                        mtime = plan_file.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if self._seen.get(plan_file.name) == mtime:
                        continue
                    try:
                        plan = json.loads(plan_file.read_text())
                    except json.JSONDecodeError:
                        continue  # being written: next poll
                    self._seen[plan_file.name] = mtime
                    self._apply(pool, int(plan_file.stem.rsplit("_", 1)[1]), plan)
                self._halt.wait(self.poll_s)

    def rates(self, plan: dict) -> dict[int, float]:
        """node id -> uplink bit/s: the cost model's update bits S_i over the plan's T_com, times
        the scale."""
        from strategies.allocation.costs import update_bits

        model_params = json.loads((self.out / "system.json").read_text())["model_params"]
        rates = {}
        for node_id, device in zip(plan.get("node_ids", []), plan.get("devices", [])):
            t_com = float(device.get("t_com_s") or 0.0)
            if t_com > 0:
                rates[int(node_id)] = float(update_bits(model_params, int(device.get("bits", 32)))) / t_com * self.scale
        return rates

    def _apply(self, pool: ThreadPoolExecutor, server_round: int, plan: dict) -> None:
        seen_at = time.time()
        rates = self.rates(plan)

        def shape(node_id: int) -> dict:
            container = self.containers.get(node_id)
            row = {"round": server_round, "node_id": node_id, "container": container or "",
                   "rate_bps": round(rates[node_id]), "plan_seen_at": round(seen_at, 3)}
            if container is None:
                return {**row, "applied_at": "", "error": "node id of no testbed container"}
            try:
                self.testbed.shape(container, rates[node_id])
                return {**row, "applied_at": round(time.time(), 3), "error": ""}
            except Exception as err:  # noqa: BLE001 - a node that died mid-round; logged, the run goes on
                return {**row, "applied_at": "", "error": str(err)[:200]}

        rows = list(pool.map(shape, sorted(rates)))
        self.errors.extend(f"round {r['round']} {r['container']}: {r['error']}" for r in rows if r["error"])
        path = self.out / "shaping.csv"
        new = not path.exists()
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["round"])
            if new:
                writer.writeheader()
            writer.writerows(rows)
