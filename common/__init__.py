"""Pieces shared by the server, the clients and the generation service: data, models, codec, CLI."""
