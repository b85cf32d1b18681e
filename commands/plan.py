"""`fedfill plan`: solve one round's allocation and show it per device, or as JSON.

Exit status: 0 with a feasible plan, 2 when the scenario is infeasible (the reason is printed)
or malformed (the field and device are named).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from fedfill.errors import UsageError

from strategies.allocation.fimi import SEARCHES
from strategies.allocation.policies import POLICY_FORMS, Plan, parse_policy, solve_plan
from strategies.allocation.scenario import ScenarioError, load_scenario, parse_scenario_text


def add_arguments(parser) -> None:
    parser.add_argument("scenario", help="scenario JSON file (`fedfill scenario` writes one), or - for standard input")
    parser.add_argument("--policy", default="fimi", help=f"{POLICY_FORMS} (default: fimi)")
    parser.add_argument("--bits-rule", default="codec", choices=("codec", "theorem1"),
                        help="how ondemand turns an error demand into bits: a model of fedfill's codec (default) or "
                             "ODQ's Theorem 1 as printed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CE search; the same seed gives the same plan")
    parser.add_argument("--search", default="lagrangian", choices=SEARCHES,
                        help="time-split search: exact Lagrangian best response (default) or FIMI's cross-entropy")
    parser.add_argument("--bits", type=int, help="quantize every device's upload to this many bits (overrides the file)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (the documented contract)")


def run(args) -> int:
    try:
        parse_policy(args.policy)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        if args.scenario == "-":
            scenario = parse_scenario_text(sys.stdin.read(), "standard input")
        else:
            scenario = load_scenario(args.scenario)
    except ScenarioError as err:
        raise UsageError(str(err)) from None
    if args.bits is not None:
        if not 1 <= args.bits <= 32:
            raise UsageError(f"--bits must be from 1 to 32, got {args.bits}")
        scenario = type(scenario)(scenario.system, scenario.devices.with_bits(args.bits))
    plan = solve_plan(scenario, args.policy, seed=args.seed, search=args.search, bits_rule=args.bits_rule)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
    else:
        print_plan(plan)
    return 0 if plan.feasible else 2


def print_plan(plan: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)  # pipes and logs get the full table
    if not plan.feasible:
        console.print(f"[bold red]infeasible[/] under policy {plan.policy}:")
        for reason in plan.reasons:
            devices = ", ".join(reason["devices"][:12]) + (" ..." if len(reason["devices"]) > 12 else "")
            console.print(f"  {reason['constraint']}: {reason['message']}" + (f" [{devices}]" if devices else ""))
        return
    table = Table(title=f"plan: {plan.policy}", show_lines=False)
    for name in ("device", "d_gen", "f GHz", "b MHz", "P mW", "eta", "bits", "T_cmp s", "T_com s", "E_cmp J", "E_com J", "binds"):
        table.add_column(name, justify="left" if name in ("device", "binds") else "right")
    show = list(range(len(plan.ids)))
    if len(show) > 40:  # a thousand rows help nobody: the first and last 20
        show = show[:20] + [-1] + show[-20:]
    for k in show:
        if k < 0:
            table.add_row("...", *[""] * 11)
            continue
        table.add_row(plan.ids[k], f"{plan.d_gen[k]:.0f}", f"{plan.f[k] / 1e9:.3f}", f"{plan.b[k] / 1e6:.3f}",
                      f"{plan.p[k] * 1e3:.1f}", f"{plan.eta[k]:.3f}", str(plan.bits[k]), f"{plan.t_cmp[k]:.2f}",
                      f"{plan.t_com[k]:.2f}", f"{plan.e_cmp[k]:.3f}", f"{plan.e_com[k]:.3f}", ", ".join(plan.binding[k]) or "-")
    console.print(table)
    console.print(f"energy {plan.energy_j:.4f} J (compute {np.sum(plan.e_cmp):.4f}, upload {np.sum(plan.e_com):.4f}), "
                  f"latency {plan.latency_s:.2f} s, synthetic samples {np.sum(plan.d_gen):.0f}, "
                  f"solved in {plan.seconds * 1e3:.0f} ms")
