"""FedAvg that plans every round: the allocation engine decides each sampled device's
synthetic data, CPU frequency, band, power and bits; each node gets its own ConfigRecord;
quantized updates are decoded, checked and averaged with weights D_loc + D_gen (FIMI S4).

Thin glue: the maths lives in `strategies.allocation`, the codec in `fedfill.codec`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedfill.codec import decode
from strategies.allocation import Plan, Scenario, ScenarioError, System, parse_scenario, solve_plan

UPLOAD_KEY = "upload"  # ConfigRecord key of the reply: bytes of the quantized update, and its metrics


class FimiFedAvg(FedAvg):
    """Per-device plans, quantized uploads, FedAvg over the updates that pass inspection.

    `profiles` maps a Flower node id to its device profile (the scenario JSON's device
    fields). `on_plan(round, plan, node_ids)` sees every plan (the report writes it to disk).
    """

    def __init__(self, system: System, policy: str, profiles: dict[int, dict], *, seed: int = 0,
                 node_wait_s: float = 60.0, on_plan: Callable[[int, Plan, list[int]], None] | None = None,
                 fraction_train: float = 1.0, min_train_nodes: int = 1) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_train_nodes)
        self.system, self.policy, self.seed = system, policy, seed
        self.profiles = profiles
        self.node_wait_s = node_wait_s
        self.on_plan = on_plan
        self._global: list[np.ndarray] | None = None
        self._planned: dict[int, dict] = {}  # node id -> this round's plan entry
        self.round_costs: dict[int, dict] = {}  # round -> modeled energy/latency, measured bytes, drops
        self.round_offset = 0  # rounds done before a resume: Flower counts from 1 again

    # ------------------------------------------------------------------ sampling and plans
    def _available_nodes(self, grid: Grid) -> list[int]:
        """Profiled nodes online now, waiting at most node_wait_s for min_train_nodes of them.

        Flower's own sampler waits forever while too few nodes are online; a run that lost
        nodes must go on with the ones it has, and say so.
        """
        deadline = time.monotonic() + self.node_wait_s
        while True:
            online = [n for n in grid.get_node_ids() if n in self.profiles]
            if len(online) >= self.min_train_nodes or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if len(online) < self.min_train_nodes:
            log(WARNING, "only %d of the %d nodes needed are online after %.0f s: going on with them",
                len(online), self.min_train_nodes, self.node_wait_s)
        return online

    def plan_round(self, server_round: int, node_ids: list[int]) -> tuple[Plan, list[int]]:
        """Solve the allocation for these nodes; devices that make it infeasible sit out."""
        while node_ids:
            scenario = self._scenario(node_ids)
            plan = solve_plan(scenario, self.policy, seed=self.seed + server_round)
            if plan.feasible:
                return plan, node_ids
            blocking = {d for reason in plan.reasons for d in reason["devices"]}
            for reason in plan.reasons:
                log(WARNING, "round %d plan infeasible (%s): %s %s", server_round, reason["constraint"],
                    reason["message"], reason["devices"])
            if not blocking:
                return plan, []
            node_ids = [n for n in node_ids if str(n) not in blocking]
            log(WARNING, "round %d: %d device(s) sit out, re-planning for the other %d", server_round,
                len(blocking), len(node_ids))
        return plan, []

    def _scenario(self, node_ids: list[int]) -> Scenario:
        devices = [{**self.profiles[n], "id": str(n)} for n in node_ids]
        try:
            return parse_scenario({"system": asdict(self.system), "devices": devices})
        except ScenarioError as err:  # a node reported a broken profile
            raise ValueError(f"bad device profile: {err}") from None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        online = self._available_nodes(grid)
        if not online:
            log(WARNING, "round %d: no node online, nothing to train", server_round)
            return []
        n_sample = max(self.min_train_nodes, int(len(online) * self.fraction_train))
        rng = np.random.default_rng(self.seed * 100_003 + server_round)
        picks = rng.choice(len(online), size=min(n_sample, len(online)), replace=False)  # indices: node ids are 64-bit
        sampled = sorted(online[i] for i in picks)
        plan, planned_ids = self.plan_round(server_round, sampled)
        if self.on_plan:
            self.on_plan(server_round, plan, planned_ids)
        self._global = arrays.to_numpy_ndarrays()
        self._planned = {}
        messages = []
        entries = plan.to_json()["devices"] if planned_ids else []
        for node_id, entry in zip(planned_ids, entries):
            self._planned[node_id] = entry
            node_config = ConfigRecord({
                **dict(config), "server-round": server_round, "policy": self.policy,
                "d-gen": int(round(entry["d_gen"])), "f-hz": entry["f_hz"], "b-hz": entry["b_hz"],
                "p-w": entry["p_w"], "eta": entry["eta"], "bits": entry["bits"],
                "t-cmp-s": entry["t_cmp_s"], "t-com-s": entry["t_com_s"],
                "e-cmp-j": entry["e_cmp_j"], "e-com-j": entry["e_com_j"],
            })
            # A fresh RecordDict per node: each carries that node's own plan.
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: node_config})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        log(INFO, "round %d: planned %d device(s), modeled energy %.4g J", server_round, len(planned_ids),
            plan.energy_j if plan.feasible else float("nan"))
        return messages

    # ------------------------------------------------------------------ aggregation
    def inspect_reply(self, message: Message) -> tuple[list[np.ndarray], float] | str:
        """The decoded update and its weight, or the reason to drop it."""
        if message.has_error():
            return f"node error: {message.error.reason}"
        record = message.content.config_records.get(UPLOAD_KEY)
        if record is None or not isinstance(record.get("update"), bytes):
            return "no quantized update in the reply"
        weight = record.get("num-examples")
        if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
            return f"bad num-examples {weight!r}"
        try:
            update = decode(record["update"], expected_shapes=[a.shape for a in self._global])
        except ValueError as err:
            return f"undecodable update: {err}"
        if not all(np.all(np.isfinite(u)) for u in update):
            return "update holds NaN or infinite values"
        return update, float(weight)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = list(replies)
        updates, weights, dropped, wire_bytes, train_seconds, synthetic = [], [], [], 0, [], 0
        energy = latency = 0.0
        # Account per planned node: an error the SuperLink raises for a dead node names the
        # SuperLink as its sender, so such errors only explain the nodes that sent nothing.
        from_planned = [m for m in replies if m.metadata.src_node_id in self._planned]
        foreign_errors = sorted({m.error.reason for m in replies
                                 if m.has_error() and m.metadata.src_node_id not in self._planned})
        for message in from_planned:
            node_id = message.metadata.src_node_id
            wire_bytes += recorddict_to_proto(message.content).ByteSize() if not message.has_error() else 0
            verdict = self.inspect_reply(message)
            if isinstance(verdict, str):
                log(WARNING, "round %d: dropped the update of node %d: %s", server_round, node_id, verdict)
                dropped.append({"node": node_id, "reason": verdict})
                continue
            updates.append(verdict[0])
            weights.append(verdict[1])
            synthetic += int(message.content.config_records[UPLOAD_KEY].get("d-gen-used", 0))
            seconds = message.content.config_records[UPLOAD_KEY].get("train-seconds")
            if isinstance(seconds, (int, float)):
                train_seconds.append(float(seconds))
            planned = self._planned[node_id]
            energy += planned["e_cmp_j"] + planned["e_com_j"]
            latency = max(latency, planned["t_cmp_s"] + planned["t_com_s"])
        answered = {m.metadata.src_node_id for m in from_planned}
        for node_id in sorted(set(self._planned) - answered):
            reason = "no reply" + (f" ({'; '.join(foreign_errors)})" if foreign_errors else " before the timeout")
            dropped.append({"node": node_id, "reason": reason})
            log(WARNING, "round %d: node %d: %s", server_round, node_id, reason)
        self.round_costs[server_round] = {"energy_j": energy, "latency_s": latency, "uplink_bytes": wire_bytes,
                                          "updates": len(updates), "dropped": dropped,
                                          "train_s_max": max(train_seconds, default=0.0),
                                          "train_s_sum": sum(train_seconds), "synthetic_used": synthetic}
        if not updates:
            log(WARNING, "round %d: no usable update, the global model stays as it was", server_round)
            return None, None
        w = np.asarray(weights) / np.sum(weights)
        new = [g + sum(wk * u[i] for wk, u in zip(w, updates)) for i, g in enumerate(self._global)]
        metrics = MetricRecord({"num-updates": len(updates), "num-dropped": len(dropped),
                                "uplink-bytes": wire_bytes, "energy-j": energy})
        return ArrayRecord([a.astype(g.dtype) for a, g in zip(new, self._global)]), metrics
