"""Robust aggregation against poisoned updates, on digits (issue 13): the global test accuracy
when 0, 1 or 2 of 10 nodes send scaled or sign-flipped updates, for each merging rule
(fedavg, median, trimmed-mean), with and without the norm screening.

    python bench/bench_robust.py --out runs/robust.json   # 10 nodes, 12 rounds, 1 local epoch
    python bench/bench_robust.py --rounds 2               # a quick check (~1.5 min)

Time: about 55 s a round on 2 cores once the configurations part (measured at --rounds 2 on a
machine busy with other work), so ~12 minutes for the default 12 rounds.

Setup. In process, not `fedfill run`: a run starts Ray, a SuperLink and the apps (about a
minute each), and the table needs 30 runs. What runs is the code `fedfill run` runs, without
Flower's transport: the ClientApp's own `query` and `train` handlers (client/app.py) for each
node, with the Context Flower's simulation gives it (partition id of 10, the run config:
classifier job on digits, Dirichlet alpha 0.3, 1 local epoch, seed 0, no generation
service), and the ServerApp's server side: `run_system` and FimiFedAvg built as server/app.py
builds it (policy fimi, every node every round), its configure_train planning each round and
its aggregate_train screening and merging the replies, then the job's central evaluation.
Only the round loop is written here (Flower's Strategy.start does no more than plan, send,
merge, evaluate).

Attack. An attacker is a node that runs the honest handler and then tampers with its reply:
it decodes its own payload, multiplies the update by the attack's factor (scaled: --scale,
default -100, a boosted sign flip; sign-flip: -1) and re-encodes it at the bits it sent, its
metrics (and FedAvg weight) untouched. The attackers are partitions 0 and 1. Median and
trimmed mean are Flower's, unweighted; fedavg weighs by D_loc + D_gen. Screening: `norm_bound`
(default 10, x the round's median update norm) or 0 (none); at --scale -10 an attacker sits at
the edge of the default bound. Reported: the final round's accuracy (and the best), and the
updates dropped for their norm over the run.

Every configuration starts from the same model with the same seeds. A node's training is a
function of the global model, the round and its partition, so configurations whose global
models agree share one training (round 1 always; with and without screening while nothing
was screened): the configurations advance round by round together.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES = ("fedavg", "median", "trimmed-mean")
ATTACKS = (("none", 0), ("scaled", 1), ("scaled", 2), ("sign-flip", 1), ("sign-flip", 2))


@dataclass
class Config:
    """One cell of the table and the run behind it."""

    aggregation: str
    norm_bound: float
    attack: str
    attackers: int
    strategy: object = None
    arrays: object = None  # the global model (an ArrayRecord)
    accuracy: list[float] = field(default_factory=list)  # after each round
    dropped_norm: int = 0

    def row(self) -> dict:
        return {"aggregation": self.aggregation, "norm_bound": self.norm_bound, "attack": self.attack,
                "attackers": self.attackers, "final_accuracy": self.accuracy[-1], "best_accuracy": max(self.accuracy),
                "accuracy_by_round": self.accuracy, "dropped_norm": self.dropped_norm}


def fingerprint(arrays) -> str:
    digest = hashlib.sha1()
    for array in arrays.to_numpy_ndarrays():
        digest.update(array.tobytes())
    return digest.hexdigest()


def tampered(request, reply, factor: float):
    """The node's reply to `request` with its update multiplied by `factor`, re-encoded at the
    bits it was sent."""
    import numpy as np
    from flwr.app import Message

    from fedfill import codec, contract

    if reply.has_error():  # its own training failed: nothing to tamper with
        return reply
    payload, metrics, note = contract.read_train_reply(reply.content)
    update = [factor * u for u in codec.decode(payload)]
    bits = int(metrics.get("bits", 32))
    payload = codec.encode(update, bits, np.random.default_rng(0))
    figures = contract.TrainMetrics(**{key.replace("-", "_"): value for key, value in metrics.items()})
    content = contract.train_reply(payload, replace(figures, upload_bytes=len(payload)), note)
    return Message(content, reply_to=request)


def train_on_node(message, context):
    """The ClientApp's train handler; an exception becomes the error reply Flower sends for it
    (a node whose model diverged cannot encode NaN: the strategy drops it as a node error)."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    import client.app as client_app

    try:
        return client_app.train(message, context)
    except Exception as err:  # noqa: BLE001 - as Flower's ClientApp runner does
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}"),
                       reply_to=message)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--scale", type=float, default=-100.0, help="the scaled attack's factor (default: -100)")
    parser.add_argument("--norm-bound", type=float, default=10.0, help="the screening's bound (default: 10)")
    parser.add_argument("--trim-beta", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of a node's training (default: 1, as a simulated node)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import client.app as client_app
    from fedfill import contract
    from fedfill.config import RunConfig
    from jobs import load_job
    from server.app import run_system
    from strategies.fimi_strategy import FimiFedAvg

    logging.getLogger("flwr").setLevel(logging.ERROR)  # every drop is counted in the table
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a Flower run sets them
    started = time.monotonic()
    run = RunConfig(num_partitions=args.nodes, rounds=args.rounds, local_epochs=1)
    node_ids = [1000 + k for k in range(args.nodes)]  # partition k is node 1000 + k; attackers: the first ones
    contexts = {node: Context(1, node, {"partition-id": k, "num-partitions": args.nodes, "threads": args.threads},
                              RecordDict(), run.to_run_config()) for k, node in enumerate(node_ids)}
    profiles = {node: contract.read_profile(client_app.query(
        Message(RecordDict({}), message_type=MessageType.QUERY, dst_node_id=node), contexts[node]).content)
        for node in node_ids}
    job = load_job(run)
    initial = job.initial_weights()
    system = run_system(run, int(sum(w.size for w in initial)), profiles)

    class AllOnline:
        """What configure_train asks of the Grid: the nodes online."""

        def get_node_ids(self):
            return node_ids

    configs = [Config(rule, bound, attack, attackers) for attack, attackers in ATTACKS
               for rule in RULES for bound in (0.0, args.norm_bound)]
    for config in configs:
        config.strategy = FimiFedAvg(system, run.policy, profiles, seed=run.seed, node_wait_s=0.0, min_train_nodes=1,
                                     bits_rule=run.bits_rule, aggregation=config.aggregation,
                                     trim_beta=args.trim_beta, norm_bound=config.norm_bound)
        config.arrays = ArrayRecord(initial)
    factors = {"scaled": args.scale, "sign-flip": -1.0}
    print(f"{len(configs)} configurations, {args.nodes} nodes, {args.rounds} rounds, 1 local epoch; "
          f"attackers: partitions 0..k-1; scaled: x{args.scale:g}, sign-flip: x-1")
    for server_round in range(1, args.rounds + 1):
        trained: dict[tuple, Message] = {}  # (global model, node, its plan) -> honest reply, this round
        evaluated: dict[str, float] = {}
        for config in configs:
            key = fingerprint(config.arrays)
            messages = config.strategy.configure_train(server_round, config.arrays,
                                                       ConfigRecord({"local-epochs": run.local_epochs}), AllOnline())
            replies = []
            for message in messages:
                node = message.metadata.dst_node_id
                done = (key, node, contract.NodePlan.from_config(message.content[contract.CONFIG_KEY]))
                if done not in trained:
                    trained[done] = train_on_node(message, contexts[node])
                reply = trained[done]
                if node_ids.index(node) < config.attackers:
                    reply = tampered(message, reply, factors[config.attack])
                replies.append(reply)
            new, costs = config.strategy.aggregate_train(server_round, replies)
            config.arrays = new if new is not None else config.arrays
            config.dropped_norm += int(costs["dropped-norm"])
            key = fingerprint(config.arrays)
            if key not in evaluated:
                evaluated[key] = float(job.evaluate(config.arrays.to_numpy_ndarrays())["accuracy"])
            config.accuracy.append(evaluated[key])
        print(f"round {server_round}: {len({done[0] for done in trained})} distinct global models trained, "
              f"{time.monotonic() - started:.0f} s", flush=True)

    columns = [(rule, bound) for rule in RULES for bound in (0.0, args.norm_bound)]
    cell = {(c.attack, c.attackers, c.aggregation, c.norm_bound): c for c in configs}
    header = "".join(f"{rule + (f' nb{bound:g}' if bound else ''):>18}" for rule, bound in columns)
    print(f"\nfinal global test accuracy after {args.rounds} rounds (updates dropped for their norm)")
    print(f"{'attack':>10} {'k':>2}{header}")
    for attack, attackers in ATTACKS:
        row = [cell[attack, attackers, rule, bound] for rule, bound in columns]
        cells = "".join(f"{c.accuracy[-1]:>13.3f} ({c.dropped_norm:>2})" for c in row)
        print(f"{attack:>10} {attackers:>2}{cells}")
    elapsed = time.monotonic() - started
    print(f"\n{elapsed:.0f} s")
    if args.out:
        setup = {"dataset": run.dataset, "job": run.job, "nodes": args.nodes, "rounds": args.rounds,
                 "local_epochs": run.local_epochs, "alpha": run.dirichlet_alpha, "seed": run.seed,
                 "policy": run.policy, "scale": args.scale, "trim_beta": args.trim_beta,
                 "attackers": "partitions 0..k-1", "seconds": round(elapsed, 1)}
        args.out.write_text(json.dumps({"setup": setup, "rows": [c.row() for c in configs]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
