"""The classifier job through the Job interface, as the ServerApp and ClientApp use it."""

import numpy as np
import pytest

from fedfill.config import RunConfig
from jobs import Job, load_job, run_split


def test_the_classifier_job_does_what_the_apps_ask_of_a_job():
    # Near-IID shares and a few epochs, so that one device's training must help on the test set.
    run = RunConfig(num_partitions=3, seed=1, dirichlet_alpha=100.0, local_epochs=3)
    job = load_job(run)
    assert isinstance(job, Job) and job.metrics[0] == "accuracy"
    weights = job.initial_weights()
    assert all(np.array_equal(a, b) for a, b in zip(weights, load_job(run).initial_weights())), "same seed, same model"
    parts = [job.node_data(k, 3) for k in range(3)]
    assert sum(len(p) for p in parts) == len(run_split(run).clients)
    data = parts[0]
    result = job.train(weights, data.images, data.labels, seed=5)
    assert np.isfinite(result.loss) and any(not np.array_equal(a, b) for a, b in zip(result.weights, weights))
    assert 0 < result.seconds < 60, "the training time, measured by the job"
    again = job.train(weights, data.images, data.labels, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(result.weights, again.weights)), "same seed, same update"
    before, after = job.evaluate(weights), job.evaluate(result.weights)
    assert set(before) == set(job.metrics) and 0 <= after["accuracy"] <= 1 and after["loss"] < before["loss"]


def test_an_unknown_job_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown job 'gan'"):
        load_job(RunConfig(job="gan"))
