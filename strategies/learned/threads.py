"""The learned solvers' networks are small; torch's thread pool only hurts them."""

from contextlib import contextmanager

import torch


@contextmanager
def one_thread():
    """Run torch on one thread: these 256-wide networks gain nothing from more, and with
    other work on the cores (a test worker, a federated run) two threads each were seen to
    run seven times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
