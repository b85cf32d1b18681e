"""`fedfill price GAME.json`: the leader's price in [GenMEN]'s pricing game as reconstructed
(strategies/allocation/stackelberg.py), the devices' responses and the leader's utility.

    fedfill price GAME.json [--solver exact|random] [--seed S] [--json]

GAME.json: {"server_cost", "revenue", "integer", "devices": [{"theta", "capacity",
"unit_cost", "fixed_cost", "units"}, ...]}. Any solver but the exact one reports its regret
against the exact optimum: (U* - U(p)) / (U* - U(0)).
"""

from __future__ import annotations

import json

import numpy as np

from fedfill.errors import UsageError

SOLVERS = ("exact", "random")  # the learned pricers ([GenMEN]'s GDM, PPO) are not built yet


def add_arguments(parser) -> None:
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("game", metavar="GAME.json", help="the game: the server's cost and revenue, the devices")
    parser.add_argument("--solver", choices=SOLVERS, default="exact",
                        help="exact (default): the optimum; random: a price drawn uniformly in [0, server_cost]")
    parser.add_argument("--seed", type=int, default=0, help="the random solver's seed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from strategies.allocation.stackelberg import GameError, follower_response, leader_utility, load_game, solve_price

    try:
        game = load_game(args.game)
    except GameError as err:
        raise UsageError(str(err)) from None
    if args.seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {args.seed}")
    exact = solve_price(game)
    if args.solver == "exact":
        price = exact.price
    else:
        price = float(np.random.default_rng(args.seed).uniform(0.0, game.server_cost))
    responses = follower_response(game, price)
    utility = float(leader_utility(game, price, responses))
    gain = exact.leader_utility - exact.utility_without_offloading
    regret = (exact.leader_utility - utility) / gain if gain > 0 else 0.0
    result = {"solver": args.solver, "price": price, "responses": responses.tolist(), "leader_utility": utility,
              "optimal_leader_utility": exact.leader_utility,
              "utility_without_offloading": exact.utility_without_offloading, "regret": regret}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"price {price:.6g} ({args.solver}); leader utility {utility:.6g} (optimum {exact.leader_utility:.6g}, "
          f"without offloading {exact.utility_without_offloading:.6g}, regret {regret:.3g})")
    for n, units in enumerate(responses):
        print(f"  device {n}: takes {units:.6g} of {game.units[n]:g} units")
    return 0
