"""`fedfill scenario`: write a scenario for one of the papers' settings ([FIMI] or [ODQ]) as JSON."""

from __future__ import annotations

import json
import sys

from fedfill.errors import UsageError

from strategies.allocation.learning import LearningModel
from strategies.allocation.presets import PRESETS, fimi_scenario, ondemand_scenario


def add_arguments(parser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default="fimi", help="whose simulation settings (default: fimi)")
    parser.add_argument("--devices", type=int, default=20, help="number of devices (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random device draws (default: 0)")
    parser.add_argument("--fit", metavar="FILE", help="learning-model fit (from `fedfill fit-learning`) for alpha, beta, gamma")
    parser.add_argument("--out", metavar="FILE", help="write here instead of standard output")


def run(args) -> int:
    if args.devices < 1:
        raise UsageError(f"--devices must be at least 1, got {args.devices}")
    if args.preset == "fimi":
        learning = None
        if args.fit:
            try:
                learning = LearningModel.load(args.fit)
            except (OSError, ValueError, TypeError) as err:
                raise UsageError(f"cannot read the learning fit {args.fit}: {err}") from None
        scenario = fimi_scenario(args.devices, args.seed, learning)
    else:
        if args.fit:
            raise UsageError("--fit applies to the fimi preset only")
        scenario = ondemand_scenario(args.devices, args.seed)
    text = json.dumps(scenario.to_json(), indent=1) + "\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0
