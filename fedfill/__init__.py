"""fedfill's shared core: run settings, data, models, the upload codec and the message
contract that the server, the clients, the strategies, the jobs and the generator build on.
It knows no role: nothing here imports another package of fedfill's, except that cli.py names
the commands/ modules as strings (docs/architecture.md, the layer rule)."""

__version__ = "0.1.0"
