import json
import math

import numpy as np
import pytest
import torch

from fedfill.cli import main
from strategies.allocation.learning import LearningModel, shipped_fit


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # fit-learning sets its own thread count


def test_fit_learning_writes_a_valid_fit_and_plot(tmp_path, capsys, restore_torch_threads):
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    code = main(["fit-learning", "--sizes", "10", "20", "40", "80", "--seeds", "1", "--steps", "5",
                 "-o", str(out), "--plot", str(png)])
    assert code == 0
    data = json.loads(out.read_text())
    fit = LearningModel.load(out)
    assert set(data) == {"alpha", "beta", "gamma", "samples", "errors", "residuals", "source"}
    assert fit.samples == [10.0, 20.0, 40.0, 80.0]
    assert all(0 <= e <= 1 for e in fit.errors)
    assert all(math.isfinite(r) for r in fit.residuals)
    assert np.allclose(fit.residuals, np.array(fit.errors) - fit.error(fit.samples))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "delta(D) =" in printed and "residual" in printed


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "10", "20", "30"], "at least 4"),
    (["--sizes", "10", "20", "30", "100000"], "public training part"),
    (["--sizes", "10", "x", "30", "40"], "integers"),
    (["--seeds", "0"], "--seeds"),
    (["--holdout", "1.5"], "--holdout"),
    (["--dataset", "cifar10"], "root"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert main(["fit-learning", "-o", str(tmp_path / "f.json")] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "f.json").exists()


@pytest.mark.parametrize("dataset", ["digits", "mnist5k"])
def test_stored_fits_are_consistent(dataset):
    """The committed fits that the FIMI job reads: residuals match their own parameters, and the
    error each predicts falls with more data over the measured range."""
    fit = shipped_fit(dataset)
    samples = np.array(fit.samples)
    assert len(np.unique(samples)) >= 4 and fit.beta > 0
    assert np.allclose(fit.residuals, np.array(fit.errors) - fit.error(samples))
    assert np.all(np.diff(fit.error(np.sort(samples))) < 0)
    assert np.sqrt(np.mean(np.square(fit.residuals))) < 0.05


def test_common_modules_other_than_models_do_not_import_torch():
    """`fedfill plan` and the server's data handling must stay light: torch loads only on use."""
    import subprocess
    import sys

    code = ("import sys, fedfill.data, fedfill.partition, fedfill.codec, commands.fit_learning; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
