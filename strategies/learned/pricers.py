"""Learned leaders for [GenMEN]'s pricing game: train, play, save and load.

A pricer maps the leader's states (envs.observe) to actions in [-1, 1], the price
q = (a + 1) / 2 of the server's own cost. Three kinds: the paper's GDM policy, PPO and a
uniformly random price. Each is trained on games drawn by a GameDraw and only ever sees what a
deployed leader would; the exact solver (which needs every theta) is the yardstick.

A checkpoint is a directory: pricer.json (the kind, the draw, the settings, the training it had)
and the weights (actor.pt for the GDM, ppo.zip for PPO).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from strategies.allocation.stackelberg import PricingGame

from .envs import REWARDS, GameDraw, PricingEnv, narrow, no_bounds, observation_size, observe

PRICERS = ("gdm", "ppo", "random")
MAX_TRAIN_STEPS = 10_000_000
MAX_HORIZON = 1000
PRICER_FILE = "pricer.json"


class PricerError(ValueError):
    """A pricer checkpoint that cannot be used, or a request it cannot serve, with the reason."""


@dataclass
class Pricer:
    kind: str
    draw: GameDraw
    horizon: int = 10
    reward: str = "utility"
    env_steps: int = 0
    seed: int = 0
    settings: dict = field(default_factory=dict)
    memory: bool = True  # the state holds each device's entry-price bounds (envs.narrow); False: [GenMEN]'s
    model: object = None  # the GDM's actor or the PPO model; None for the random pricer
    bounds: tuple | None = None  # next_price's bounds so far, over the rounds of a run

    def act(self, states: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One action in [-1, 1] per state row (shape (B, 1))."""
        states = np.asarray(states, dtype=np.float32)
        if states.ndim != 2 or states.shape[1] != observation_size(self.draw.devices, self.memory):
            raise PricerError(f"this pricer plays games of {self.draw.devices} devices: a state of "
                              f"{observation_size(self.draw.devices, self.memory)} numbers, not {states.shape[-1]}")
        if self.kind == "random":
            return rng.uniform(-1.0, 1.0, (len(states), 1))
        if self.kind == "ppo":
            return np.asarray(self.model.predict(states, deterministic=True)[0]).reshape(len(states), 1)
        return self.model.act(states, int(rng.integers(2 ** 31)))

    def next_price(self, game: PricingGame, price: float, responses: np.ndarray, rng: np.random.Generator) -> float:
        """The price after `price` drew `responses` in `game`, reading only its public figures
        (and, with memory, narrowing the bounds kept from the earlier calls)."""
        bounds = None
        if self.memory:
            bounds = self.bounds = narrow(game, price, responses, self.bounds or no_bounds(len(game.units)))
        q = (float(self.act(observe(game, price, responses, bounds)[None, :], rng)[0, 0]) + 1.0) / 2.0
        return q * game.server_cost


@dataclass
class Play:
    """Prices (fractions of the server's cost) and normalised utilities, one row per game and
    one column per step, and the exact optimum's normalised utility."""
    prices: np.ndarray
    utilities: np.ndarray
    optimum: np.ndarray

    @property
    def regret(self) -> np.ndarray:
        """The regret of each game's last price."""
        return regret(self.optimum, self.utilities[:, -1])

    @property
    def best_regret(self) -> np.ndarray:
        """The regret of the best price each game saw: a leader that keeps the best it tried
        (it sees its own utility)."""
        return regret(self.optimum, self.utilities.max(axis=1))


def regret(optimum: np.ndarray, utility: np.ndarray) -> np.ndarray:
    """(U* - U(p)) / (U* - U(0)) from normalised utilities (U(0) is 0 there); 0 where nothing
    is to be gained."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(optimum > 0, (optimum - utility) / optimum, 0.0)


def play(pricer: Pricer, games: list[PricingGame], seed: int = 0) -> Play:
    """`pricer.horizon` prices on each game from a random first price, no exploration noise."""
    env = PricingEnv(pricer.draw, horizon=pricer.horizon, reward=pricer.reward, seed=seed, memory=pricer.memory)
    rng = np.random.default_rng(seed)
    states = env.reset(games)
    prices, utilities = [], []
    for _ in range(pricer.horizon):
        states, _, _ = env.step(pricer.act(states, rng))
        prices.append(env.prices)
        utilities.append(env.last)
    return Play(np.stack(prices, 1), np.stack(utilities, 1), env.optimum)


def train_pricer(kind: str, draw: GameDraw, env_steps: int, seed: int = 0, horizon: int = 10,
                 reward: str = "utility", gdm_settings=None, on_progress=None, progress_every: int = 0,
                 memory: bool = True) -> Pricer:
    """A pricer trained for `env_steps` environment steps (the random pricer needs none).
    on_progress(env_steps_so_far, pricer) every `progress_every` steps: learning curves."""
    if kind not in PRICERS:
        raise PricerError(f"unknown pricer {kind!r}; choose one of {', '.join(PRICERS)}")
    if reward not in REWARDS:
        raise PricerError(f"reward must be one of {', '.join(REWARDS)}, got {reward!r}")
    if not 0 <= env_steps <= MAX_TRAIN_STEPS:
        raise PricerError(f"training steps must be in [0, {MAX_TRAIN_STEPS:,}], got {env_steps}")
    pricer = Pricer(kind, draw, horizon, reward, env_steps, seed, memory=memory)
    if kind == "random":
        return pricer
    if kind == "gdm":
        from .gdm import GdmSettings, settings_dict, train_gdm
        settings = gdm_settings or GdmSettings()
        pricer.settings = settings_dict(settings)
        env = PricingEnv(draw, horizon=horizon, batch=GDM_EPISODES, reward=reward, seed=seed, memory=memory)

        def report(steps, training):
            on_progress(steps, Pricer(kind, draw, horizon, reward, steps, seed, pricer.settings, memory,
                                      training.actor))

        training = train_gdm(env, env_steps, settings, seed, report if on_progress else None, progress_every)
        pricer.model = training.actor
        return pricer
    from .ppo import ROLLOUT, train_ppo
    pricer.settings = {"library": "stable-baselines3", "rollout": ROLLOUT}

    def report(steps, model):
        on_progress(steps, Pricer(kind, draw, horizon, reward, steps, seed, pricer.settings, memory, model))

    pricer.model = train_ppo(draw, env_steps, horizon, reward, seed, report if on_progress else None, progress_every,
                             memory)
    return pricer


GDM_EPISODES = 8  # episodes the GDM plays side by side while it trains


def save_pricer(pricer: Pricer, directory) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"kind": pricer.kind, "draw": pricer.draw.settings(), "horizon": pricer.horizon, "reward": pricer.reward,
            "env_steps": pricer.env_steps, "seed": pricer.seed, "settings": pricer.settings, "memory": pricer.memory}
    if pricer.kind == "gdm":
        import torch
        torch.save(pricer.model.state_dict(), directory / "actor.pt")
    elif pricer.kind == "ppo":
        pricer.model.save(directory / "ppo.zip")
    (directory / PRICER_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def load_pricer(directory) -> Pricer:
    directory = Path(directory)
    try:
        meta = json.loads((directory / PRICER_FILE).read_text())
        draw = meta["draw"]
        weights = draw.get("weight_range")
        draw = GameDraw(devices=int(draw["devices"]), integer=bool(draw["integer"]), entry=tuple(draw["entry"]),
                        public=draw["public"], weight_range=tuple(weights) if weights is not None else None)
        pricer = Pricer(meta["kind"], draw, int(meta["horizon"]), meta["reward"], int(meta["env_steps"]),
                        int(meta["seed"]), dict(meta["settings"]), meta.get("memory", False))
        if not isinstance(pricer.memory, bool):
            raise ValueError(f"memory must be true or false, got {pricer.memory!r}")
        if pricer.kind not in PRICERS:
            raise ValueError(f"unknown pricer kind {pricer.kind!r}")
        if not 1 <= pricer.horizon <= MAX_HORIZON or pricer.reward not in REWARDS:
            raise ValueError(f"horizon must be 1..{MAX_HORIZON} and reward one of {', '.join(REWARDS)}")
    except OSError as err:
        raise PricerError(f"{directory}: not a pricer checkpoint ({err.strerror or err})") from None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as err:
        raise PricerError(f"{directory / PRICER_FILE}: unreadable ({type(err).__name__}: {str(err)[:200]})") from None
    try:
        if pricer.kind == "gdm":
            import torch

            from .gdm import DiffusionActor, GdmSettings
            actor = DiffusionActor(observation_size(draw.devices, pricer.memory), 1, GdmSettings(**pricer.settings))
            actor.load_state_dict(torch.load(directory / "actor.pt", weights_only=True))
            pricer.model = actor.eval()
        elif pricer.kind == "ppo":
            from .ppo import _require
            pricer.model = _require()[1].PPO.load(directory / "ppo.zip", device="cpu")
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as err:  # torch's mismatches are RuntimeErrors
        raise PricerError(f"{directory}: the {pricer.kind} weights do not load ({type(err).__name__}: "
                          f"{str(err)[:200]})") from None
    return pricer
