"""Deployments: the local process testbed (and, later, containers, namespaces, boards)."""
