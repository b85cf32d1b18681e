import numpy as np
import pytest
import torch

from fedfill import codec
from fedfill.data import load_digits, split_dataset
from fedfill.models import (CONV_CHANNELS, FC_UNITS, VGG9, accuracy, count_parameters, get_weights,
                           model_for_images, set_weights, train)


def conv_params(c_in, c_out):
    return c_in * c_out * 9 + c_out


def fc_params(n_in, n_out):
    return n_in * n_out + n_out


def expected_vgg9_parameters(in_channels, image_size, num_classes, width):
    """Independent count of FedMA's ModerateCNN layer by layer."""
    convs = [max(1, round(c * width)) for c in CONV_CHANNELS]
    hidden = [max(1, round(u * width)) for u in FC_UNITS]
    total = sum(conv_params(a, b) for a, b in zip([in_channels] + convs[:-1], convs))
    flat = convs[-1] * (image_size // 8) ** 2
    return total + fc_params(flat, hidden[0]) + fc_params(hidden[0], hidden[1]) + fc_params(hidden[1], num_classes)


def test_vgg9_has_fimi_parameter_count():
    # [FIMI §V-A] / FedMA: 3,491,530 parameters for 3x32x32 inputs and 10 classes.
    assert count_parameters(VGG9()) == 3_491_530


@pytest.mark.parametrize("shape,classes,width", [((1, 8, 8, 1), 10, None), ((1, 28, 28, 1), 10, None),
                                                 ((1, 32, 32, 3), 43, None), ((1, 32, 32, 3), 10, 0.5)])
def test_variants_match_layer_by_layer_count_and_run(shape, classes, width):
    model = model_for_images(shape, classes, width)
    used_width = width if width is not None else (0.25 if shape[1] < 16 else 0.5 if shape[1] < 32 else 1.0)
    assert count_parameters(model) == expected_vgg9_parameters(shape[3], shape[1], classes, used_width)
    out = model(torch.zeros(2, shape[3], shape[1], shape[2]))
    assert out.shape == (2, classes)


def test_vgg9_layout_matches_moderate_cnn():
    model = VGG9()
    kinds = [type(m).__name__ for m in model.conv_layer]
    assert kinds == ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "Conv2d", "ReLU",
                     "MaxPool2d", "Dropout2d", "Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d"]
    assert not any("Norm" in type(m).__name__ for m in model.modules())
    assert [m.out_channels for m in model.conv_layer if isinstance(m, torch.nn.Conv2d)] == list(CONV_CHANNELS)


def test_weights_round_trip_between_models():
    torch.manual_seed(0)
    a, b = VGG9(1, 8, 10, 0.25), VGG9(1, 8, 10, 0.25)
    weights = get_weights(a)
    assert all(w.dtype == np.float32 for w in weights)
    assert sum(w.size for w in weights) == count_parameters(a)
    set_weights(b, weights)
    x = torch.randn(3, 1, 8, 8)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
    weights[0] += 1.0  # get_weights hands out copies
    assert not np.array_equal(get_weights(a)[0], weights[0])


def test_set_weights_rejects_wrong_count_and_shape():
    model = VGG9(1, 8, 10, 0.25)
    weights = get_weights(model)
    with pytest.raises(ValueError, match="arrays"):
        set_weights(model, weights[:-1])
    with pytest.raises(ValueError, match="expects"):
        set_weights(model, weights[:-1] + [np.zeros(3, np.float32)])


def test_weights_survive_the_codec():
    model = VGG9(1, 8, 10, 0.25)
    weights = get_weights(model)
    decoded = codec.decode(codec.encode(weights, 32, np.random.default_rng(0)), [w.shape for w in weights])
    set_weights(model, decoded)
    assert all(np.array_equal(a, b) for a, b in zip(weights, get_weights(model)))


@pytest.fixture
def one_torch_thread():
    """Tiny convolutions run fastest on one thread; two threads on a shared 2-core box thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_digits_variant_learns_the_public_split(one_torch_thread):
    """A few hundred SGD steps at FIMI's lr 0.02 beat chance by far: the model trains."""
    torch.manual_seed(0)
    split = split_dataset(load_digits())
    model = model_for_images(split.public.images.shape, 10)
    train(model, split.public.images, split.public.labels, lr=0.02, batch_size=32, min_steps=200, seed=0)
    assert accuracy(model, split.test.images, split.test.labels) > 0.7


def test_codec_bench_uses_the_real_vgg9_shapes():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_codec.py"
    spec = importlib.util.spec_from_file_location("bench_codec", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.VGG9_SHAPES == [w.shape for w in get_weights(VGG9())]
