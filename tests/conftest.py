import sys
from pathlib import Path

import pytest

# Tests import the project's packages from the checkout, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def inside_a_flower_run():
    """Messages carry the run's identity; a ServerApp process has it set by Flower."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
