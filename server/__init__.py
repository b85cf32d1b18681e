"""The Flower ServerApp and only what its process imports: run config -> strategy, central
evaluation, checkpoints, the report. The operator's commands that start it are in commands/."""
