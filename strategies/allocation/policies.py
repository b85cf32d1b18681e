"""From a scenario and a policy name to a per-device plan: the allocation engine's front door.

  fimi           synthetic data + CPU + bandwidth + power, jointly ([FIMI])
  tfl            the same resource optimisation with no synthetic data
  hdc            FIMI's amounts, all synthetic data for the least-populated class
  fixed          each device's given bits, a 50/50 time split, an equal band share ([ODQ]'s baseline)
  ondemand       bits from each device's error demand, optimal time split, equal band share ([ODQ])
  fimi+ondemand  bits from each device's demand, then FIMI with S_i = M * bits_i

and FIMI with one part taken out, the ablations of [FIMI Fig. 5e]:

  fimi-equal-band  every device gets B/N (w/o BA: no bandwidth allocation, power still optimised)
  fimi-uniform     FIMI's amounts spread evenly over the classes (w/o OA: not [FIMI eq. 47]'s filling)

and two fixed-width forms of `fixed` (`parse_policy`):

  fp32           every device at 32 bits, raw floats ([ODQ]'s FedAvg baseline)
  fixed-N        every device at N bits, N in 2..32 ([ODQ]'s fixed 6/7/8-bit baselines)

Bits from a demand (`ondemand`, `fimi+ondemand`) follow `bits_rule`: "codec" (default) models
our codec's real error K / (L - 1)^2 with each device's reported codec constant K (the prior
from M where it has none); "theorem1" is [ODQ Thm. 1]'s rule, which our codec does not honour
(quantization.py). A demand that no width up to 31 bits meets makes the plan infeasible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from .augmentation import synthetic_request
from .costs import compute_energy, power_for_upload, update_bits
from .fimi import (CrossEntropySettings, FimiProblem, SearchTrace, search_time_split,
                   solve_compute, solve_uplink)
from .quantization import (BITS_RULES, optimal_time_split, planned_bits, prior_codec_constant, smallest_demand,
                           split_bounds)
from .scenario import Scenario

POLICIES = ("fimi", "tfl", "hdc", "fixed", "ondemand", "fimi+ondemand", "fimi-equal-band",
            "fimi-uniform")  # the base policies
FIXED_BITS = range(2, 33)
POLICY_FORMS = (f"{', '.join(POLICIES)}, fp32 (every device at 32 bits: raw floats) or fixed-N "
                f"(every device at N bits, N from {FIXED_BITS[0]} to {FIXED_BITS[-1]})")
_REL = 1e-6  # a variable within this fraction of its bound counts as sitting on it


@dataclass
class Plan:
    policy: str
    feasible: bool
    ids: tuple[str, ...]
    reasons: list[dict] = field(default_factory=list)  # why not feasible: constraint, devices, message
    d_gen: np.ndarray | None = None
    f: np.ndarray | None = None
    b: np.ndarray | None = None
    p: np.ndarray | None = None
    eta: np.ndarray | None = None
    bits: np.ndarray | None = None
    t_cmp: np.ndarray | None = None
    t_com: np.ndarray | None = None
    e_cmp: np.ndarray | None = None
    e_com: np.ndarray | None = None
    class_gen: list[np.ndarray] | None = None
    binding: list[list[str]] | None = None
    prices: dict = field(default_factory=dict)  # Lagrange multipliers of the shared constraints
    trace: SearchTrace | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # what the planner changed to find a plan, said plainly

    @property
    def energy_j(self) -> float:
        return float(np.sum(self.e_cmp) + np.sum(self.e_com)) if self.feasible else float("inf")

    @property
    def latency_s(self) -> float:
        return float(np.max(self.t_cmp + self.t_com)) if self.feasible else float("inf")

    def to_json(self) -> dict:
        """The public plan contract (README): SI units, one entry per device."""
        out = {"policy": self.policy, "feasible": self.feasible,
               "energy_j": self.energy_j if self.feasible else None,
               "latency_s": self.latency_s if self.feasible else None}
        if not self.feasible:
            out["reasons"] = self.reasons
            return out
        devices = []
        for k, dev_id in enumerate(self.ids):
            devices.append({
                "id": dev_id, "d_gen": float(self.d_gen[k]), "f_hz": float(self.f[k]), "b_hz": float(self.b[k]),
                "p_w": float(self.p[k]), "eta": float(self.eta[k]), "bits": int(self.bits[k]),
                "t_cmp_s": float(self.t_cmp[k]), "t_com_s": float(self.t_com[k]),
                "e_cmp_j": float(self.e_cmp[k]), "e_com_j": float(self.e_com[k]),
                "class_gen": None if self.class_gen is None else [int(c) for c in self.class_gen[k]],
                "binding": self.binding[k],
            })
        out["devices"] = devices
        if self.notes:
            out["notes"] = self.notes
        out["prices"] = self.prices
        out["solve_seconds"] = self.seconds
        return out


def parse_policy(name: str) -> tuple[str, int | None]:
    """(base policy, bits every device is fixed at, or None) for a policy name.

    The names of POLICIES stand for themselves; `fp32` is ("fixed", 32) and `fixed-N` is
    ("fixed", N) for N in 2..32. Anything else is a ValueError listing the accepted forms.
    """
    if isinstance(name, str):
        if name in POLICIES:
            return name, None
        if name == "fp32":
            return "fixed", 32
        if name.startswith("fixed-"):
            digits = name[len("fixed-"):]
            if digits.isascii() and digits.isdigit() and int(digits) in FIXED_BITS and digits == str(int(digits)):
                return "fixed", int(digits)
    raise ValueError(f"unknown policy {name!r}; choose one of {POLICY_FORMS}")


def solve_plan(scenario: Scenario, policy: str = "fimi", seed: int = 0, search: str | Callable = "lagrangian",
               ce_settings: CrossEntropySettings | None = None, bits_rule: str = "codec") -> Plan:
    """Plan one round for every device of the scenario. Infeasible is an answer, not an error.

    `policy` is any name `parse_policy` accepts (the plan keeps it as given); `bits_rule`
    ("codec" or "theorem1") turns error demands into bits for ondemand and fimi+ondemand.
    `search` is a name in fimi.SEARCHES or a callable problem -> eta (search_time_split's hook).
    """
    base, fixed_bits = parse_policy(policy)
    if bits_rule not in BITS_RULES:
        raise ValueError(f"unknown bits rule {bits_rule!r}; choose one of {', '.join(BITS_RULES)}")
    started = time.perf_counter()
    devices = scenario.devices
    if fixed_bits is not None:
        scenario = Scenario(scenario.system, devices.with_bits(fixed_bits))
    if base in ("ondemand", "fimi+ondemand"):
        scenario, reasons = _bits_from_demands(scenario, bits_rule)
        if reasons:
            plan = Plan(policy, False, devices.ids, reasons=reasons)
            plan.seconds = time.perf_counter() - started
            return plan
    if base in ("fixed", "ondemand"):
        plan = _plan_equal_share(scenario, base)
    else:
        plan = _plan_fimi(scenario, base, np.random.default_rng(seed), search, ce_settings or CrossEntropySettings())
    plan.policy = policy
    plan.seconds = time.perf_counter() - started
    return plan


def error_target_out_of_reach(plan: Plan) -> bool:
    """True when only the learning-error target (no device in particular) leaves no plan:
    the synthetic cap or the devices' CPUs cannot bring the errors down to it."""
    return (not plan.feasible and bool(plan.reasons)
            and all(r["constraint"] == "learning_error" and not r["devices"] for r in plan.reasons))


def reachable_delta_max(scenario: Scenario, policy: str = "fimi", seed: int = 0, steps: int = 24) -> float | None:
    """The tightest Delta_max (within 1e-3 relative) above the scenario's for which `policy`
    plans every device; None when even 0.999 does not. Bisection on log Delta_max: the error
    budget grows with it, so feasibility is monotone."""
    def feasible(delta_max: float) -> bool:
        system = replace(scenario.system, delta_max=delta_max)
        return solve_plan(Scenario(system, scenario.devices), policy, seed=seed).feasible

    low, high = math.log(scenario.system.delta_max), math.log(0.999)
    if not feasible(math.exp(high)):
        return None
    for _ in range(steps):
        if high - low < 1e-3:
            break
        middle = 0.5 * (low + high)
        low, high = (low, middle) if feasible(math.exp(middle)) else (middle, high)
    return math.exp(high)


def codec_constants(scenario: Scenario) -> np.ndarray:
    """Each device's codec constant: its reported one, else the prior for the model's size."""
    reported = scenario.devices.codec_constant
    return np.where(np.isfinite(reported), reported, prior_codec_constant(scenario.system.model_params))


def _bits_from_demands(scenario: Scenario, rule: str) -> tuple[Scenario, list[dict]]:
    """Devices with a demand get the bits `rule` gives it; a demand beyond 31 bits is a reason."""
    dv = scenario.devices
    demanded = ~np.isnan(dv.quant_error)
    constant = codec_constants(scenario)
    bits = dv.bits.copy()
    if demanded.any():
        bits[demanded] = planned_bits(dv.quant_error[demanded], constant[demanded], rule)
    reasons = []
    floor = smallest_demand(constant, rule)
    model = "ODQ's Theorem 1" if rule == "theorem1" else "the codec model"
    for k in np.flatnonzero(demanded & (bits > 31)):
        constant_note = "" if rule == "theorem1" else f", codec constant {constant[k]:.4g}"
        reasons.append({"constraint": "quantization_error", "devices": [dv.ids[k]],
                        "message": f"device '{dv.ids[k]}' demands a relative error of {dv.quant_error[k]:.4g}; "
                                   f"no width up to 31 bits meets it under {model} (the smallest demand 31 bits "
                                   f"can meet is {floor[k]:.4g}{constant_note})",
                        "smallest_demand": float(floor[k])})
    return Scenario(scenario.system, dv.with_bits(bits)), reasons


def _plan_fimi(scenario: Scenario, policy: str, rng, search: str | Callable, settings: CrossEntropySettings) -> Plan:
    problem = FimiProblem.build(scenario, allow_synthetic=(policy != "tfl"), equal_band=(policy == "fimi-equal-band"))
    trace = SearchTrace()
    eta_min, eta_max = problem.eta_bounds()
    # A device that cannot meet T_max on its own leaves nothing to search.
    eta = search_time_split(problem, search, rng, settings, trace) if np.all(eta_min < eta_max) else None
    ids = scenario.devices.ids
    if eta is None:
        return Plan(policy, False, ids, reasons=diagnose_fimi(problem), trace=trace)
    t_max = scenario.system.t_max_s
    cmp_ = solve_compute(problem, eta * t_max)
    com = solve_uplink(problem, (1.0 - eta) * t_max)
    dv, sy = scenario.devices, scenario.system
    d_gen = cmp_.d_gen[0]
    class_gen = None
    if dv.class_counts is not None:
        class_gen = [synthetic_request(policy, c, g) for c, g in zip(dv.class_counts, d_gen)]
    binding = _binding(cmp_.f[0], dv.f_max, com.p[0], dv.p_max)
    if problem.allow_synthetic:
        for k, g in enumerate(d_gen):
            if g <= _REL * dv.d_loc[k]:
                binding[k].append("no synthetic data")
            elif g >= sy.d_gen_max * (1 - _REL):
                binding[k].append("synthetic data at its cap")
    prices = {"error_budget_nu": float(cmp_.nu[0]), "bandwidth_varpi": float(com.varpi[0]),
              "error_budget": problem.error_budget, "error_sum": float(cmp_.delta[0].sum())}
    return Plan(policy, True, ids, d_gen=d_gen, f=cmp_.f[0], b=com.b[0], p=com.p[0], eta=eta,
                bits=dv.bits.copy(), t_cmp=eta * t_max, t_com=(1.0 - eta) * t_max,
                e_cmp=cmp_.energy[0], e_com=com.energy[0], class_gen=class_gen, binding=binding,
                prices=prices, trace=trace)


def _plan_equal_share(scenario: Scenario, policy: str) -> Plan:
    """[ODQ]'s setting: devices independent, each with an equal share of the band."""
    sy, dv = scenario.system, scenario.devices
    n = len(dv)
    b = np.full(n, sy.bandwidth_hz / n)
    s_bits = update_bits(sy.model_params, dv.bits)
    work = sy.tau * sy.omega * dv.d_loc
    theta_min, pi_min = split_bounds(work, dv.f_max, s_bits, b, dv.gain, dv.p_max, sy.noise_w_per_hz, sy.t_max_s)
    if policy == "fixed":
        theta = np.full(n, 0.5)
        too_slow = np.flatnonzero(theta_min > 0.5 * (1 + 1e-12))
        too_weak = np.flatnonzero(pi_min > 0.5 * (1 + 1e-12))
        reasons = []
        if too_slow.size:
            reasons.append(_reason("cpu", dv.ids, too_slow, "cannot train the local data in half of T_max at f_max"))
        if too_weak.size:
            reasons.append(_reason("power", dv.ids, too_weak, "cannot upload in half of T_max at P_max over an equal band share"))
    else:
        stuck = np.flatnonzero(theta_min + pi_min > 1.0)
        reasons = [_reason("latency", dv.ids, stuck, "cannot train at f_max and upload at P_max over an equal band share within T_max")] if stuck.size else []
        theta = np.zeros(n) if reasons else optimal_time_split(dv.eps, work, s_bits, b, dv.gain, sy.noise_w_per_hz, sy.t_max_s, theta_min, pi_min)
    if reasons:
        return Plan(policy, False, dv.ids, reasons=reasons)
    t_cmp, t_com = theta * sy.t_max_s, (1.0 - theta) * sy.t_max_s
    f = work / t_cmp
    p = power_for_upload(b, t_com, s_bits, dv.gain, sy.noise_w_per_hz)
    return Plan(policy, True, dv.ids, d_gen=np.zeros(n), f=f, b=b, p=p, eta=theta, bits=dv.bits.copy(),
                t_cmp=t_cmp, t_com=t_com, e_cmp=compute_energy(dv.eps, sy.tau, sy.omega, dv.d_loc, f),
                e_com=p * t_com, binding=_binding(f, dv.f_max, p, dv.p_max),
                class_gen=None if dv.class_counts is None else [np.zeros_like(c) for c in dv.class_counts])


def _binding(f, f_max, p, p_max) -> list[list[str]]:
    out = []
    for k in range(len(f)):
        tags = []
        if f[k] >= f_max[k] * (1 - _REL):
            tags.append("CPU at f_max")
        if p[k] >= p_max[k] * (1 - _REL):
            tags.append("power at P_max")
        out.append(tags)
    return out


def _reason(constraint: str, ids, index, message: str) -> dict:
    return {"constraint": constraint, "devices": [ids[i] for i in index], "message": message}


def diagnose_fimi(problem: FimiProblem) -> list[dict]:
    """Which constraint, and which devices, leave no feasible plan."""
    sy, dv = problem.scenario.system, problem.scenario.devices
    eta_min, eta_max = problem.eta_bounds()
    stuck = np.flatnonzero(eta_min >= eta_max)
    if stuck.size:
        return [_reason("latency", dv.ids, stuck, "cannot train the local data at f_max and upload the update at "
                        "P_max over the whole band within T_max")]
    reasons = []
    # The error target is easiest with the most compute time, the band with the most upload time.
    best_for_error = solve_compute(problem, eta_max * sy.t_max_s)
    if problem.allow_synthetic and not best_for_error.feasible[0]:
        d_cap = dv.f_max * eta_max * sy.t_max_s / (sy.tau * sy.omega)
        cpu_limited = np.flatnonzero(d_cap < dv.d_loc + sy.d_gen_max)
        if cpu_limited.size:
            reasons.append(_reason("learning_error", dv.ids, cpu_limited,
                                   "even at f_max for nearly all of T_max these devices cannot train enough "
                                   "samples to meet the error target (sum of errors "
                                   f"{best_for_error.delta_lo.sum():.4g} > budget {problem.error_budget:.4g})"))
        else:
            reasons.append({"constraint": "learning_error", "devices": [],
                            "message": f"d_gen_max = {sy.d_gen_max:g} synthetic samples per device cannot meet the "
                                       f"error target (sum of errors {best_for_error.delta_lo.sum():.4g} > budget "
                                       f"{problem.error_budget:.4g})"})
    most_upload_time = solve_uplink(problem, (1.0 - eta_min) * sy.t_max_s)
    if not most_upload_time.feasible[0]:
        b_min = most_upload_time.b_min[0]
        heavy = np.flatnonzero(~np.isfinite(b_min) | (b_min > sy.bandwidth_hz / len(dv)))
        reasons.append(_reason("bandwidth", dv.ids, heavy,
                               f"at P_max the devices need {np.sum(b_min):.4g} Hz in all, more than B = "
                               f"{sy.bandwidth_hz:.4g} Hz; these need more than an equal share"))
    if not reasons:
        reasons.append({"constraint": "joint", "devices": [],
                        "message": "the error target needs long compute times and the band needs long upload "
                                   "times; no split of T_max satisfies both"})
    return reasons
