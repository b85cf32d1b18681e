"""The Flower ServerApp: run config -> strategy, central evaluation, checkpoints, reports."""
