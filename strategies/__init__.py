"""Flower strategies (the glue) and, in `strategies.allocation`, the solvers they call.

Importing this package imports nothing from Flower or torch: the solvers must stay usable
(and testable) on their own.
"""
