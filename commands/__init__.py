"""The operator's commands: `fedfill run`, `compare`, `reproduce`, `plan`, `generator`, `testbed`, ...

They run on the user's machine, never inside a Flower app, and nothing imports them:
`fedfill/cli.py` names each by its module path. Each module has `add_arguments(parser)` and
`run(args) -> int`.
"""
