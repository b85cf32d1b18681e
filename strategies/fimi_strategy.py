"""FedAvg that plans every round: the allocation engine decides each sampled device's
synthetic data, CPU frequency, band, power and bits; each node gets its own ConfigRecord;
quantized updates are decoded and screened, then Flower's maths merges them: FedAvg with weights
D_loc + D_gen (FIMI S4, the default), or the coordinate-wise median or trimmed mean of Flower's
FedMedian and FedTrimmedAvg (unweighted, as Flower's are), which a few hostile updates cannot
drag far.

Thin glue: the maths lives in `strategies.allocation`, the codec in `fedfill.codec`, the
message keys in `fedfill.contract`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from functools import partial
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from flwr.common import log

from fedfill import contract
from fedfill.codec import decode
from fedfill.config import check_aggregation, sampled_count
from strategies.allocation import Plan, Scenario, ScenarioError, System, parse_scenario, solve_plan
from strategies.allocation.costs import update_bits, upload_energy
from strategies.allocation.policies import error_target_out_of_reach, parse_policy, reachable_delta_max
from strategies.allocation.traces import scaled_profile
from strategies.screening import NormScreen

# What the strategy says of each planned node every round (server.report's devices.csv
# columns after `round`): the plan's modeled figures, the measured ones, and what became of
# the update. bits is the width the device sent (its plan's, raised where they missed its
# error demand on its real update); energy_j is the cost model's E_cmp + E_com at those bits,
# e_cmp_j its local-step part, which measured_energy_j (the board's meter over the local step,
# empty where the node has no sensor) stands beside.
NODE_FIGURES = ("node", "partition_id", "bits_planned", "bits", "error_demand", "error_expected", "error_measured",
                "t_cmp_s", "t_com_s", "energy_j", "e_cmp_j", "measured_energy_j", "measured_s", "plan_uplink_bps",
                "train_s", "delivery_s", "launch_s", "handler_s", "upload_s", "reply_bytes", "status", "reason",
                "ray_node", "gen_planned", *(name.replace("-", "_") for name in contract.GENERATION_METRICS),
                *(name.replace("-", "_") for name in contract.PRICING_METRICS))
DEMANDING_POLICIES = ("ondemand", "fimi+ondemand")  # plans whose bits answer each device's error demand
# Why an update was not merged, by class: the round's MetricRecord counts each as dropped-<class>
# (rounds.csv's dropped_<class>, which add up to `dropped`).
# offline: the device's trace turned it off before its planned part of the round ended.
DROP_CLASSES = ("no-reply", "unusable", "norm", "duplicate", "offline")
# Flower's strategies whose aggregate_train merges the screened updates, by RunConfig.aggregation
FLOWER_RULES = {"fedavg": FedAvg, "median": FedMedian, "trimmed-mean": FedTrimmedAvg}


def update_norm(reply: Message) -> float:
    """The L2 norm over all arrays of a decoded reply's update."""
    return float(np.sqrt(sum(np.sum(np.square(a.numpy(), dtype=np.float64))
                             for a in reply.content[contract.UPDATE_KEY].values())))


def wait_for_nodes(grid: Grid, wanted: int, wait_s: float, accept: Callable[[int], bool] = lambda n: True) -> list[int]:
    """Online node ids, waiting at most wait_s for `wanted` of them.

    Flower's own sampler waits forever while too few nodes are online; a run that lost nodes
    must go on with the ones it has, and say so.
    """
    deadline = time.monotonic() + wait_s
    while True:
        online = [n for n in grid.get_node_ids() if accept(n)]
        if len(online) >= wanted or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if len(online) < wanted:
        log(WARNING, "only %d of the %d nodes wanted are online after %.0f s: going on with them",
            len(online), wanted, wait_s)
    return online


class FimiFedAvg(FedAvg):
    """Per-device plans, quantized uploads, Flower's FedAvg (or median, or trimmed mean) over the
    updates that pass inspection.

    `profiles` maps a Flower node id to its device profile (the contract's profile fields).
    `on_plan(round, plan, node_ids)` sees every plan (the report writes it to disk).
    `aggregate_train` returns the round's costs as a MetricRecord (modeled energy and latency,
    measured bytes and training seconds, updates used and dropped, the drops by class
    (dropped-<DROP_CLASSES>), and the weighted mean of the nodes' training loss): Flower keeps
    it in its Result, and `on_round_metrics(round, record, nodes)` hands the same record to the
    report as the round ends, with one dict per planned node, and one more per duplicate reply
    (NODE_FIGURES: its plan's modeled times and rate, its measured training and upload seconds
    and reply bytes, "used" or "dropped" with the reason, also logged).
    `upload_seconds(reply)` gives a reply's measured upload seconds (server.timed_grid's
    TimedGrid.upload_seconds), `pushed_at(reply)` when the instruction it answers was pushed
    (TimedGrid.pushed_at), each None where unknown; with the reply's own timestamps they say
    where a node's part of the round went (`timeline`). `addressee(reply)` gives the node the
    instruction a reply answers was sent to (TimedGrid.addressee): an error made in the
    SuperLink's or the ServerApp's name is then charged to the node it is about, not to every
    node that sent nothing.

    Screening, before any merging: one reply per node per round (a second one from the same
    node, which a hostile or broken node or SuperLink path could send, is dropped unread with
    the reason "duplicate"); then a reply that carries no usable update is dropped; then the
    L2 norms of the updates left go through the norm screen (strategies.screening: `norm_screen`
    names its rule, `norm_bound` its multiple of the round's median norm, 0 for none), which
    drops an update or scales it down to the bound (a clipped update is merged, its row says so).
    `complementary_update(global weights, round)`, when given (the SST baseline), is the server's
    own update trained on the synthetic data it keeps: (update arrays, examples, loss), merged
    with the devices' updates as one more reply, weighted by its examples; a round with no
    device update merges nothing.
    `aggregation` picks Flower's strategy whose aggregate_train merges what is left (FLOWER_RULES;
    `trim_beta` is FedTrimmedAvg's beta: it cuts int(beta x n) updates from each tail of every
    coordinate, none below 5 updates at 0.2). Bad settings raise ValueError here.
    """

    def __init__(self, system: System, policy: str, profiles: dict[int, dict], *, seed: int = 0,
                 node_wait_s: float = 60.0, on_plan: Callable[[int, Plan, list[int]], None] | None = None,
                 on_round_metrics: Callable[[int, MetricRecord, list[dict]], None] | None = None,
                 upload_seconds: Callable[[Message], float | None] | None = None,
                 pushed_at: Callable[[Message], float | None] | None = None,
                 addressee: Callable[[Message], int | None] | None = None,
                 fraction_train: float = 1.0, min_train_nodes: int = 1, bits_rule: str = "codec",
                 aggregation: str = "fedavg", trim_beta: float = 0.2, norm_bound: float = 10.0,
                 norm_screen: str = "adaptive",
                 complementary_update: Callable[[list[np.ndarray], int], tuple[list[np.ndarray], int, float]]
                 | None = None,
                 delivery_planner: Callable[[dict[int, dict], dict[int, int]], dict[int, dict]] | None = None,
                 pricing=None, traces=None) -> None:
        check_aggregation(aggregation, trim_beta, norm_bound, norm_screen)
        keys = dict(weighted_by_key=contract.WEIGHT_KEY, arrayrecord_key=contract.ARRAYS_KEY,
                    configrecord_key=contract.CONFIG_KEY)
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_train_nodes, **keys)
        rule = FLOWER_RULES[aggregation]
        self.aggregation, self.screen = aggregation, NormScreen(norm_screen, norm_bound)
        # Flower's strategy of the rule, used for its aggregate_train alone: whatever the rule,
        # FimiFedAvg stays one class that plans, decodes and screens
        self.merger: FedAvg = (partial(rule, beta=trim_beta) if rule is FedTrimmedAvg else rule)(**keys)
        self.system, self.policy, self.seed, self.bits_rule = system, policy, seed, bits_rule
        self.demanding = parse_policy(policy)[0] in DEMANDING_POLICIES
        undemanding = [n for n, profile in profiles.items() if profile.get("quant_error") is None]
        if self.demanding and undemanding:
            log(WARNING, "policy %s: %d node(s) reported no error demand (quant_error) and send their own bits "
                "(32 unless their profile says otherwise): %s", policy, len(undemanding), undemanding)
        self.profiles = profiles
        self.complementary_update = complementary_update
        self.delivery_planner = delivery_planner
        self.pricing = pricing  # strategies.pricing.RoundPricing: a price per step-image each round [GenMEN]
        self.node_wait_s = node_wait_s
        self.on_plan, self.on_round_metrics = on_plan, on_round_metrics
        self.upload_seconds = upload_seconds or (lambda reply: None)
        self.pushed_at = pushed_at or (lambda reply: None)
        self.addressee = addressee or (lambda reply: None)
        self._global: ArrayRecord | None = None
        self._planned: dict[int, contract.NodePlan] = {}  # node id -> this round's plan
        self._sampled = 0  # nodes this round sampled (the planned ones, and those that sat out)
        self.round_offset = 0  # rounds done before a resume: Flower counts from 1 again
        # the virtual clock: each round's modeled latency, and the waits for a device to come on
        self.traces = traces  # strategies.allocation.traces.Traces by partition id, or None
        self.clock = 0.0  # virtual seconds at the end of the last round (a resumed run sets it)
        self._waited = 0.0  # this round's wait for a device to come on
        self._offline: dict[int, str] = {}  # planned node -> why its trace drops it this round
        self._capacity: dict[int, dict] = {}  # node -> its profile as the trace has it this round

    # ------------------------------------------------------------------ sampling and plans
    def plan_round(self, server_round: int, node_ids: list[int]) -> tuple[Plan, list[int]]:
        """Solve the allocation for these nodes; devices that make it infeasible sit out. An
        error target out of every device's reach (Delta_max too tight for the synthetic cap)
        is relaxed to the tightest reachable one, said in the log and the plan's notes: a
        round that trains nobody would help no one."""
        while node_ids:
            scenario = self._scenario(node_ids)
            plan = solve_plan(scenario, self.policy, seed=self.seed + server_round, bits_rule=self.bits_rule)
            if error_target_out_of_reach(plan):
                reachable = reachable_delta_max(scenario, self.policy, seed=self.seed + server_round)
                if reachable is not None:
                    note = (f"Delta_max {scenario.system.delta_max:g} is out of reach ({plan.reasons[0]['message']}); "
                            f"planned for the tightest reachable Delta_max {reachable:.4g}")
                    log(WARNING, "round %d: %s", server_round, note)
                    relaxed = Scenario(replace(scenario.system, delta_max=reachable), scenario.devices)
                    plan = solve_plan(relaxed, self.policy, seed=self.seed + server_round, bits_rule=self.bits_rule)
                    plan.notes.append(note)
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
        devices = [{**self._capacity.get(n, self.profiles[n]), "id": str(n)} for n in node_ids]
        try:
            return parse_scenario({"system": asdict(self.system), "devices": devices})
        except ScenarioError as err:  # a node reported a broken profile
            raise ValueError(f"bad device profile: {err}") from None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._planned, self._sampled = {}, 0  # a round that plans nobody accounts for nobody
        self._waited, self._offline, self._capacity = 0.0, {}, {}
        online = wait_for_nodes(grid, self.min_train_nodes, self.node_wait_s, accept=lambda n: n in self.profiles)
        if self.traces is not None:
            online = self._switched_on(server_round, online)
        if not online:
            log(WARNING, "round %d: no node online, nothing to train", server_round)
            return []
        rng = np.random.default_rng(self.seed * 100_003 + server_round)
        online = sorted(online, key=self._device_order)  # Flower's node ids are new each run; the devices are not
        picks = rng.choice(len(online), size=sampled_count(len(online), self.fraction_train, self.min_train_nodes),
                           replace=False)  # indices: node ids are 64-bit
        sampled = sorted((online[i] for i in picks), key=self._device_order)
        self._sampled = len(sampled)
        if self.traces is not None:
            self._capacity = {n: self._traced_profile(n, len(sampled)) for n in sampled}
        plan, planned_ids = self.plan_round(server_round, sampled)
        if self.on_plan:
            self.on_plan(server_round, plan, planned_ids)
        self._global = arrays
        entries = plan.to_json()["devices"] if planned_ids else []
        self._planned = {node_id: contract.NodePlan.from_plan_entry(entry, server_round, self.policy,
                                                                    self._error_demand(node_id))
                         for node_id, entry in zip(planned_ids, entries)}
        if self.delivery_planner is not None and self._planned:
            # each device's delivery mode for the samples its plan asks it to generate [MEG]
            chosen = self.delivery_planner({n: self._capacity.get(n, self.profiles[n]) for n in self._planned},
                                           {n: p.d_gen for n, p in self._planned.items()})
            self._planned = {n: replace(p, **chosen.get(n, {})) for n, p in self._planned.items()}
        if self.pricing is not None and self._planned:  # one price for every device, in its plan
            price = self.pricing.price_round(server_round, {n: p.d_gen for n, p in self._planned.items()})
            self._planned = {n: replace(p, gen_price=price) for n, p in self._planned.items()}
        if self.traces is not None:
            self._offline = self._going_off(self._planned)
        sent = contract.global_model_record(arrays)
        messages = [Message(content=contract.train_message_content(sent, node_plan, config),
                            message_type=MessageType.TRAIN, dst_node_id=node_id)
                    for node_id, node_plan in self._planned.items() if node_id not in self._offline]
        log(INFO, "round %d: planned %d device(s), modeled energy %.4g J", server_round, len(planned_ids),
            plan.energy_j if plan.feasible else float("nan"))
        return messages

    def _device_order(self, node_id: int) -> tuple:
        """The order the sampler and the planner see the nodes in: by the partition a node
        names in its profile (the same device in every run of a seed), then by node id for a
        node that names none. Flower draws its node ids afresh each run, so sampling in their
        order would sample other devices, and fill other amounts, under the same seed."""
        partition = self.profiles[node_id].get(contract.PARTITION_FIELD)
        return (partition is None, partition if partition is not None else 0, node_id)

    # ------------------------------------------------------------------ traces and the virtual clock
    def _partition(self, node_id: int) -> int:
        return int(self.profiles[node_id][contract.PARTITION_FIELD])

    def _switched_on(self, server_round: int, online: list[int]) -> list[int]:
        """The online nodes whose trace has them on at the clock; where none is, the clock first
        jumps to when the first one comes on (said in the log, and in rounds.csv's
        virtual_wait_s)."""
        start = self.traces.round_start(self.clock, [self._partition(n) for n in online])
        if start is None:
            log(WARNING, "round %d: no device's trace comes on again after virtual t=%.0f s: nothing to train",
                server_round, self.clock)
            return []
        if start > self.clock:
            log(WARNING, "round %d: no device is on at virtual t=%.0f s; the clock jumps %.0f s to t=%.0f s, when "
                "the first comes on", server_round, self.clock, start - self.clock, start)
            self._waited, self.clock = start - self.clock, start
        return [n for n in online if self.traces.available(self._partition(n), self.clock)]

    def _traced_profile(self, node_id: int, sampled: int) -> dict:
        """The node's profile scaled by its trace's capacity at the clock; the uplink factor is
        taken at an equal share of the round's band (the planner's FDMA)."""
        cpu, uplink = self.traces.capacity_at(self._partition(node_id), self.clock)
        return scaled_profile(self.profiles[node_id], cpu, uplink, self.system.noise_w_per_hz,
                              self.system.bandwidth_hz / max(1, sampled))

    def _going_off(self, planned: dict[int, contract.NodePlan]) -> dict[int, str]:
        """Planned nodes whose trace turns them off before their part of the round ends (the
        clock + their planned t_cmp + t_com), with the reason. They are sent nothing: the server
        holds the trace, so the update is known lost before it is trained, and a simulated node
        need not spend real seconds on it."""
        going = {}
        for node_id, plan in planned.items():
            end = self.clock + plan.t_cmp_s + plan.t_com_s
            off = self.traces.off_at(self._partition(node_id), self.clock, end)
            if off is not None:
                going[node_id] = (f"went offline at virtual t={off:.1f} s, mid-round (its planned part ended at "
                                  f"t={end:.1f} s; device trace)")
        return going

    def _error_demand(self, node_id: int) -> float:
        """The relative error the node's update may carry (its profile's quant_error), under
        the policies that plan bits from it; 0 (none) otherwise."""
        demand = self.profiles[node_id].get("quant_error") if self.demanding else None
        return float(demand) if demand is not None else 0.0

    # ------------------------------------------------------------------ aggregation
    def decode_reply(self, message: Message) -> RecordDict:
        """The reply as Flower's FedAvg wants it (the decoded update as float64 arrays under the
        global model's keys, and the node's MetricRecord), or ReplyError with the reason."""
        if message.has_error():
            raise contract.ReplyError(f"node error: {message.error.reason}")
        payload, metrics, _ = contract.read_train_reply(message.content)
        keys = list(self._global.keys())
        shapes = [tuple(self._global[k].shape) for k in keys]
        try:
            update = decode(payload, expected_shapes=shapes)
        except ValueError as err:
            raise contract.ReplyError(f"undecodable update: {err}") from None
        if not all(np.all(np.isfinite(u)) for u in update):
            raise contract.ReplyError("update holds NaN or infinite values")
        # float64: the weighted sum then equals the hand-written mean it replaced, bit for bit.
        arrays = ArrayRecord({k: Array(u.astype(np.float64)) for k, u in zip(keys, update)})
        # Flower averages only MetricRecords with the same keys: a board's meter figures (sent
        # by some nodes only) stay out of the average and go to the node's row instead.
        averaged = {key: value for key, value in metrics.items() if key not in contract.NODE_ONLY_METRICS}
        return RecordDict({contract.UPDATE_KEY: arrays, contract.METRICS_KEY: MetricRecord(averaged)})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = list(replies)
        nodes = {node_id: self._node_figures(node_id, plan) for node_id, plan in self._planned.items()}
        extra_rows: list[dict] = []  # one per duplicate reply, beside its node's own row
        dropped = dict.fromkeys(DROP_CLASSES, 0)
        wire_bytes = 0

        def drop(figures: dict, reason: str, kind: str) -> None:
            log(WARNING, "round %d: dropped the update of node %d: %s", server_round, figures["node"], reason)
            figures.update(status="dropped", reason=reason)
            dropped[kind] += 1

        # Account per planned node: an error the SuperLink raises for a dead node (or the
        # ServerApp's pull for a reply it could not assemble) names itself as the sender. It is
        # charged to the node its instruction went to where that is known (`addressee`), else it
        # can only explain, as a possibility, each node that sent nothing.
        # In the nodes' order, not the replies' arrival order: float sums depend on their order,
        # and a merge that varies with arrival makes two runs of the same seed drift apart.
        # Stable: a node's second reply stays behind its first.
        from_planned = sorted((m for m in replies if m.metadata.src_node_id in self._planned),
                              key=lambda m: self._merge_rank(m.metadata.src_node_id))
        about_node: dict[int, str] = {}  # planned node -> the error made in another's name about it
        foreign_errors: set[str] = set()  # such errors about no node known
        for m in replies:
            if m.has_error() and m.metadata.src_node_id not in self._planned:
                node_id = self.addressee(m)
                if node_id in self._planned:
                    about_node.setdefault(node_id, m.error.reason)
                else:
                    foreign_errors.add(m.error.reason)
        candidates: list[tuple[int, Message, Message]] = []  # (node, its reply, the reply decoded)
        answered: set[int] = set()
        for message in from_planned:
            node_id = message.metadata.src_node_id
            figures = nodes[node_id]
            if node_id in answered:  # one update per node per round: later ones are not read
                figures = self._node_figures(node_id, self._planned[node_id])
                extra_rows.append(figures)
            if not message.has_error():
                size = contract.reply_bytes(message.content)
                wire_bytes += size
                figures.update(reply_bytes=size, upload_s=self.upload_seconds(message),
                               ray_node=contract.read_ray_node(message.content),
                               **timeline(message, self.pushed_at(message)))
            if node_id in answered:
                drop(figures, "duplicate: a second reply from this node in the round (one update per node "
                     "per round; the first one stands)", "duplicate")
                continue
            answered.add(node_id)
            try:
                candidates.append((node_id, message, Message(self.decode_reply(message), reply_to=message)))
            except contract.ReplyError as err:
                drop(figures, str(err), "unusable")
        for node_id in sorted(self._offline):
            drop(nodes[node_id], self._offline[node_id], "offline")
        for node_id in sorted(set(self._planned) - answered - set(self._offline)):
            if node_id in about_node:
                reason = f"no reply ({about_node[node_id]})"
            elif foreign_errors:
                reason = f"no reply ({'; '.join(sorted(foreign_errors))})"
            else:
                reason = "no reply before the timeout"
            drop(nodes[node_id], reason, "no-reply")
        verdicts = self.screen.judge([update_norm(decoded) for _, _, decoded in candidates])
        decoded: list[Message] = []  # Flower's input: replies carrying decoded updates
        used: list[int] = []  # the nodes whose updates are used
        clipped = 0
        for (node_id, message, reply), verdict in zip(candidates, verdicts):
            if verdict.scale == 0.0:
                drop(nodes[node_id], verdict.reason, "norm")
                continue
            if verdict.scale < 1.0:  # clipped: merged, scaled down to the bound
                clipped += 1
                nodes[node_id]["reason"] = verdict.reason
                reply.content[contract.UPDATE_KEY] = ArrayRecord(
                    {k: Array(a.numpy() * verdict.scale) for k, a in reply.content[contract.UPDATE_KEY].items()})
            try:
                self._account_reply(node_id, message.content[contract.METRICS_KEY], nodes[node_id])
            except contract.ReplyError as err:
                drop(nodes[node_id], str(err), "unusable")
                continue
            decoded.append(reply)
            used.append(node_id)
        node_metrics = [m.content[contract.METRICS_KEY] for m in decoded]
        train_seconds = [float(r["train-seconds"]) for r in node_metrics]
        latency = float(max((self._planned[n].t_cmp_s + self._planned[n].t_com_s for n in used), default=0.0))
        # the clock moves by the round's latency; where no update came, by the planned round (the
        # devices that went off were still in it), so a round of drops cannot stop the clock
        self.clock += latency if used else max((p.t_cmp_s + p.t_com_s for p in self._planned.values()), default=0.0)
        costs = MetricRecord({
            "energy-j": float(sum(nodes[n]["energy_j"] for n in used)),
            "latency-s": latency, "virtual-s": self.clock, "virtual-wait-s": self._waited,
            "uplink-bytes": wire_bytes, "sampled": self._sampled, "updates": len(decoded), "dropped": sum(dropped.values()),
            **{f"dropped-{kind}": count for kind, count in dropped.items()}, "clipped": clipped,
            **self.screen.last,
            "train-s-max": max(train_seconds, default=0.0), "train-s-sum": float(sum(train_seconds)),
            "synthetic-used": int(sum(int(r["d-gen-used"]) for r in node_metrics)),
            **{key: sum(r[key] for r in node_metrics) for key in contract.GENERATION_METRICS},
        })
        if self.pricing is not None:  # the round's game as played: steps moved, payments, utilities
            costs.update(self.pricing.settle(dict(zip(used, node_metrics))))
        new = None
        if decoded and self.complementary_update is not None:
            decoded.append(self._server_reply(server_round, decoded[0].content[contract.METRICS_KEY]))
            costs["server-examples"] = int(decoded[-1].content[contract.METRICS_KEY][contract.WEIGHT_KEY])
        if decoded:
            merged_update, node_means = self.merger.aggregate_train(server_round, decoded)
            new = ArrayRecord({k: Array((g.numpy() + merged_update[k].numpy()).astype(g.numpy().dtype))
                               for k, g in self._global.items()})
            costs["train-loss"] = float(node_means["train-loss"])
        else:
            log(WARNING, "round %d: no usable update, the global model stays as it was", server_round)
        if self.on_round_metrics:
            self.on_round_metrics(server_round, costs, [*nodes.values(), *extra_rows])
        return new, costs

    def _merge_rank(self, node_id: int) -> tuple:
        """A node's place in the merge: its partition id where it reports one (the same in every
        run of a split, where Flower's node ids are drawn anew), else its node id."""
        partition = self.profiles[node_id].get(contract.PARTITION_FIELD)
        return (0, int(partition), node_id) if isinstance(partition, (int, float)) else (1, 0, node_id)

    def _server_reply(self, server_round: int, template: MetricRecord) -> Message:
        """The server's complementary update as Flower's FedAvg takes a reply: its arrays under
        the global model's keys and a MetricRecord with the devices' keys (Flower averages only
        records alike), its examples as the weight and its loss."""
        keys = list(self._global.keys())
        update, examples, loss = self.complementary_update(self._global.to_numpy_ndarrays(), server_round)
        arrays = ArrayRecord({k: Array(np.asarray(u, dtype=np.float64)) for k, u in zip(keys, update)})
        metrics = MetricRecord({**{k: 0.0 for k in template}, contract.WEIGHT_KEY: int(examples),
                                "train-loss": float(loss)})
        content = RecordDict({contract.UPDATE_KEY: arrays, contract.METRICS_KEY: metrics})
        return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)

    def _account_reply(self, node_id: int, metrics: MetricRecord, figures: dict) -> None:
        """A used reply's figures into the node's row, its codec constant into its profile (the
        next plan's bits rest on it)."""
        plan = self._planned[node_id]
        bits = int(metrics.get("bits", plan.bits))
        figures.update(train_s=float(metrics["train-seconds"]), bits=bits,
                       error_expected=float(metrics.get("error-expected", 0.0)),
                       error_measured=float(metrics.get("error-measured", 0.0)),
                       energy_j=self._modeled_energy(node_id, plan, bits, int(metrics[contract.WEIGHT_KEY])),
                       measured_energy_j=contract.node_figure(metrics, "measured-energy-j"),
                       measured_s=contract.node_figure(metrics, "measured-s"),
                       **{key.replace("-", "_"): metrics[key]
                          for key in (*contract.GENERATION_METRICS, *contract.PRICING_METRICS)})
        if metrics["gen-device-unet-evals"] > 0:  # it completed a split delivery: it holds the generator now
            self.profiles[node_id]["holds_generator"] = True
        constant = float(metrics.get("codec-constant", 0.0))
        if np.isfinite(constant) and constant > 0:
            self.profiles[node_id]["codec_constant"] = constant

    def _modeled_energy(self, node_id: int, plan: contract.NodePlan, bits: int, trained: int) -> float:
        """The cost model's E_cmp + E_com of what the device did: E_cmp, linear in samples
        ([FIMI eq. 6]), for the `trained` ones (fewer than planned when its fill did not come:
        the generation service was down), the upload at the bits actually sent (a device that
        raised its bits sends more in the same T_com over the same band)."""
        planned = float(self.profiles[node_id].get("d_loc", 0.0)) + plan.d_gen
        e_cmp = plan.e_cmp_j * min(1.0, trained / planned) if planned > 0 else plan.e_cmp_j
        if bits == plan.bits:
            return e_cmp + plan.e_com_j
        e_com = upload_energy(plan.b_hz, plan.t_com_s, update_bits(self.system.model_params, bits),
                              self._capacity.get(node_id, self.profiles[node_id])["gain"], self.system.noise_w_per_hz)
        return e_cmp + float(e_com)

    def _node_figures(self, node_id: int, plan: contract.NodePlan) -> dict:
        """A planned node's NODE_FIGURES before its reply: the plan's, the measured ones unknown.
        The plan's uplink rate is the update's size as the cost model counts it (M x bits) over
        the plan's T_com: the rate a testbed shapes the node's link to."""
        return {"node": node_id, "partition_id": self.profiles[node_id].get(contract.PARTITION_FIELD),
                "bits_planned": plan.bits, "bits": None, "error_demand": plan.error_demand or None,
                "error_expected": None, "error_measured": None, "t_cmp_s": plan.t_cmp_s, "t_com_s": plan.t_com_s,
                "energy_j": None, "e_cmp_j": plan.e_cmp_j, "measured_energy_j": None, "measured_s": None,
                "plan_uplink_bps": (float(update_bits(self.system.model_params, plan.bits))
                                                      / plan.t_com_s if plan.t_com_s > 0 else None),
                "train_s": None, "delivery_s": None, "launch_s": None, "handler_s": None, "upload_s": None,
                "reply_bytes": None, "status": "used", "reason": "", "ray_node": "",
                "gen_planned": delivery_label(plan),
                **{key.replace("-", "_"): None for key in (*contract.GENERATION_METRICS, *contract.PRICING_METRICS)}}


def delivery_label(plan: contract.NodePlan) -> str:
    """The planned delivery as devices.csv says it: image, seed, state-k10-q4, sketch-k10-r2;
    empty where the run's own setting applies."""
    mode = plan.gen_delivery
    if mode == "state":
        return f"state-k{plan.gen_server_steps}-q{plan.gen_state_bits}"
    if mode == "sketch":
        return f"sketch-k{plan.gen_server_steps}-r{plan.gen_sketch_factor}"
    return mode


def timeline(reply: Message, pushed_at: float | None) -> dict:
    """Where a node's part of a round went, from the reply's timestamps (the node's clock)
    against the server's push (its own: one host's clock, or NTP-synchronised hosts):
    delivery_s from the push to the ClientApp's train handler (the SuperNode's pull, the task's
    launch, Flower's hand-over), launch_s the part of it from the ClientApp process's start,
    handler_s from the handler's start to the reply it made (data, training, quantizing).
    None where a figure is missing or not a finite non-negative number."""
    try:
        metrics = reply.content[contract.METRICS_KEY]
    except (KeyError, TypeError):
        return {}
    process, handler = (contract.node_figure(metrics, key) for key in ("process-started-at", "handler-started-at"))

    def span(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else end - start

    return {"delivery_s": span(pushed_at, handler), "launch_s": span(process, handler),
            "handler_s": span(handler, reply.metadata.created_at)}
