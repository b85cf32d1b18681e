"""PPO on the pricing environment, through stable-baselines3 (the optional extra
`pip install -e '.[rl]'`): [GenMEN]'s "DRL-PPO" baseline, with the library's default
hyperparameters except a shorter rollout, so that a budget of a few thousand steps still
makes a few dozen policy updates."""

from __future__ import annotations

import numpy as np

from .envs import GameDraw, PricingEnv

ROLLOUT = 256  # environment steps per PPO update (the library's default, 2048, is most of a short budget)


def _require():
    try:
        import gymnasium
        import stable_baselines3
    except ImportError:
        raise ImportError("the PPO pricer needs stable-baselines3: pip install -e '.[rl]'") from None
    return gymnasium, stable_baselines3


def make_gym(draw: GameDraw, horizon: int, reward: str, seed: int, memory: bool):
    """A gymnasium view of one PricingEnv episode at a time."""
    gymnasium, _ = _require()

    class PricingGym(gymnasium.Env):
        def __init__(self):
            self.env = PricingEnv(draw, horizon=horizon, batch=1, reward=reward, seed=seed, memory=memory)
            size = self.env.observation_size
            self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (size,), np.float32)
            self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.env.reset()[0], {}

        def step(self, action):
            states, rewards, done = self.env.step(np.asarray(action).reshape(1, 1))
            return states[0], float(rewards[0]), bool(done), False, {}

    return PricingGym()


def train_ppo(draw: GameDraw, env_steps: int, horizon: int, reward: str, seed: int, on_progress=None,
              progress_every: int = 0, memory: bool = True):
    """A trained stable-baselines3 PPO model; on_progress(env_steps_so_far, model) as it learns."""
    _, sb3 = _require()
    from stable_baselines3.common.callbacks import BaseCallback

    class Progress(BaseCallback):
        def __init__(self):
            super().__init__()
            self.next = progress_every

        def _on_step(self) -> bool:
            if on_progress is not None and progress_every and self.num_timesteps >= self.next:
                on_progress(self.num_timesteps, self.model)
                self.next += progress_every
            return True

    from .threads import one_thread
    with one_thread():
        return _learn(sb3, make_gym(draw, horizon, reward, seed, memory), env_steps, seed, Progress())


def _learn(sb3, env, env_steps, seed, callback):
    model = sb3.PPO("MlpPolicy", env, n_steps=ROLLOUT, batch_size=64, seed=seed,
                    device="cpu", verbose=0)
    model.learn(total_timesteps=env_steps, callback=callback)
    return model
