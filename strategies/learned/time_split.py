"""[GenMEN]'s GDM policy put to a second use: as a search for [FIMI]'s time split eta.

This is the one place the learned policy meets a problem with a known optimum: the Lagrangian
search reaches P5's KKT point (and agrees with SLSQP to 1e-6), so E_gdm / E_lagrangian >= 1
measures exactly what the learned search gives up. bench/bench_time_split.py measures it.

- TimeSplitEnv: one-step episodes. Each draws a scenario from presets.fimi_scenario(N, seed)
  with a fresh seed; the state is each device's public figures, normalised; the action
  a in [-1, 1]^N becomes eta = eta_min + (a + 1)/2 (eta_max - eta_min) within
  FimiProblem.eta_bounds(); the reward is -E_round(eta) / E_ref with E_ref the energy of
  fimi.feasible_start (the best of 49 splits on the line between the bounds), floored at -2,
  and -3 where eta is infeasible. The design note gives infeasible -2 and no floor; but a
  split near eta_min costs 10 E_ref and more (every device computing at f_max), so -2 paid
  better than being feasible and the policy learned to be infeasible (measured: every device
  at a = 1 within 600 episodes on 5 devices). Below every feasible reward, it cannot.
- train_time_split_gdm: gdm.train_gdm on that environment.
- GdmTimeSplit: the trained actor as a callable problem -> eta, the hook that
  fimi.search_time_split and policies.solve_plan(search=...) accept.

One policy serves one device count N (its networks are flat MLPs over the N devices); the
design note's padding for smaller fleets is not done here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from strategies.allocation.fimi import FimiProblem, feasible_start, round_energy
from strategies.allocation.presets import fimi_scenario

from .gdm import GdmSettings

FEATURES = 6  # per device: log d_loc, f_max, eps, p_max, log gain, bits
FEASIBLE_FLOOR, INFEASIBLE_REWARD = -2.0, -3.0
TRAIN_SEEDS_FROM = 1_000_000  # training draws seeds at or above this; keep held-out seeds below


def device_features(problem: FimiProblem) -> np.ndarray:
    """(N, 6): each device's public figures mapped to about [-1, 1] over the fimi preset's
    ranges (f_max 1-2 GHz, eps 4-6e-27, P_max 20-23 dBm, 10-400 m of path loss), so the
    networks see inputs of one scale; fixed maps, not fitted, so a policy's input means the
    same thing in every scenario."""
    dv = problem.scenario.devices
    p_dbm = 10.0 * np.log10(dv.p_max * 1e3)
    return np.stack([np.log10(dv.d_loc) - 3.0,
                     (dv.f_max / 1e9 - 1.5) * 2.0,
                     dv.eps / 1e-27 - 5.0,
                     (p_dbm - 21.5) / 1.5,
                     (np.log10(dv.gain) + 8.3) / 3.0,
                     dv.bits / 32.0 - 0.5], axis=-1)


def observe(problem: FimiProblem) -> np.ndarray:
    """The flat state the actor reads: device_features, device by device, as float32."""
    return device_features(problem).reshape(-1).astype(np.float32)


def action_to_eta(problem: FimiProblem, actions: np.ndarray) -> np.ndarray:
    """eta = eta_min + (a + 1)/2 (eta_max - eta_min), a clipped to [-1, 1] (rows of candidates)."""
    eta_min, eta_max = problem.eta_bounds()
    a = np.clip(np.asarray(actions, dtype=float), -1.0, 1.0)
    return eta_min + 0.5 * (a + 1.0) * (eta_max - eta_min)


def problem_for(devices: int, seed: int) -> FimiProblem:
    return FimiProblem.build(fimi_scenario(devices, seed))


class TimeSplitEnv:
    """`batch` one-step episodes side by side, each on a freshly drawn fimi scenario of
    `devices` devices. A scenario with no feasible split on feasible_start's line (rare in the
    preset) is redrawn: it has no E_ref and nothing to teach."""

    def __init__(self, devices: int, batch: int = 8, seed: int = 0):
        if devices < 1 or batch < 1:
            raise ValueError("devices and batch must be at least 1")
        self.devices, self.batch = devices, batch
        self.rng = np.random.default_rng(seed)
        self.problems: list[FimiProblem] = []
        self.reference = np.zeros(batch)

    @property
    def observation_size(self) -> int:
        return FEATURES * self.devices

    @property
    def action_size(self) -> int:
        return self.devices

    def reset(self, problems: list[FimiProblem] | None = None) -> np.ndarray:
        if problems is None:
            problems, reference = [], []
            while len(problems) < self.batch:
                problem = problem_for(self.devices, int(self.rng.integers(TRAIN_SEEDS_FROM, 2 ** 31)))
                energy = reference_energy(problem)
                if np.isfinite(energy):
                    problems.append(problem)
                    reference.append(energy)
        else:
            reference = [reference_energy(p) for p in problems]
        self.problems = problems
        self.batch = len(problems)
        self.reference = np.array(reference)
        self.states = np.stack([observe(p) for p in problems])
        return self.states

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        actions = np.asarray(actions, dtype=float).reshape(self.batch, self.devices)
        energy = np.array([float(round_energy(p, action_to_eta(p, a))[0]) for p, a in zip(self.problems, actions)])
        rewards = np.where(np.isfinite(energy), np.maximum(-energy / self.reference, FEASIBLE_FLOOR), INFEASIBLE_REWARD)
        return self.states, rewards, True


def reference_energy(problem: FimiProblem) -> float:
    """E_ref: the energy of feasible_start's split (inf where it finds none)."""
    eta = feasible_start(problem)
    return float(round_energy(problem, eta)[0]) if eta is not None else float("inf")


@dataclass
class GdmTimeSplit:
    """A trained GDM actor as a time-split search: call it with a FimiProblem, get eta.

    `samples` > 1 denoises that many candidates from independent noise and keeps the one of
    least round energy (one batched evaluation): the search knows its objective, so using it
    is fair, and it is the GDM's only lever once trained. Seeded, so a plan is reproducible.
    """

    actor: object  # gdm.DiffusionActor
    devices: int
    samples: int = 1
    seed: int = 0
    env_steps: int = 0

    def __call__(self, problem: FimiProblem) -> np.ndarray:
        n = len(problem.scenario.devices)
        if n != self.devices:
            raise ValueError(f"this time-split policy serves {self.devices} devices, not {n}")
        actions = self.actor.act(np.repeat(observe(problem)[None, :], self.samples, axis=0), self.seed)
        candidates = action_to_eta(problem, actions)
        if self.samples == 1:
            return candidates[0]
        return candidates[int(np.argmin(round_energy(problem, candidates)))]


# CPU-sized: batch 128 instead of GDMOPT's 512 (4x the updates per second on 2 cores), lr 3e-4
# and 4 updates per environment step, so the critic is fit in minutes, not hours.
CPU_SETTINGS = GdmSettings(batch=128, actor_lr=3e-4, critic_lr=3e-4, updates_per_step=4)


def train_time_split_gdm(devices: int, env_steps: int, seed: int = 0, settings: GdmSettings = CPU_SETTINGS,
                         episodes: int = 8, samples: int = 1, random_start: float = 0.25, on_progress=None,
                         progress_every: int = 0) -> GdmTimeSplit:
    """A GdmTimeSplit for `devices` devices trained on `env_steps` drawn scenarios, `episodes`
    side by side, by gdm.train_gdm with the first `random_start` of the steps played at random:
    with the actor's own actions from the start, the untrained critic's slope drives every
    device to a = +-1, where the actor's clipping stops its gradient and the buffer then holds
    only corners (measured on 5 devices: no feasible split after 2,400 episodes).
    on_progress(env_steps_so_far, GdmTimeSplit) every `progress_every` steps."""
    from dataclasses import replace

    from .gdm import train_gdm

    env = TimeSplitEnv(devices, batch=episodes, seed=seed)

    def report(steps, training):
        on_progress(steps, GdmTimeSplit(training.actor, devices, samples, seed, steps))

    training = train_gdm(env, env_steps, replace(settings, random_start=random_start), seed,
                         report if on_progress else None, progress_every)
    training.actor.eval()
    return GdmTimeSplit(training.actor, devices, samples, seed, training.env_steps)
