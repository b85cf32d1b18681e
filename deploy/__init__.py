"""Deployments: starting and stopping a run's processes on one machine (local.py), the
container testbed (testbed.py, image.py, shaper.py, pki.py) and what one edge board needs
(bundle.py). The commands that drive them live in commands/."""
