"""A node trains on its own files (`data-dir` node config): the loader's two layouts, every
bad input's message, and the ClientApp's query (a profile, or a sit-out note) and train."""

import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from PIL import Image

from fedfill import contract
from fedfill.config import RunConfig
from fedfill.data import NodeDataError, load_node_data
from jobs import load_job

DIGITS = tuple(str(c) for c in range(10))
GREY_8 = (8, 8, 1)


def write_pngs(folder, per_class: dict[str, int], size=(8, 8), mode="L", seed=0):
    """`n` random PNGs in folder/<class>/ for each class; returns the arrays written, by class."""
    rng = np.random.default_rng(seed)
    written = {}
    for name, n in per_class.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        shape = (size[0], size[1]) if mode == "L" else (size[0], size[1], 3)
        written[name] = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]
        for i, pixels in enumerate(written[name]):
            Image.fromarray(pixels).save(folder / name / f"img_{i}.png")
    return written


# ---------------------------------------------------------------- folder layout

def test_class_folders_give_the_files_exact_pixels_and_labels(tmp_path):
    written = write_pngs(tmp_path, {"3": 2, "7": 3})
    (tmp_path / "README.txt").write_text("beside the class folders: ignored")
    ds = load_node_data(tmp_path, DIGITS, GREY_8)
    assert ds.images.dtype == np.uint8 and ds.images.shape == (5, 8, 8, 1)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [3, 3, 7, 7, 7]
    assert ds.class_names == DIGITS
    assert ds.class_counts().tolist() == [0, 0, 0, 2, 0, 0, 0, 3, 0, 0]
    np.testing.assert_array_equal(ds.images[2, ..., 0], written["7"][0])  # sorted by file name, lossless


def test_class_folders_resize_and_convert_colour_to_the_jobs_grey(tmp_path):
    write_pngs(tmp_path, {"1": 2}, size=(20, 30), mode="RGB")
    ds = load_node_data(tmp_path, DIGITS, GREY_8)
    assert ds.images.shape == (2, 8, 8, 1)
    # the same as Pillow's own grey conversion and resize of the file
    with Image.open(tmp_path / "1" / "img_0.png") as img:
        expected = np.asarray(img.convert("L").resize((8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(ds.images[0, ..., 0], expected)


def test_class_folders_convert_grey_to_a_colour_jobs_rgb_at_its_height_and_width(tmp_path):
    write_pngs(tmp_path, {"b": 1}, size=(5, 5), mode="L")
    ds = load_node_data(tmp_path, ("a", "b"), (6, 4, 3))
    assert ds.images.shape == (1, 6, 4, 3) and ds.labels.tolist() == [1]
    assert (ds.images[..., 0] == ds.images[..., 1]).all() and (ds.images[..., 1] == ds.images[..., 2]).all()


# ---------------------------------------------------------------- npz layout

def test_npz_with_the_jobs_shape_is_taken_as_it_is(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", images=images, labels=np.array([0, 9, 9, 2], np.int32))
    ds = load_node_data(tmp_path / "mine.npz", DIGITS, GREY_8)
    np.testing.assert_array_equal(ds.images, images)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 9, 9, 2]


def test_npz_of_grey_hxw_or_other_sizes_is_fitted_like_the_files(tmp_path):
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", images=grey, labels=np.array([1, 2, 3]))
    np.testing.assert_array_equal(load_node_data(tmp_path / "grey.npz", DIGITS, GREY_8).images, grey[..., None])

    colour = rng.integers(0, 256, (2, 16, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "colour.npz", images=colour, labels=np.array([4, 5], np.uint8))
    ds = load_node_data(tmp_path / "colour.npz", DIGITS, GREY_8)
    assert ds.images.shape == (2, 8, 8, 1) and ds.labels.tolist() == [4, 5]
    expected = np.asarray(Image.fromarray(colour[1]).convert("L").resize((8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(ds.images[1, ..., 0], expected)


# ---------------------------------------------------------------- bad input

def bad_npz(tmp_path, name="bad.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_a_missing_empty_or_foreign_data_dir_is_refused_by_name(tmp_path):
    with pytest.raises(NodeDataError, match=f"{tmp_path / 'nowhere'}: no such file or folder"):
        load_node_data(tmp_path / "nowhere", DIGITS, GREY_8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NodeDataError, match=r"empty: no class folders; expected one subfolder per class named 0, 1"):
        load_node_data(tmp_path / "empty", DIGITS, GREY_8)
    (tmp_path / "hollow" / "3").mkdir(parents=True)
    with pytest.raises(NodeDataError, match="hollow: the class folders hold no images"):
        load_node_data(tmp_path / "hollow", DIGITS, GREY_8)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NodeDataError, match="notes.txt: expected a folder with one subfolder per class or an .npz"):
        load_node_data(tmp_path / "notes.txt", DIGITS, GREY_8)


def test_a_class_the_job_does_not_know_is_refused(tmp_path):
    write_pngs(tmp_path, {"3": 1, "cat": 1})
    with pytest.raises(NodeDataError, match=r"cat: the job has no class 'cat'; its classes are 0, 1, 2"):
        load_node_data(tmp_path, DIGITS, GREY_8)


def test_an_unreadable_image_is_refused_by_its_file_name(tmp_path):
    write_pngs(tmp_path, {"3": 1})
    (tmp_path / "3" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(NodeDataError, match=r"broken.png: unreadable image"):
        load_node_data(tmp_path, DIGITS, GREY_8)


def test_malformed_npz_files_are_refused_with_what_is_wrong(tmp_path):
    images = np.zeros((2, 8, 8, 1), np.uint8)
    cases = [
        (bad_npz(tmp_path, "label12.npz", images=images, labels=np.array([0, 12])),
         "label12.npz: label 12 is no class of the job \\(0..9\\)"),
        (bad_npz(tmp_path, "negative.npz", images=images, labels=np.array([-1, 0])),
         "negative.npz: label -1 is no class"),
        (bad_npz(tmp_path, "nolabels.npz", images=images),
         "nolabels.npz: expected arrays 'images' and 'labels', missing labels"),
        (bad_npz(tmp_path, "floats.npz", images=images.astype(np.float32), labels=np.array([0, 1])),
         "floats.npz: 'images' must be uint8"),
        (bad_npz(tmp_path, "fourchannels.npz", images=np.zeros((2, 8, 8, 4), np.uint8), labels=np.array([0, 1])),
         "fourchannels.npz: 'images' must be uint8 \\[N, H, W, C\\] with C 1 or 3"),
        (bad_npz(tmp_path, "short.npz", images=images, labels=np.array([0])),
         "short.npz: 'labels' must be 2 integers"),
        (bad_npz(tmp_path, "floatlabels.npz", images=images, labels=np.array([0.0, 1.0])),
         "floatlabels.npz: 'labels' must be 2 integers"),
        (bad_npz(tmp_path, "none.npz", images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, int)),
         "none.npz: no images"),
        (bad_npz(tmp_path, "objects.npz", images=np.array([{"a": 1}], dtype=object), labels=np.array([0])),
         "objects.npz: unreadable npz"),  # object arrays need pickle: never loaded
    ]
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    cases.append((tmp_path / "garbage.npz", "garbage.npz: unreadable npz"))
    np.save(tmp_path / "bare.npy", images)
    (tmp_path / "bare.npy").rename(tmp_path / "bare.npz")
    cases.append((tmp_path / "bare.npz", "bare.npz: not an npz archive"))
    for path, message in cases:
        with pytest.raises(NodeDataError, match=message):
            load_node_data(path, DIGITS, GREY_8)


# ---------------------------------------------------------------- the ClientApp on a data-dir

RUN = RunConfig(local_epochs=1)


def context_for(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=RUN.to_run_config())


def test_the_job_reads_a_node_data_dir_once_per_process(tmp_path):
    write_pngs(tmp_path, {"0": 2})
    job = load_job(RUN)
    first = job.own_data(str(tmp_path))
    assert len(first) == 2 and first.images.shape[1:] == GREY_8  # digits' shape and classes
    write_pngs(tmp_path, {"1": 1})  # a warm process keeps what it read
    assert job.own_data(str(tmp_path)) is first


def test_query_reports_only_the_number_of_the_nodes_own_files(tmp_path, inside_a_flower_run):
    from client.app import query

    write_pngs(tmp_path, {"2": 3, "5": 4})
    request = Message(RecordDict({}), message_type=MessageType.QUERY, dst_node_id=7)
    reply = query(request, context_for({"data-dir": str(tmp_path), "partition-id": 0, "num-partitions": 10}))
    profile = contract.read_profile(reply.content)
    assert profile["d_loc"] == 7
    assert not any("count" in key or "hist" in key for key in profile), "the class histogram stays on the node"


def test_query_on_a_bad_data_dir_sits_the_run_out_with_the_reason(tmp_path, inside_a_flower_run, caplog):
    from client.app import query

    write_pngs(tmp_path, {"cat": 1})
    request = Message(RecordDict({}), message_type=MessageType.QUERY, dst_node_id=7)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        reply = query(request, context_for({"data-dir": str(tmp_path)}))
    assert any(r.levelno == logging.WARNING and "sits the run out" in r.getMessage() and "cat" in r.getMessage()
               for r in caplog.records), "the node logs why it sits out"
    assert contract.PROFILE_KEY not in reply.content.config_records
    with pytest.raises(contract.ReplyError, match=r"the node sits out: .*cat: the job has no class 'cat'"):
        contract.read_profile(reply.content)


def test_train_on_a_data_dir_uses_exactly_the_nodes_files(tmp_path, inside_a_flower_run):
    from client.app import train

    write_pngs(tmp_path, {"4": 3, "8": 2})
    job = load_job(RUN)
    plan = contract.NodePlan(server_round=1, policy="fimi", d_gen=0, f_hz=1e9, b_hz=1e6, p_w=0.1, eta=0.5,
                             bits=32, t_cmp_s=1.0, t_com_s=1.0, e_cmp_j=0.1, e_com_j=0.1)
    content = contract.train_message_content(ArrayRecord(job.initial_weights()), plan, ConfigRecord({}))
    request = Message(content, message_type=MessageType.TRAIN, dst_node_id=7)
    reply = train(request, context_for({"data-dir": str(tmp_path)}))
    _, metrics, _ = contract.read_train_reply(reply.content)
    assert metrics["num-examples"] == 5 and metrics["d-gen-used"] == 0

    (tmp_path / "4" / "img_0.png").write_bytes(b"gone bad")  # unusable in a fresh process: train raises
    from jobs import _own_data
    _own_data.cache_clear()
    with pytest.raises(NodeDataError, match="img_0.png: unreadable image"):
        train(request, context_for({"data-dir": str(tmp_path)}))
