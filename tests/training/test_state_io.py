"""Tests for medfusion.training.state_io: nested training state as safetensors + JSON, no pickle."""

from __future__ import annotations

import copy
import json
import math
import random
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medfusion.training.state_io import (
    CheckpointError,
    flatten_state,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
    unflatten_state,
)


def _assert_same(actual, expected, path="state"):
    """Deep equality that also checks types, dtypes and NaN."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        assert torch.equal(actual, expected), path
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        np.testing.assert_array_equal(actual, expected, err_msg=path)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), path
        assert [type(k) for k in actual] == [type(k) for k in expected], path
        for key in expected:
            _assert_same(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{path}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), path
    else:
        assert actual == expected, path


def _round_trip(obj, tmp_path):
    save_state(obj, tmp_path / "state")
    return load_state(tmp_path / "state")


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.SiLU(), torch.nn.Linear(6, 2))


def _train_step(model, optimizer, seed):
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 4, generator=generator), torch.randn(5, 2, generator=generator)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


# --------------------------------------------------------------------------------------------------
# real training state


def test_adamw_round_trip_gives_identical_next_step(tmp_path):
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for seed in range(3):
        _train_step(model, optimizer, seed)

    loaded = _round_trip(optimizer.state_dict(), tmp_path)
    _assert_same(loaded, optimizer.state_dict())
    assert isinstance(loaded["param_groups"][0]["betas"], tuple)
    assert all(type(key) is int for key in loaded["state"])

    model_b = copy.deepcopy(model)
    optimizer_b = torch.optim.AdamW(model_b.parameters(), lr=1.0)  # hyper-parameters come from the state
    optimizer_b.load_state_dict(loaded)
    _train_step(model, optimizer, seed=7)
    _train_step(model_b, optimizer_b, seed=7)
    for a, b in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_lambda_lr_round_trip(tmp_path):
    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))

    scheduler = make()
    for _ in range(4):
        scheduler.optimizer.step()
        scheduler.step()
    restored = make()
    restored.load_state_dict(_round_trip(scheduler.state_dict(), tmp_path))
    assert restored.last_epoch == scheduler.last_epoch == 4
    assert restored.get_last_lr() == scheduler.get_last_lr()
    for s in (scheduler, restored):
        s.optimizer.step()
        s.step()
    assert restored.get_last_lr() == scheduler.get_last_lr()


@pytest.mark.parametrize("enabled", [True, False])
def test_grad_scaler_round_trip(tmp_path, enabled):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7, enabled=enabled)
    state = scaler.state_dict()
    loaded = _round_trip(state, tmp_path)
    _assert_same(loaded, state)
    restored = torch.amp.GradScaler("cpu", enabled=enabled)
    restored.load_state_dict(loaded)
    assert restored.state_dict() == state


def test_diffusers_ema_round_trip(tmp_path):
    from diffusers.training_utils import EMAModel

    model = _tiny_model()
    ema = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, power=0.75)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(3):
        _train_step(model, optimizer, seed)
        ema.step(model.parameters())

    loaded = _round_trip(ema.state_dict(), tmp_path)
    _assert_same(loaded, ema.state_dict())
    restored = EMAModel(_tiny_model().parameters())
    restored.load_state_dict(loaded)  # checks the types of every field
    assert restored.optimization_step == 3
    for a, b in zip(restored.shadow_params, ema.shadow_params):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# values JSON cannot hold on its own


def test_python_values_keep_their_type(tmp_path):
    state = {
        "int_keys": {0: "a", 1: "b", 10: "c"},
        "mixed_keys": {2: "int", "2": "str", 2.5: "float", False: "bool", None: "none", math.inf: "inf"},
        "tuples": (1, (2.0, "x", None), [3, ()], {}),
        "floats": [1.0, -0.0, math.inf, -math.inf, math.nan, 1e-300],
        "big_int": 2**80,
        "looks_like_a_marker": {"__tensor__": "not a reference", "__tuple__": [1]},
        "empty": [{}, [], ()],
    }
    _assert_same(_round_trip(state, tmp_path), state)


def test_numpy_arrays_keep_dtype_and_shape(tmp_path):
    state = {
        "mt19937": np.random.RandomState(3).get_state()[1],
        "float16_2d": np.arange(6, dtype=np.float16).reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        "big_endian": np.arange(4, dtype=">i4"),
        "bool": np.array([True, False]),
        "zero_d": np.array(3.5),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "scalar": np.float64(2.5),
        "int_scalar": np.int64(-7),
    }
    loaded = _round_trip(state, tmp_path)
    _assert_same(loaded, state)
    assert loaded["mt19937"].dtype == np.uint32 and loaded["big_endian"].dtype == np.dtype(">i4")
    assert loaded["mt19937"].flags.writeable


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8, torch.int64, torch.bool],
)
def test_tensor_dtypes(tmp_path, dtype):
    state = {"t": (torch.arange(6) % 3).reshape(2, 3).to(dtype), "scalar": torch.tensor(1, dtype=dtype)}
    _assert_same(_round_trip(state, tmp_path), state)


def test_shared_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(12.0)
    state = {
        "base": base,
        "same_object": base,
        "slice": base[2:5],
        "transposed": base.view(3, 4).t(),
        "strided": base[::3],
        "expanded": torch.ones(1, 3).expand(4, 3),
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    loaded = _round_trip(state, tmp_path)
    for key, value in state.items():
        assert torch.equal(loaded[key], value.detach()), key
        assert loaded[key].is_contiguous() and type(loaded[key]) is torch.Tensor
    loaded["base"][0] = 100.0  # loaded tensors do not alias one another
    assert loaded["same_object"][0] == 0.0


def test_flatten_keys_and_skeleton(tmp_path):
    tensors, skeleton = flatten_state({"state": {0: {"exp_avg": torch.zeros(2)}}, "x": torch.ones(1)})
    assert set(tensors) == {"state.0.exp_avg", "x"}
    json.dumps(skeleton, allow_nan=False)  # plain JSON
    assert skeleton["x"] == {"__tensor__": "x"}
    _assert_same(unflatten_state(tensors, skeleton)["x"], torch.ones(1))


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            {"param_groups": [{"foo": object()}]},
            "state['param_groups'][0]['foo']: cannot save object of type object",
        ),
        ({"a": ({1, 2},)}, "state['a'][0]: cannot save object of type set"),
        ({"k": {(1, 2): 3}}, "state['k']: cannot save dict key (1, 2) of type tuple"),
        ({"f": lambda: 0}, "state['f']: cannot save object of type function"),
        ({"arr": np.array([object()])}, "state['arr']: cannot save a numpy array of dtype object"),
        ([torch.zeros(2).to_sparse()], "state[0]: cannot save a tensor with layout torch.sparse_coo"),
    ],
)
def test_unsupported_values_name_their_path(state, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        flatten_state(state)


def test_reference_cycle_is_an_error():
    state = {"a": []}
    state["a"].append(state)
    with pytest.raises(TypeError, match=re.escape("state['a'][0]: the object contains a reference cycle")):
        flatten_state(state)


# --------------------------------------------------------------------------------------------------
# random number generators


def _draw():
    return random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(3), torch.rand(3)


def test_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    random.gauss(0, 1)  # leave a cached Gaussian in both Python and numpy
    np.random.randn(1)
    save_state(rng_state(), tmp_path / "rng")
    expected = _draw()
    _draw()  # move every generator on
    loaded = load_state(tmp_path / "rng")
    assert isinstance(loaded["python"], tuple) and isinstance(loaded["numpy"][1], np.ndarray)
    set_rng_state(loaded)
    actual = _draw()
    assert actual[:2] == expected[:2]
    np.testing.assert_array_equal(actual[2], expected[2])
    np.testing.assert_array_equal(actual[3], expected[3])
    assert torch.equal(actual[4], expected[4])


def test_set_rng_state_accepts_lists():
    state = rng_state()
    expected = _draw()
    set_rng_state({**state, "python": list(state["python"]), "numpy": list(state["numpy"])})
    assert _draw()[:2] == expected[:2]


# --------------------------------------------------------------------------------------------------
# files


def test_files_written_and_device_argument(tmp_path):
    save_state({"w": torch.ones(2)}, tmp_path / "ema.v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.v2.json", "ema.v2.safetensors"]
    assert load_state(tmp_path / "ema.v2", device=torch.device("cpu"))["w"].device.type == "cpu"


@pytest.mark.parametrize("missing", ["state.json", "state.safetensors"])
def test_missing_file(tmp_path, missing):
    save_state({"w": torch.ones(2)}, tmp_path / "state")
    (tmp_path / missing).unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / missing}: file missing")):
        load_state(tmp_path / "state")


def test_invalid_json(tmp_path):
    save_state({"w": torch.ones(2)}, tmp_path / "state")
    (tmp_path / "state.json").write_text('{"format": ')
    with pytest.raises(CheckpointError, match=r"state\.json: cannot read the state skeleton"):
        load_state(tmp_path / "state")
    (tmp_path / "state.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"state\.json: not a medfusion\.state file"):
        load_state(tmp_path / "state")


def test_truncated_safetensors(tmp_path):
    save_state({"w": torch.ones(100)}, tmp_path / "state")
    tensor_file = tmp_path / "state.safetensors"
    tensor_file.write_bytes(tensor_file.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"state\.safetensors: cannot read the tensors"):
        load_state(tmp_path / "state")


def test_referenced_tensor_missing(tmp_path):
    save_state({"group": {"w": torch.ones(2)}}, tmp_path / "state")
    save_file({"other": torch.ones(2)}, str(tmp_path / "state.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_state(tmp_path / "state")
    message = str(info.value)
    assert "state.json" in message and "state.safetensors" in message
    assert "state['group']['w']: tensor 'group.w' is missing from the tensor file" in message
