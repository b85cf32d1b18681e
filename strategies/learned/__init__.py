"""Learned solvers: [GenMEN]'s GDM policy, PPO and a random price for the pricing game
(pricers.py, on the environment of envs.py), and the GDM as a search for FIMI's time split.

This package imports torch (and, for PPO, stable-baselines3); `strategies.allocation` never
imports it, so the solvers stay numpy-only and these stay optional.
"""
