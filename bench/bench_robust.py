"""Robust aggregation against poisoned updates, on digits: the global test accuracy when 0, 1
or 2 of 10 nodes send scaled or sign-flipped updates, for each merging rule (fedavg, median,
trimmed-mean) and norm screen (none, or strategies.screening's median, adaptive and clip
rules), and how many honest and how many attackers' updates each screen dropped or clipped.

    python bench/bench_robust.py --rounds 40 --out runs/robust.json   # the table in docs/running.md
    python bench/bench_robust.py --rounds 2                           # a quick check (~2 min)
    python bench/bench_robust.py --nodes 20 --rounds 100 --attacks none --generator \
        --columns fedavg:median,fedavg:adaptive,fedavg:clip   # [FIMI]'s campaign: honest drops

Time: about 9 s a round on 2 cores for the default 40 configurations (365 s for 40 rounds,
measured with other work running); the 20-node honest runs 70-550 s for 100 rounds.

Setup. In process, not `fedfill run`: a run starts Ray, a SuperLink and the apps (about a
minute each), and the table needs 40 runs. What runs is the code `fedfill run` runs, without
Flower's transport: the ClientApp's own `query` and `train` handlers (client/app.py) for each
node, with the Context Flower's simulation gives it (partition id of N, the run config:
classifier job on digits, Dirichlet alpha 0.3, 1 local epoch, seed 0; with --generator the
shipped generator's service, as a default `fedfill run` has it), and the ServerApp's server
side: `run_system` and FimiFedAvg built as server/app.py builds it (policy fimi, every node
every round), its configure_train planning each round and its aggregate_train screening and
merging the replies, then the job's central evaluation. Only the round loop is written here
(Flower's Strategy.start does no more than plan, send, merge, evaluate).

Attack. The attackers are partitions 0..k-1, running the ClientApp with the run's `--attack`
and `--attackers` set, as `fedfill run --attack scale:-100 --attackers 2` does: the node trains
honestly, multiplies its update by the attack's factor (scaled: --scale, default -100, a
boosted sign flip; sign-flip: -1) and sends it at its planned bits, its metrics (and FedAvg
weight) untouched. Median and trimmed mean are Flower's, unweighted; fedavg weighs by D_loc +
D_gen. Screening (`--norm-bound`, default 10, x the round's median update norm): none, or one
of strategies.screening's rules. Reported: the final round's accuracy (and the best), and the
updates dropped or clipped for their norm over the run, honest and attackers' apart.

Every configuration starts from the same model with the same seeds. A node's training is a
function of the global model, the round, its partition and its attack, so configurations
whose global models agree share one training (round 1 always; screens while nothing was
screened): the configurations advance round by round together.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES = ("fedavg", "median", "trimmed-mean")
SCREENS = ("none", "median", "adaptive", "clip")  # none: --norm-bound 0
DEFAULT_COLUMNS = ("fedavg:none", "fedavg:median", "fedavg:adaptive", "fedavg:clip", "median:none",
                   "median:adaptive", "trimmed-mean:none", "trimmed-mean:adaptive")
ATTACKS = (("none", 0), ("scaled", 1), ("scaled", 2), ("sign-flip", 1), ("sign-flip", 2))


@dataclass
class Config:
    """One cell of the table and the run behind it."""

    aggregation: str
    screen: str  # one of SCREENS
    attack: str
    attackers: int
    strategy: object = None
    arrays: object = None  # the global model (an ArrayRecord)
    accuracy: list[float] = field(default_factory=list)  # after each round
    screened: dict = field(default_factory=lambda: {"dropped_honest": 0, "dropped_attackers": 0,
                                                    "clipped_honest": 0, "clipped_attackers": 0})
    honest_screened: list = field(default_factory=list)  # (round, partition, the screen's reason)

    @property
    def column(self) -> str:
        return f"{self.aggregation}:{self.screen}"

    def count(self, server_round: int, nodes: list[dict]) -> None:
        """The screen's verdicts on this round's nodes (on_round_metrics' rows)."""
        for node in nodes:
            reason = str(node.get("reason", ""))
            kind = "dropped" if reason.startswith("update norm") and "exceeds" in reason else \
                "clipped" if reason.startswith("update norm") else None
            if kind:
                who = "attackers" if int(node["partition_id"]) < self.attackers else "honest"
                self.screened[f"{kind}_{who}"] += 1
                if who == "honest":
                    self.honest_screened.append((server_round, int(node["partition_id"]), reason))

    def row(self) -> dict:
        return {"aggregation": self.aggregation, "screen": self.screen, "attack": self.attack,
                "attackers": self.attackers, "final_accuracy": self.accuracy[-1], "best_accuracy": max(self.accuracy),
                "accuracy_by_round": self.accuracy, **self.screened, "honest_screened": self.honest_screened}


def fingerprint(arrays) -> str:
    digest = hashlib.sha1()
    for array in arrays.to_numpy_ndarrays():
        digest.update(array.tobytes())
    return digest.hexdigest()


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


def parse_columns(text: str) -> list[tuple[str, str]]:
    columns = []
    for item in text.split(","):
        rule, _, screen = item.partition(":")
        if rule not in RULES or screen not in SCREENS:
            raise SystemExit(f"--columns {item}: RULE:SCREEN with RULE one of {', '.join(RULES)} and SCREEN one of "
                             f"{', '.join(SCREENS)}")
        columns.append((rule, screen))
    return columns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--scale", type=float, default=-100.0, help="the scaled attack's factor (default: -100)")
    parser.add_argument("--norm-bound", type=float, default=10.0, help="the screens' bound (default: 10)")
    parser.add_argument("--trim-beta", type=float, default=0.2)
    parser.add_argument("--columns", default=",".join(DEFAULT_COLUMNS), help="RULE:SCREEN,... (default: %(default)s)")
    parser.add_argument("--attacks", default="all", help="all, or none: the honest runs alone")
    parser.add_argument("--generator", action="store_true",
                        help="the shipped generator's service fills the nodes' classes, as in a default run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of a node's training (default: 1, as a simulated node)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    columns = parse_columns(args.columns)
    attacks = ATTACKS if args.attacks == "all" else [a for a in ATTACKS if a[0] == args.attacks]

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
    generation = None
    if args.generator:
        from deploy.local import GenerationProcess

        generation = GenerationProcess(Path("runs/bench_robust/logs"), Path("runs/bench_robust/generator-cache"))
        generation.start()
    try:
        run = RunConfig(num_partitions=args.nodes, rounds=args.rounds, local_epochs=1, seed=args.seed,
                        generator_address=generation.address if generation else "")
        attack_specs = {"none": "", "scaled": f"scale:{args.scale:g}", "sign-flip": "sign-flip"}
        node_ids = [1000 + k for k in range(args.nodes)]  # partition k is node 1000 + k; attackers: the first ones

        def context(node: int, attack: str = "", attackers: int = 0) -> Context:
            config = RunConfig(**{**run.__dict__, "attack": attack, "attackers": attackers})
            return Context(1, node, {"partition-id": node_ids.index(node), "num-partitions": args.nodes,
                                     "threads": args.threads}, RecordDict(), config.to_run_config())

        honest = {node: context(node) for node in node_ids}
        profiles = {node: contract.read_profile(client_app.query(
            Message(RecordDict({}), message_type=MessageType.QUERY, dst_node_id=node), honest[node]).content)
            for node in node_ids}
        job = load_job(run)
        initial = job.initial_weights()
        system = run_system(run, int(sum(w.size for w in initial)), profiles)

        class AllOnline:
            """What configure_train asks of the Grid: the nodes online."""

            def get_node_ids(self):
                return node_ids

        configs = [Config(rule, screen, attack, attackers) for attack, attackers in attacks for rule, screen in columns]
        for config in configs:
            config.strategy = FimiFedAvg(
                system, run.policy, profiles, seed=run.seed, node_wait_s=0.0, min_train_nodes=1,
                bits_rule=run.bits_rule, aggregation=config.aggregation, trim_beta=args.trim_beta,
                norm_bound=0.0 if config.screen == "none" else args.norm_bound,
                norm_screen="median" if config.screen == "none" else config.screen,
                on_round_metrics=lambda server_round, _costs, nodes, config=config: config.count(server_round, nodes))
            config.arrays = ArrayRecord(initial)
        print(f"{len(configs)} configurations, {args.nodes} nodes, {args.rounds} rounds, 1 local epoch; "
              f"attackers: partitions 0..k-1; scaled: x{args.scale:g}, sign-flip: x-1", flush=True)
        for server_round in range(1, args.rounds + 1):
            trained: dict[tuple, Message] = {}  # (global model, node, its plan, its attack) -> reply, this round
            evaluated: dict[str, float] = {}
            for config in configs:
                key = fingerprint(config.arrays)
                messages = config.strategy.configure_train(server_round, config.arrays,
                                                           ConfigRecord({"local-epochs": run.local_epochs}),
                                                           AllOnline())
                replies = []
                for message in messages:
                    node = message.metadata.dst_node_id
                    attack = attack_specs[config.attack] if node_ids.index(node) < config.attackers else ""
                    done = (key, node, contract.NodePlan.from_config(message.content[contract.CONFIG_KEY]), attack)
                    if done not in trained:
                        trained[done] = train_on_node(message, context(node, attack, config.attackers) if attack
                                                      else honest[node])
                    replies.append(trained[done])
                new, _ = config.strategy.aggregate_train(server_round, replies)
                config.arrays = new if new is not None else config.arrays
                key = fingerprint(config.arrays)
                if key not in evaluated:
                    evaluated[key] = float(job.evaluate(config.arrays.to_numpy_ndarrays())["accuracy"])
                config.accuracy.append(evaluated[key])
            print(f"round {server_round}: {len({done[0] for done in trained})} distinct global models trained, "
                  f"{time.monotonic() - started:.0f} s", flush=True)
    finally:
        if generation is not None:
            generation.stop()

    cell = {(c.attack, c.attackers, c.column): c for c in configs}
    print(f"\nfinal global test accuracy after {args.rounds} rounds; the norm screen's drops (d) and clips (c), "
          f"honest / attackers'")
    print(f"{'attack':>10} {'k':>2}" + "".join(f"{rule + ':' + screen:>30}" for rule, screen in columns))
    for attack, attackers in attacks:
        cells = []
        for rule, screen in columns:
            c = cell[attack, attackers, f"{rule}:{screen}"]
            n = c.screened
            cells.append(f"{c.accuracy[-1]:.3f} d{n['dropped_honest']}/{n['dropped_attackers']} "
                         f"c{n['clipped_honest']}/{n['clipped_attackers']}")
        print(f"{attack:>10} {attackers:>2}" + "".join(f"{text:>30}" for text in cells))
    for c in configs:
        for server_round, partition, reason in c.honest_screened:
            print(f"  {c.column} {c.attack} {c.attackers}: round {server_round}, honest partition {partition}: {reason}")
    elapsed = time.monotonic() - started
    print(f"\n{elapsed:.0f} s")
    if args.out:
        setup = {"dataset": run.dataset, "job": run.job, "nodes": args.nodes, "rounds": args.rounds,
                 "local_epochs": run.local_epochs, "alpha": run.dirichlet_alpha, "seed": run.seed,
                 "policy": run.policy, "scale": args.scale, "norm_bound": args.norm_bound,
                 "trim_beta": args.trim_beta, "generator": args.generator,
                 "attackers": "partitions 0..k-1", "seconds": round(elapsed, 1)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"setup": setup, "rows": [c.row() for c in configs]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
