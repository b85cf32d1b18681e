"""[GenMEN]'s generative diffusion model (GDM) policy, in plain torch: an actor that makes an
action by denoising Gaussian noise conditioned on the state, trained against a double critic.

The paper gives no architecture; this follows the public code of the GDM tutorial it cites
([GDM tutorial], docs/references.md): a 6-step chain on a VP noise schedule, 256-wide Mish MLPs, a
min-of-two-Q critic, AdamW at 1e-4. One deliberate difference: the critic regresses the reward
itself (no bootstrapped next-state value, so no target networks). The leader's episodes are a
sequence of one-shot pricing decisions whose reward depends only on that price, so the value of
a state-action pair is its expected reward; bootstrapping would only add noise.

The actor is trained the paper's way, by back-propagating -min(Q1, Q2)(s, actor(s)) through
the whole denoising chain: back-propagation, not "denoising instead of back-propagation"
(the design note's erratum I.6-4).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .threads import one_thread


@dataclass(frozen=True)
class GdmSettings:
    denoising_steps: int = 6
    beta_min: float = 0.1
    beta_max: float = 10.0
    hidden: int = 256
    actor_lr: float = 1e-4
    critic_lr: float = 1e-4
    weight_decay: float = 1e-4
    batch: int = 512
    buffer: int = 1_000_000
    exploration: float = 0.1  # Gaussian noise on the actor's action while collecting episodes
    updates_per_step: int = 1  # gradient updates per step of the side-by-side episodes
    # the first share of the steps plays uniform random actions (TD3's start steps): where an
    # untrained critic's slope would drive every action to a corner of [-1, 1]^d, whose clip
    # stops the actor's gradient (measured on FIMI's time split); 0 for the pricing game
    random_start: float = 0.0

    def __post_init__(self):
        for name, most in LIMITS.items():
            value = getattr(self, name)
            least_ok = value >= 0 if name == "random_start" else value > 0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (least_ok and value <= most):
                raise ValueError(f"GDM setting {name} must be a number in {'[' if name == 'random_start' else '('}0, "
                                 f"{most:g}], got {value!r}")
            if isinstance(most, int) and not isinstance(value, int):
                raise ValueError(f"GDM setting {name} must be a whole number, got {value!r}")
        if self.beta_min >= self.beta_max:
            raise ValueError(f"beta_min must be below beta_max, got {self.beta_min} and {self.beta_max}")


# what a settings file may ask for: enough for any use here, small enough to build
LIMITS = {"denoising_steps": 100, "beta_min": 100.0, "beta_max": 100.0, "hidden": 1024, "actor_lr": 1.0,
          "critic_lr": 1.0, "weight_decay": 1.0, "batch": 65536, "buffer": 10_000_000, "exploration": 10.0,
          "updates_per_step": 100, "random_start": 1.0}


def vp_betas(steps: int, beta_min: float, beta_max: float) -> torch.Tensor:
    """GDMOPT's variance-preserving schedule, discretised to `steps` steps."""
    i = torch.arange(1, steps + 1, dtype=torch.float64)
    return (1 - torch.exp(-beta_min / steps - (beta_max - beta_min) * (2 * i - 1) / (2 * steps ** 2))).float()


class StepEmbedding(nn.Module):
    """Sinusoidal embedding of the denoising step, then a small MLP (16 -> 32 -> 16)."""

    def __init__(self, size: int = 16):
        super().__init__()
        self.size = size
        self.mlp = nn.Sequential(nn.Linear(size, 2 * size), nn.Mish(), nn.Linear(2 * size, size))

    def forward(self, step: torch.Tensor) -> torch.Tensor:
        half = self.size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        angles = step.float()[:, None] * freqs[None, :]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


class Denoiser(nn.Module):
    """eps(x_i, i, s): the noise in the action x_i at step i, given the state s."""

    def __init__(self, state_size: int, action_size: int, hidden: int):
        super().__init__()
        self.state = nn.Sequential(nn.Linear(state_size, hidden), nn.Mish(), nn.Linear(hidden, hidden), nn.Mish())
        self.step = StepEmbedding()
        self.trunk = nn.Sequential(nn.Linear(hidden + action_size + self.step.size, hidden), nn.Mish(),
                                   nn.Linear(hidden, hidden), nn.Mish(), nn.Linear(hidden, action_size))

    def forward(self, x: torch.Tensor, step: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.trunk(torch.cat([self.state(state), x, self.step(step)], dim=-1))


class DiffusionActor(nn.Module):
    """An action in [-1, 1]^d made by `denoising_steps` DDPM posterior steps from N(0, I),
    the predicted clean action clipped to [-1, 1] at every step."""

    def __init__(self, state_size: int, action_size: int, settings: GdmSettings):
        super().__init__()
        self.action_size = action_size
        self.denoiser = Denoiser(state_size, action_size, settings.hidden)
        betas = vp_betas(settings.denoising_steps, settings.beta_min, settings.beta_max)
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        previous = torch.cat([torch.ones(1), alpha_bar[:-1]])
        for name, value in {"alpha_bar": alpha_bar,
                            "x0_coef": betas * previous.sqrt() / (1 - alpha_bar),
                            "xt_coef": (1 - previous) * alphas.sqrt() / (1 - alpha_bar),
                            "sigma": (betas * (1 - previous) / (1 - alpha_bar)).clamp(min=1e-20).sqrt()}.items():
            self.register_buffer(name, value)

    def act(self, states: np.ndarray, seed: int) -> np.ndarray:
        """Actions for float32 state rows, denoised from the noise of `seed`, no gradients:
        what a trained actor is used for."""
        with torch.no_grad(), one_thread():
            return self(torch.from_numpy(np.asarray(states, dtype=np.float32)),
                        torch.Generator().manual_seed(seed)).numpy()

    def forward(self, state: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        batch = state.shape[0]
        x = torch.randn(batch, self.action_size, generator=generator)
        for i in reversed(range(len(self.alpha_bar))):
            step = torch.full((batch,), i)
            eps = self.denoiser(x, step, state)
            x0 = ((x - (1 - self.alpha_bar[i]).sqrt() * eps) / self.alpha_bar[i].sqrt()).clamp(-1, 1)
            x = self.x0_coef[i] * x0 + self.xt_coef[i] * x
            if i > 0:
                x = x + self.sigma[i] * torch.randn(batch, self.action_size, generator=generator)
        return x.clamp(-1, 1)


class DoubleCritic(nn.Module):
    """Two Q heads on a shared state encoder; the actor maximises their minimum, which keeps it
    from chasing one head's overestimate."""

    def __init__(self, state_size: int, action_size: int, hidden: int):
        super().__init__()
        self.state = nn.Sequential(nn.Linear(state_size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden + action_size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 1)) for _ in range(2))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.cat([self.state(state), action], dim=-1)
        return self.heads[0](features)[:, 0], self.heads[1](features)[:, 0]


class ReplayBuffer:
    """(state, action, reward) rows, oldest overwritten first."""

    def __init__(self, size: int, state_size: int, action_size: int):
        self.states = np.zeros((size, state_size), np.float32)
        self.actions = np.zeros((size, action_size), np.float32)
        self.rewards = np.zeros(size, np.float32)
        self.count = 0

    def add(self, states, actions, rewards) -> None:
        for s, a, r in zip(states, actions, rewards):
            i = self.count % len(self.rewards)
            self.states[i], self.actions[i], self.rewards[i] = s, a, r
            self.count += 1

    def sample(self, batch: int, rng: np.random.Generator):
        rows = rng.integers(0, min(self.count, len(self.rewards)), batch)
        return (torch.from_numpy(self.states[rows]), torch.from_numpy(self.actions[rows]),
                torch.from_numpy(self.rewards[rows]))


@dataclass
class Training:
    """A trained actor and critic, and what the training saw."""
    actor: DiffusionActor
    critic: DoubleCritic
    settings: GdmSettings
    env_steps: int
    updates: int


def train_gdm(env, env_steps: int, settings: GdmSettings = GdmSettings(), seed: int = 0,
              on_progress=None, progress_every: int = 0) -> Training:
    """Train on `env` (reset() -> states; step(actions) -> states, rewards, done; its
    observation_size and action_size) for `env_steps` steps summed over its side-by-side
    episodes. on_progress(env_steps_so_far, training) every `progress_every` steps."""
    with one_thread():
        return _train(env, env_steps, settings, seed, on_progress, progress_every)


def _train(env, env_steps, settings, seed, on_progress, progress_every) -> Training:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    actor = DiffusionActor(env.observation_size, env.action_size, settings)
    critic = DoubleCritic(env.observation_size, env.action_size, settings.hidden)
    actor_opt = torch.optim.AdamW(actor.parameters(), lr=settings.actor_lr, weight_decay=settings.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=settings.critic_lr, weight_decay=settings.weight_decay)
    buffer = ReplayBuffer(min(settings.buffer, env_steps), env.observation_size, env.action_size)
    training = Training(actor, critic, settings, 0, 0)
    noise = torch.Generator().manual_seed(seed)
    states = env.reset()
    next_report = progress_every
    while training.env_steps < env_steps:
        if training.env_steps < settings.random_start * env_steps:
            actions = rng.uniform(-1.0, 1.0, (len(states), env.action_size)).astype(np.float32)
        else:
            with torch.no_grad():
                actions = actor(torch.from_numpy(states), noise)
                actions = (actions + settings.exploration * torch.randn(actions.shape, generator=noise)).clamp(-1, 1)
            actions = actions.numpy()
        following, rewards, done = env.step(actions)
        buffer.add(states, actions, rewards)
        training.env_steps += len(states)
        states = env.reset() if done else following
        for _ in range(settings.updates_per_step):
            s, a, r = buffer.sample(settings.batch, rng)
            q1, q2 = critic(s, a)
            critic_loss = (q1 - r).pow(2).mean() + (q2 - r).pow(2).mean()
            critic_opt.zero_grad()
            critic_loss.backward()
            critic_opt.step()
            actor_loss = -torch.minimum(*critic(s, actor(s, noise))).mean()
            actor_opt.zero_grad()
            actor_loss.backward()
            actor_opt.step()
            training.updates += 1
        if on_progress is not None and progress_every and training.env_steps >= next_report:
            on_progress(training.env_steps, training)
            next_report += progress_every
    return training


def settings_dict(settings: GdmSettings) -> dict:
    return asdict(settings)
