"""`fedfill price GAME.json`: the leader's price in [GenMEN]'s pricing game as reconstructed
(strategies/allocation/stackelberg.py), the devices' responses and the leader's utility.

    fedfill price GAME.json [--solver exact|gdm|ppo|random] [--train-steps N] [--seed S]
                            [--reward utility|improvement|improvement-vs-best] [--state bounds|last]
                            [--pricer DIR] [--save DIR] [--json]

GAME.json: {"server_cost", "revenue", "integer", "devices": [{"theta", "capacity",
"unit_cost", "fixed_cost", "units", "weight" (optional)}, ...]}.

exact solves the game knowing every theta. A learned solver (gdm, ppo) never sees a theta: it
trains on games with the file's public figures and thetas drawn from a prior (each device's
entry price uniform in 2%..60% of the server's cost), then plays the file's game for a few
rounds, seeing only the devices' responses (and, by default, the bounds on each device's
entry price that they imply so far), and its last price is the answer. random draws
its prices uniformly in [0, server_cost]. Any solver but exact reports its regret against
the optimum: (U* - U(p)) / (U* - U(0)).
"""

from __future__ import annotations

import json
import sys
import time

from fedfill.errors import UsageError

SOLVERS = ("exact", "gdm", "ppo", "random")
DEFAULT_TRAIN_STEPS = 4000
MAX_TRAIN_STEPS = 1_000_000  # about two hours of GDM training on two CPU cores


def add_arguments(parser) -> None:
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("game", metavar="GAME.json", help="the game: the server's cost and revenue, the devices")
    parser.add_argument("--solver", choices=SOLVERS, default="exact",
                        help="exact (default): the optimum, knowing every theta; gdm: [GenMEN]'s diffusion policy; "
                             "ppo: PPO (needs the [rl] extra); random: uniform prices")
    parser.add_argument("--train-steps", type=int, default=DEFAULT_TRAIN_STEPS,
                        help=f"gdm, ppo: environment steps to train for (default {DEFAULT_TRAIN_STEPS}, "
                             f"at most {MAX_TRAIN_STEPS:,})")
    parser.add_argument("--reward", default="utility", choices=("utility", "improvement", "improvement-vs-best"),
                        help="gdm, ppo: utility (default): the leader's normalised utility; improvement: [GenMEN]'s "
                             "1 when it rose over the last price; improvement-vs-best: 1 at the episode's best")
    parser.add_argument("--state", default="bounds", choices=("bounds", "last"),
                        help="gdm, ppo: what the leader's state holds: bounds (default): the last price and "
                             "responses, and per device the entry-price bounds all responses so far imply; last: "
                             "[GenMEN]'s, the last price and responses only")
    parser.add_argument("--pricer", metavar="DIR", help="gdm, ppo, random: play a saved pricer instead of training one")
    parser.add_argument("--save", metavar="DIR", help="gdm, ppo, random: save the trained pricer here")
    parser.add_argument("--seed", type=int, default=0, help="the seed of training, the thetas drawn and the first price")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:

    from strategies.allocation.stackelberg import GameError, follower_response, leader_utility, load_game, solve_price

    try:
        game = load_game(args.game)
    except GameError as err:
        raise UsageError(str(err)) from None
    if args.seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {args.seed}")
    if not 0 <= args.train_steps <= MAX_TRAIN_STEPS:
        raise UsageError(f"--train-steps must be in [0, {MAX_TRAIN_STEPS:,}], got {args.train_steps}")
    if args.solver == "exact" and (args.pricer or args.save):
        raise UsageError("--pricer and --save are for the gdm, ppo and random solvers")
    exact = solve_price(game)
    result = {"solver": args.solver}
    if args.solver == "exact":
        price = exact.price
    else:
        pricer = _pricer(args, game)
        from strategies.learned.pricers import play
        rounds = play(pricer, [game], seed=args.seed)
        price = float(rounds.prices[0, -1]) * game.server_cost
        result.update(rounds_played=pricer.horizon, trained_steps=pricer.env_steps,
                      prices_played=(rounds.prices[0] * game.server_cost).tolist())
    responses = follower_response(game, price)
    utility = float(leader_utility(game, price, responses))
    gain = exact.leader_utility - exact.utility_without_offloading
    regret = (exact.leader_utility - utility) / gain if gain > 0 else 0.0
    result.update(price=price, responses=responses.tolist(), leader_utility=utility,
                  optimal_price=exact.price, optimal_leader_utility=exact.leader_utility,
                  utility_without_offloading=exact.utility_without_offloading, regret=regret)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"price {price:.6g} ({args.solver}); leader utility {utility:.6g} (optimum {exact.leader_utility:.6g} "
          f"at {exact.price:.6g}, without offloading {exact.utility_without_offloading:.6g}, regret {regret:.3g})")
    for n, units in enumerate(responses):
        print(f"  device {n}: takes {units:.6g} of {game.units[n]:g} units")
    return 0


def _pricer(args, game):
    """The learned (or random) pricer: loaded from --pricer, or trained here on games with
    GAME.json's public figures, saved to --save if asked."""
    from strategies.allocation.stackelberg import GameError
    from strategies.learned.envs import GameDraw, check_draw
    from strategies.learned.pricers import PricerError, load_pricer, save_pricer, train_pricer

    try:
        check_draw(game)
    except GameError as err:
        raise UsageError(str(err)) from None
    if args.pricer:
        try:
            pricer = load_pricer(args.pricer)
        except PricerError as err:
            raise UsageError(str(err)) from None
        if pricer.kind != args.solver:
            raise UsageError(f"{args.pricer} holds a {pricer.kind} pricer, not {args.solver}")
        if pricer.draw.devices != len(game.theta):
            raise UsageError(f"{args.pricer} prices games of {pricer.draw.devices} devices; "
                             f"{args.game} has {len(game.theta)}")
    else:
        started = time.monotonic()

        def progress(steps, _):
            print(f"  {args.solver}: {steps:,} of {args.train_steps:,} steps, {time.monotonic() - started:.0f} s",
                  file=sys.stderr, flush=True)

        try:
            pricer = train_pricer(args.solver, GameDraw.around(game), args.train_steps if args.solver != "random" else 0,
                                  seed=args.seed, reward=args.reward, on_progress=progress,
                                  progress_every=max(args.train_steps // 10, 1), memory=args.state == "bounds")
        except ImportError as err:
            raise UsageError(str(err)) from None
    if args.save:
        save_pricer(pricer, args.save)
    return pricer
