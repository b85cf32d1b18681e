"""Hostile inputs at every parser of untrusted bytes (issue 13, item 1): property tests with
hypothesis, one regression test per bug the fuzzing found, and bench/fuzz_inputs.py's own
harness at a small count. The rule everywhere: a refusal is the entry point's own error with
a reason, never another exception, a numpy warning, a hang or an allocation the input's bytes
do not pay for."""

from __future__ import annotations

import json
import struct
import sys
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedfill import codec, contract
from server.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from strategies.allocation.presets import drawn_device_profile, fimi_scenario
from strategies.allocation.scenario import ScenarioError, load_scenario, parse_scenario, parse_scenario_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fuzz_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("inside_a_flower_run")  # tests/conftest.py: messages need a run id
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                              HealthCheck.function_scoped_fixture])


def strict(function, *args):
    """Call with numpy's RuntimeWarnings turned errors (an overflow is a crash, not a reason)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return function(*args)


def peak_bytes(function, *args) -> int:
    tracemalloc.start()
    try:
        function(*args)
    except ValueError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# ---------------------------------------------------------------------------- codec.decode

def crafted(dtype=0, bits=8, ndim=1, dims=(1, 0, 0, 0, 0, 0), lo=0.0, hi=1.0, count=1, body=b"") -> bytes:
    return fuzz_inputs._header(dtype, bits, ndim, dims, lo, hi, count, body)


def test_a_header_claiming_a_trillion_elements_is_refused_before_anything_is_allocated():
    payload = crafted(ndim=2, dims=(10**6, 10**6, 0, 0, 0, 0))
    with pytest.raises(ValueError, match=r"needs 1000000000000 bytes of data, only 0 left"):
        codec.decode(payload)
    assert peak_bytes(codec.decode, payload) < 100_000


@pytest.mark.parametrize("dims", [(2**32 - 1,) * 6, (2**31, 2**31, 4, 0, 0, 0), (2**31, 2**32 - 1, 0, 0, 0, 0)])
def test_a_shape_whose_product_wraps_int64_is_refused_by_its_true_size(dims):
    """np.prod in int64 wrapped these to 0 or a negative count (numpy's reshape then failed by luck)."""
    ndim = sum(1 for d in dims if d)
    with pytest.raises(ValueError, match=r"needs \d+ bytes of data"):
        strict(codec.decode, crafted(bits=2, ndim=ndim, dims=dims))


def test_an_empty_shape_numpy_cannot_make_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="larger than any array can be"):
        codec.decode(crafted(ndim=6, dims=(0,) + (2**32 - 1,) * 5))


@pytest.mark.parametrize("payload", [crafted(dtype=2, hi=1e30, body=b"\x7f"),
                                     crafted(dtype=2, bits=32, hi=0.0, body=struct.pack(">f", 1e30))])
def test_float16_values_beyond_its_range_are_refused_not_cast_to_inf(payload):
    with pytest.raises(ValueError, match="beyond the range of float16"):
        strict(codec.decode, payload)


@pytest.mark.parametrize("payload", ["text", None, [1, 2]])
def test_a_payload_that_is_not_bytes_is_refused(payload):
    with pytest.raises(ValueError, match="a codec payload is bytes"):
        codec.decode(payload)


def test_a_count_the_payload_cannot_hold_is_refused_at_once():
    with pytest.raises(ValueError, match="cannot hold their headers"):
        codec.decode(crafted(count=2**32 - 1))


@PROPERTY
@given(st.binary(max_size=300), st.booleans())
def test_decode_refuses_any_bytes_with_a_reason(data, with_header):
    payload = fuzz_inputs.fix_crc(codec.MAGIC + bytes([codec.VERSION]) + bytes(11) + data) if with_header else data
    try:
        out = strict(codec.decode, payload)
    except ValueError as err:
        assert str(err)
    else:
        assert all(np.all(np.isfinite(a)) for a in out)


@PROPERTY
@given(dtype=st.integers(0, 3), bits=st.integers(0, 40), ndim=st.integers(0, 7),
       dims=st.lists(st.sampled_from([0, 1, 2, 3, 255, 2**16, 2**31, 2**32 - 1]), min_size=6, max_size=6),
       lo=st.floats(width=32), hi=st.floats(width=32), body=st.binary(max_size=64))
def test_decode_refuses_any_tensor_header_with_a_reason(dtype, bits, ndim, dims, lo, hi, body):
    try:
        out = strict(codec.decode, crafted(dtype, bits, ndim, tuple(dims), lo, hi, 1, body))
    except ValueError as err:
        assert str(err)
    else:
        assert len(out) == 1 and out[0].shape == tuple(dims[:ndim]) and np.all(np.isfinite(out[0]))


# ---------------------------------------------------------------------------- scenario JSON

def test_an_integer_beyond_float_range_is_a_scenario_error():
    data = fimi_scenario(2, 0).to_json()
    data["system"]["tau"] = 10**400
    with pytest.raises(ScenarioError, match=r"system.tau must be finite, got an integer of 401 digits"):
        parse_scenario(data)


def test_class_counts_summing_beyond_float_range_are_refused_without_a_numpy_overflow():
    data = fimi_scenario(2, 0).to_json()
    for device in data["devices"]:
        device["class_counts"], device["d_loc"] = [1e308, 1e308], 1e12  # each count finite, their sum not
    with pytest.raises(ScenarioError, match="class_counts sum to inf"):
        strict(parse_scenario, data)


@pytest.mark.parametrize("text,reason", [("[" * 100_000, "nested too deeply"),
                                         ('{"system": ' + "1" * 5000 + "}", "not usable JSON"),
                                         ("{", "not valid JSON")])
def test_broken_scenario_text_is_a_scenario_error(text, reason, tmp_path):
    with pytest.raises(ScenarioError, match=reason):
        parse_scenario_text(text)
    (tmp_path / "s.json").write_text(text)
    with pytest.raises(ScenarioError, match=reason):
        load_scenario(tmp_path / "s.json")


def test_a_scenario_file_that_is_not_utf8_is_a_scenario_error(tmp_path):
    (tmp_path / "s.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ScenarioError, match="not UTF-8 text"):
        load_scenario(tmp_path / "s.json")


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=8)


@PROPERTY
@given(system_field=st.sampled_from(["tau", "alpha", "delta_max", "rounds", "gamma", "absent"]),
       device_field=st.sampled_from(["id", "d_loc", "gain", "bits", "quant_error", "codec_constant",
                                     "class_counts", "absent"]),
       value=JSON_VALUES, drop=st.booleans())
def test_parse_scenario_refuses_any_field_value_with_a_reason(system_field, device_field, value, drop):
    data = fimi_scenario(2, 0).to_json()
    if system_field != "absent":
        data["system"][system_field] = value
    if device_field != "absent":
        if drop:
            data["devices"][1].pop(device_field, None)
        else:
            data["devices"][1][device_field] = value
    try:
        strict(parse_scenario, data)
    except ScenarioError as err:
        assert str(err)


@PROPERTY
@given(st.text(max_size=200))
def test_parse_scenario_text_refuses_any_text_with_a_reason(text):
    try:
        parse_scenario_text(text)
    except ScenarioError as err:
        assert str(err)


# ---------------------------------------------------------------------------- the QUERY profile

def a_profile(**changes) -> dict:
    profile = {"d_loc": 120.0, **drawn_device_profile("fimi", 1, 4, 0), "partition_id": 1}
    profile.update(changes)
    return {k: v for k, v in profile.items() if v is not None}


def plans(profile: dict) -> None:
    """What the strategy does with an accepted profile (FimiFedAvg._scenario's call)."""
    parse_scenario({"system": fimi_scenario(1, 0).to_json()["system"], "devices": [{**profile, "id": "1"}]})


@pytest.mark.parametrize("change,reason", [
    (dict(f_max_hz=float("nan")), "'f_max_hz' must be finite"), (dict(d_loc=None), "missing field 'd_loc'"),
    (dict(gain=-1.0), "'gain' must be positive"), (dict(eps="fast"), "'eps' must be a number"),
    (dict(bits=1), "'bits' must be an integer from 2 to 32"), (dict(bits=8.0), "'bits' must be an integer"),
    (dict(quant_error=1.0), "'quant_error'.* must be at most"), (dict(codec_constant=0.0), "must be positive"),
    (dict(board_name=b"\x00"), "'board_name' holds bytes"), (dict(partition_id=1.5), "whole number"),
])
def test_a_broken_profile_is_refused_with_the_field_at_fault(change, reason):
    """Before: read_profile returned any dict, and the first plan raised for the whole run."""
    with pytest.raises(contract.ReplyError, match=reason):
        contract.read_profile(RecordDict({contract.PROFILE_KEY: ConfigRecord(a_profile(**change))}))


PROFILE_VALUES = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=6)
                  | st.binary(max_size=4) | st.lists(st.integers(-5, 5), min_size=1, max_size=3))


@PROPERTY
@given(st.dictionaries(st.sampled_from(["d_loc", "f_max_hz", "eps", "p_max_w", "gain", "bits", "quant_error",
                                        "codec_constant", "partition_id", "board_x"]), PROFILE_VALUES, max_size=6))
def test_a_profile_read_is_one_the_planner_accepts_and_json_can_write(changes):
    from server.app import accept_profile

    try:
        profile = accept_profile(RecordDict({contract.PROFILE_KEY: ConfigRecord(a_profile(**changes))}))
    except contract.ReplyError as err:
        assert str(err)
        return
    plans(profile)
    json.dumps(profile)


# ---------------------------------------------------------------------------- the TRAIN reply

def a_reply(note="trained", **metrics) -> RecordDict:
    payload = codec.encode([np.ones(3, np.float32)], 8, np.random.default_rng(0))
    record = dict(contract.TrainMetrics(50, 10, 0.5, 1.0, len(payload), 0.1, 8).to_record())
    record.update(metrics)
    record = {k: v for k, v in record.items() if v is not None}
    array = Array(dtype="uint8", shape=(len(payload),), stype=contract.CODEC_STYPE, data=payload)
    return RecordDict({contract.UPDATE_KEY: ArrayRecord({"payload": array}), contract.METRICS_KEY: MetricRecord(record),
                       contract.NOTE_KEY: ConfigRecord({"note": note})})


@pytest.mark.parametrize("metrics,reason", [
    ({"train-seconds": None}, "metric 'train-seconds' missing"), ({"train-loss": float("nan")}, "must be finite"),
    ({"num-examples": 1e308}, "must be at most"), ({"num-examples": 2.5}, "whole number"),
    ({"bits": 40}, "'bits' must be an integer from 2 to 32"), ({"bits": [8, 8]}, "'bits' must be an integer"),
    ({"upload-bytes": -1}, "must be non-negative"), ({"d-gen-used": 60}, "exceeds num-examples"),
    ({"codec-constant": float("inf")}, "must be finite"), ({"error-expected": [0.1]}, "must be a number"),
])
def test_a_reply_with_a_broken_figure_is_refused_with_the_figure_named(metrics, reason):
    with pytest.raises(contract.ReplyError, match=reason):
        contract.read_train_reply(a_reply(**metrics))


@pytest.mark.parametrize("note", [b"\xff", ["a"], 3])
def test_a_note_that_is_not_text_is_refused(note):
    with pytest.raises(contract.ReplyError, match="note must be text"):
        contract.read_train_reply(a_reply(note=note))


def test_unknown_metrics_are_left_out_and_node_only_ones_kept():
    _, metrics, _ = contract.read_train_reply(a_reply(extra=1.0, **{"measured-s": 2.0}))
    assert "extra" not in metrics and metrics["measured-s"] == 2.0


@pytest.mark.parametrize("note", ["", []])
def test_reply_bytes_counts_what_flowers_count_bytes_trips_on(note):
    """Flower 1.41 raises on an empty string and an IndexError on an empty list: the round died."""
    content = a_reply(note=note)
    assert contract.reply_bytes(content) == sum(r.count_bytes() for k, r in content.items()
                                                if k != contract.NOTE_KEY) + len("note")


@PROPERTY
@given(st.dictionaries(st.sampled_from(["num-examples", "d-gen-used", "train-seconds", "train-loss", "bits",
                                        "upload-bytes", "codec-constant", "measured-s", "extra"]),
                       st.none() | st.integers(-(2**63), 2**63 - 1) | st.floats()
                       | st.lists(st.floats(), min_size=1, max_size=2), max_size=4))
def test_read_train_reply_refuses_any_figure_with_a_reason_or_returns_finite_ones(changes):
    try:
        _, metrics, _ = contract.read_train_reply(a_reply(**changes))
    except contract.ReplyError as err:
        assert str(err)
        return
    averaged = {k: v for k, v in metrics.items() if k not in contract.NODE_ONLY_METRICS}
    assert all(np.isfinite(v) for v in averaged.values())


def test_a_reply_with_an_extra_metric_beside_a_good_one_is_averaged_not_a_dead_round():
    """Flower averages only MetricRecords with equal keys: one node's extra key raised
    InconsistentMessageReplies out of aggregate_train before."""
    fuzz = fuzz_inputs.reply_fuzz(np.random.default_rng(0), 1)
    hostile = next(iter(fuzz.inputs))
    content = a_reply(extra=1.0, **{"bits": 8})
    payload = codec.encode([np.full((3, 2), 0.5, np.float32), np.full(4, -0.25, np.float32)], 8,
                           np.random.default_rng(0))
    content[contract.UPDATE_KEY]["payload"] = Array(dtype="uint8", shape=(len(payload),), stype=contract.CODEC_STYPE,
                                                    data=payload)
    hostile_message = Message(content, reply_to=Message(RecordDict({}), message_type=MessageType.TRAIN,
                                                        dst_node_id=hostile.metadata.src_node_id))
    hostile_message.metadata.__dict__["_src_node_id"] = hostile.metadata.src_node_id
    fuzz.target(hostile_message)  # returns only when the update was used and the round's model is finite


# ---------------------------------------------------------------------------- the run's checkpoint

MODEL = fuzz_inputs.CHECKPOINT_MODEL


def test_a_checkpoint_round_trips(tmp_path):
    write_checkpoint(tmp_path / "c.npz", 7, [a + 1 for a in MODEL])
    done, arrays = read_checkpoint(tmp_path / "c.npz", MODEL)
    assert done == 7 and all(np.array_equal(a, b + 1) and a.dtype == b.dtype for a, b in zip(arrays, MODEL))


def checkpoint_with(tmp_path, **members) -> Path:
    good = {f"arr_{i}.npy": fuzz_inputs._npy(a) for i, a in enumerate(MODEL)}
    good["round.npy"] = fuzz_inputs._npy(np.array(2))
    path = tmp_path / "c.npz"
    path.write_bytes(fuzz_inputs._npz({**good, **{f"{k}.npy": v for k, v in members.items()}}))
    return path


def test_an_npy_header_claiming_terabytes_is_refused_before_numpy_allocates_it(tmp_path):
    """np.load of an .npz member allocates the whole array its header claims before reading."""
    path = checkpoint_with(tmp_path, arr_0=fuzz_inputs._npy_claiming((10**6, 10**6)))
    with pytest.raises(CheckpointError, match="a checkpoint of another model"):
        read_checkpoint(path, MODEL)
    assert peak_bytes(read_checkpoint, path, MODEL) < 1_000_000


def test_a_zip_bomb_member_is_refused_by_its_declared_size(tmp_path):
    bomb = fuzz_inputs.zip_bomb()
    assert len(bomb) < 30_000
    (tmp_path / "c.npz").write_bytes(bomb)
    with pytest.raises(CheckpointError, match="inflates to 2097"):
        read_checkpoint(tmp_path / "c.npz", MODEL)
    assert peak_bytes(read_checkpoint, tmp_path / "c.npz", MODEL) < 1_000_000


@pytest.mark.parametrize("members,reason", [
    (dict(arr_0=fuzz_inputs._npy(np.zeros((3, 4), np.float32))), "another model"),
    (dict(arr_0=fuzz_inputs._npy(np.full((4, 3), np.nan, np.float32))), "NaN or infinite"),
    (dict(arr_0=fuzz_inputs._npy_claiming((4, 3), "|O")), "Python objects"),
    (dict(round=fuzz_inputs._npy(np.array(-1))), "non-negative integer"),
    (dict(round=fuzz_inputs._npy(np.array(1.5))), "non-negative integer, got a float64 array"),
    (dict(arr_3=fuzz_inputs._npy(np.zeros(2))), "holds 5 member"),
    (dict(round=fuzz_inputs._npy_claiming((), "<U100000000")), "round must be a non-negative integer, got a <U"),
])
def test_a_checkpoint_of_another_model_or_broken_is_refused_with_a_reason(members, reason, tmp_path):
    with pytest.raises(CheckpointError, match=reason):
        read_checkpoint(checkpoint_with(tmp_path, **members), MODEL)


def test_an_lzma_member_is_refused_before_its_header_sizes_the_dictionary(tmp_path):
    """The fuzzer's 4 GiB peak: a mutated LZMA properties header made liblzma allocate its
    dictionary. np.savez stores its members and np.savez_compressed deflates them."""
    members = {f"arr_{i}.npy": fuzz_inputs._npy(a) for i, a in enumerate(MODEL)}
    members["round.npy"] = fuzz_inputs._npy(np.array(1))
    (tmp_path / "c.npz").write_bytes(fuzz_inputs._npz(members, zipfile.ZIP_LZMA))
    with pytest.raises(CheckpointError, match="compressed with zip method 14"):
        read_checkpoint(tmp_path / "c.npz", MODEL)
    (tmp_path / "c.npz").write_bytes(fuzz_inputs._npz(members, zipfile.ZIP_DEFLATED))
    assert read_checkpoint(tmp_path / "c.npz", MODEL)[0] == 1


def test_a_checkpoint_file_larger_than_the_model_is_refused_unread(tmp_path):
    (tmp_path / "c.npz").write_bytes(bytes(10**6))
    with pytest.raises(CheckpointError, match="a checkpoint of this model at most"):
        read_checkpoint(tmp_path / "c.npz", MODEL)


@PROPERTY
@given(st.binary(max_size=400))
def test_read_checkpoint_refuses_any_bytes_with_a_reason(data):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c.npz").write_bytes(data)
        with pytest.raises(CheckpointError):
            read_checkpoint(Path(tmp) / "c.npz", MODEL)


# ---------------------------------------------------------------------------- the generator checkpoint

@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    directory = tmp_path_factory.mktemp("generator")
    return directory, fuzz_inputs.tiny_generator(directory)


@pytest.mark.parametrize("name,content,reason", [
    ("scheduler/scheduler_config.json", b"0.5", "not a valid scheduler config: not a JSON object"),
    ("model_index.json", b'{"_class_name": "ClassConditionalPipeline", "unet": "", "scheduler": ["diffusers", "x"]}',
     "'unet' must be a \\[library, class\\] pair"),
    ("model_index.json", b"[" * 100_000, "nested too deeply"),
    ("generator.json", b'{"class_names": ["a", "b"], "null_class": 2, "provenance": 32}', "'provenance' must be"),
    ("unet/config.json", b'{"sample_size": ' + b"9" * 5000 + b"}", "not a valid UNet config"),
])
def test_a_broken_generator_checkpoint_is_refused_at_once_with_a_reason(tiny_generator, tmp_path, name, content,
                                                                        reason):
    """A scheduler config that is not an object sent diffusers to the hub for half a minute;
    the others raised RecursionError, ValueError or TypeError out of load_generator."""
    import time

    from generation.config import CheckpointError as GeneratorCheckpointError
    from generation.checkpoint import load_generator

    seed_dir, files = tiny_generator
    case = tmp_path / "case"
    for file_name, data in {**files, name: content}.items():
        (case / file_name).parent.mkdir(parents=True, exist_ok=True)
        (case / file_name).write_bytes(data)
    began = time.monotonic()
    with pytest.raises(GeneratorCheckpointError, match=reason):
        load_generator(case)
    assert time.monotonic() - began < 5


@pytest.mark.parametrize("field,value,reason", [
    ("time_embedding_type", 0.5, "cannot be loaded"),  # an UnboundLocalError inside diffusers before
    ("sample_size", None, "does not describe an image generator"),  # diffusers builds it; a TypeError after
    ("sample_size", [], "does not describe an image generator"),  # an IndexError
    ("layers_per_block", 10**400, "beyond what the weights"),  # diffusers built layers until memory ran out
    ("block_out_channels", [8, 2**40], "beyond what the weights"),
])
def test_a_unet_config_diffusers_trips_on_is_a_checkpoint_error(tiny_generator, tmp_path, field, value, reason):
    from generation.config import CheckpointError as GeneratorCheckpointError
    from generation.checkpoint import load_generator

    _, files = tiny_generator
    config = json.loads(files["unet/config.json"])
    config[field] = value
    case = tmp_path / "case"
    for file_name, data in {**files, "unet/config.json": json.dumps(config).encode()}.items():
        (case / file_name).parent.mkdir(parents=True, exist_ok=True)
        (case / file_name).write_bytes(data)
    with pytest.raises(GeneratorCheckpointError, match=reason):
        load_generator(case)


# ---------------------------------------------------------------------------- a TRAIN message's plan

PLAN_FIELD_VALUES = st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(), st.booleans(),
                              st.text(max_size=20), st.lists(st.integers(min_value=-5, max_value=5), max_size=3))


@PROPERTY
@given(changes=st.dictionaries(st.sampled_from(sorted(fuzz_inputs.plan_seeds()[2])), PLAN_FIELD_VALUES, max_size=4),
       drop=st.sets(st.sampled_from(sorted(fuzz_inputs.plan_seeds()[2])), max_size=2))
def test_a_plan_is_read_with_finite_in_range_figures_or_refused_naming_the_field(changes, drop):
    """The plan fields a device reads (the price, the delivery, the bits, ...) are each a value
    of their type and range, or the device refuses the plan with a ReplyError naming the field."""
    config = {k: v for k, v in {**fuzz_inputs.plan_seeds()[2], **changes}.items() if k not in drop}
    try:
        plan = contract.NodePlan.from_config(config)
    except contract.ReplyError as err:
        assert "plan field" in str(err)
        return
    for name, value in plan.__dict__.items():
        if isinstance(value, float):
            assert np.isfinite(value) and (value >= 0 or name == "eta")
    assert 0 <= plan.gen_price <= contract.MAX_PRICE and 2 <= plan.bits <= 32


# ---------------------------------------------------------------------------- the bench's harness

@pytest.mark.parametrize("name,cases", [("codec.decode", 300), ("scenario", 300), ("profile", 300),
                                        ("train_reply", 300), ("checkpoint", 300), ("generator_checkpoint", 150),
                                        ("delivery_reply", 300), ("pricing_game", 300), ("node_plan", 300),
                                        ("pricer_checkpoint", 150)])
def test_the_bench_finds_no_crash_no_hang_and_bounded_memory(name, cases):
    result = fuzz_inputs.fuzz_entry(name, cases, seed=0, time_limit_s=10.0, memory_every=25)
    assert result.tried == cases
    assert result.crashes == [] and result.hangs == 0
    assert result.memory_bounded, f"{result.peak_bytes} bytes for one input of {result.peak_input_bytes}"
    assert sum(result.refused.values()) > cases // 2, "the mutators reach the refusals"


def test_the_same_seed_gives_the_same_counts():
    first, second = (fuzz_inputs.fuzz_entry("codec.decode", 300, seed=3) for _ in range(2))
    assert (first.accepted, first.refused) == (second.accepted, second.refused)


def test_the_harness_counts_a_crash_and_a_hang():
    """A target that raises a foreign exception, or runs past the limit, is caught as such."""
    import time as clock

    def target(item):
        if item == "crash":
            raise IndexError("boom")
        if item == "hang":
            clock.sleep(5)
        raise ValueError("a reason")

    fuzz = fuzz_inputs.Fuzz(inputs=["refuse", "crash", "hang"], target=target, refusals=(ValueError,))
    result = fuzz_inputs.run_entry("toy", fuzz, 3, time_limit_s=0.2)
    assert result.tried == 3 and result.hangs == 1 and len(result.crashes) == 1 and "IndexError" in result.crashes[0]
    assert sum(result.refused.values()) == 1 and not result.ok
