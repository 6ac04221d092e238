"""Save and load nested training state (optimizer, scheduler, EMA, RNG) without pickle.

A state object (nested dicts, lists and tuples of tensors, numpy arrays and JSON scalars, as returned
by ``optimizer.state_dict()``, ``lr_scheduler.state_dict()``, ``GradScaler.state_dict()``, diffusers'
``EMAModel.state_dict()`` or :func:`rng_state`) is split in two:

* every tensor (and the bytes of every numpy array) goes into one ``<stem>.safetensors`` file;
* the rest becomes a JSON skeleton ``<stem>.json`` in which each tensor is a reference.

JSON cannot say everything Python can, so some values are written as one-key marker objects:

==================================  ============================================================
Python value                        JSON skeleton
==================================  ============================================================
tensor                              ``{"__tensor__": "state.0.exp_avg"}`` (key in safetensors)
numpy array or scalar               ``{"__ndarray__": {"key": ..., "dtype": "<u4", "shape": [624],
                                    "scalar": false}}`` (raw bytes stored as a uint8 tensor)
tuple                               ``{"__tuple__": [...]}``
dict with a key that is not a str   ``{"__dict__": [[key, value], ...]}`` (keys keep their type;
(or that looks like a marker)       int, str, float, bool and None are allowed)
``inf``, ``-inf``, ``nan``          ``{"__float__": "inf"}``
==================================  ============================================================

Loading never executes code from the files: safetensors holds raw tensors, the skeleton is plain JSON.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from medfusion.utils import atomic_path, atomic_write_text

__all__ = [
    "CheckpointError",
    "flatten_state",
    "load_state",
    "rng_state",
    "save_state",
    "set_rng_state",
    "unflatten_state",
]

_FORMAT = "medfusion.state"
_FORMAT_VERSION = 1

_TENSOR = "__tensor__"
_NDARRAY = "__ndarray__"
_TUPLE = "__tuple__"
_DICT = "__dict__"
_FLOAT = "__float__"
_MARKERS = frozenset({_TENSOR, _NDARRAY, _TUPLE, _DICT, _FLOAT})

_SCALAR_TYPES = (bool, int, str, type(None))
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or inconsistent; the message names the file."""


# --------------------------------------------------------------------------------------------------
# flatten


def _path_str(parts: tuple) -> str:
    return "state" + "".join(f"[{part!r}]" for part in parts)


class _Flattener:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._active: set[int] = set()  # ids of the containers on the current path (cycle check)

    def _new_key(self, parts: tuple) -> str:
        base = ".".join(str(part) for part in parts) or "state"
        key, n = base, 1
        while key in self.tensors:
            key, n = f"{base}#{n}", n + 1
        return key

    def encode(self, obj: Any, parts: tuple) -> Any:
        if isinstance(obj, torch.Tensor):
            return {_TENSOR: self._add_tensor(obj, parts)}
        if isinstance(obj, (np.ndarray, np.generic)):
            return {_NDARRAY: self._add_ndarray(obj, parts)}
        if type(obj) in _SCALAR_TYPES:
            return obj
        if type(obj) is float:
            return obj if math.isfinite(obj) else {_FLOAT: repr(obj)}
        if isinstance(obj, (dict, list, tuple)):
            if id(obj) in self._active:
                raise TypeError(f"{_path_str(parts)}: the object contains a reference cycle")
            self._active.add(id(obj))
            try:
                return self._encode_container(obj, parts)
            finally:
                self._active.discard(id(obj))
        raise TypeError(f"{_path_str(parts)}: cannot save object of type {type(obj).__qualname__}")

    def _encode_container(self, obj: dict | list | tuple, parts: tuple) -> Any:
        if isinstance(obj, list):
            return [self.encode(item, (*parts, i)) for i, item in enumerate(obj)]
        if isinstance(obj, tuple):
            return {_TUPLE: [self.encode(item, (*parts, i)) for i, item in enumerate(obj)]}
        if all(type(key) is str for key in obj) and not _MARKERS.intersection(obj):
            return {key: self.encode(value, (*parts, key)) for key, value in obj.items()}
        pairs = []
        for key, value in obj.items():
            if type(key) not in (*_SCALAR_TYPES, float):
                raise TypeError(
                    f"{_path_str(parts)}: cannot save dict key {key!r} of type {type(key).__qualname__} "
                    "(keys must be str, int, float, bool or None)"
                )
            pairs.append([self.encode(key, parts), self.encode(value, (*parts, key))])
        return {_DICT: pairs}

    def _add_tensor(self, tensor: torch.Tensor, parts: tuple) -> str:
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
            raise TypeError(
                f"{_path_str(parts)}: cannot save a tensor with layout {tensor.layout}, "
                f"device {tensor.device} (only dense tensors with data)"
            )
        tensor = tensor.detach()
        if tensor.device.type == "cpu":
            # A fresh contiguous copy: safetensors refuses tensors that share storage or are views.
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        else:
            tensor = tensor.to("cpu").contiguous()  # the device-to-host copy owns its storage
        key = self._new_key(parts)
        self.tensors[key] = tensor
        return key

    def _add_ndarray(self, array: np.ndarray | np.generic, parts: tuple) -> dict[str, Any]:
        array_nd = np.asarray(array)
        if array_nd.dtype.kind in "OV":
            raise TypeError(f"{_path_str(parts)}: cannot save a numpy array of dtype {array_nd.dtype}")
        raw = np.frombuffer(array_nd.tobytes(order="C"), dtype=np.uint8).copy()
        key = self._new_key(parts)
        self.tensors[key] = torch.from_numpy(raw)
        return {
            "key": key,
            "dtype": array_nd.dtype.str,
            "shape": list(array_nd.shape),
            "scalar": isinstance(array, np.generic),
        }


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state into its tensors and a JSON-serialisable skeleton.

    Args:
        obj: nested dicts, lists and tuples of tensors, numpy arrays and scalars, and
            ``bool``/``int``/``float``/``str``/``None``. Dict subclasses come back as ``dict``.

    Returns:
        ``(tensors, skeleton)``: contiguous CPU tensors that share no storage (so that
        ``safetensors`` accepts them), keyed by their dotted path; the skeleton refers to them by key.

    Raises:
        TypeError: for an unsupported value, naming its path, e.g.
            ``state['param_groups'][0]['foo']: cannot save object of type Foo``.
    """
    flattener = _Flattener()
    skeleton = flattener.encode(obj, ())
    return flattener.tensors, skeleton


# --------------------------------------------------------------------------------------------------
# unflatten


def _decode(node: Any, tensors: dict[str, torch.Tensor], parts: tuple) -> Any:
    if isinstance(node, list):
        return [_decode(item, tensors, (*parts, i)) for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    markers = _MARKERS.intersection(node)
    if not markers:
        return {key: _decode(value, tensors, (*parts, key)) for key, value in node.items()}
    if len(node) != 1:
        raise CheckpointError(f"{_path_str(parts)}: marker {sorted(markers)} mixed with other keys")
    (marker, value), path = next(iter(node.items())), _path_str(parts)
    try:
        if marker == _TENSOR:
            return _lookup(tensors, value, path)
        if marker == _NDARRAY:
            return _decode_ndarray(value, tensors, path)
        if marker == _TUPLE:
            return tuple(_decode(item, tensors, (*parts, i)) for i, item in enumerate(value))
        if marker == _FLOAT:
            return _NONFINITE[value]
        if marker == _DICT:
            result = {}
            for key_node, value_node in value:
                key = _decode(key_node, tensors, parts)
                result[key] = _decode(value_node, tensors, (*parts, key))
            return result
        raise AssertionError(marker)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: malformed {marker} entry {value!r:.200}: {err}") from err


def _lookup(tensors: dict[str, torch.Tensor], key: str, path: str) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{path}: tensor {key!r} is missing from the tensor file")
    return tensors[key]


def _decode_ndarray(spec: dict[str, Any], tensors: dict[str, torch.Tensor], path: str) -> Any:
    raw = _lookup(tensors, spec["key"], path)
    dtype = np.dtype(spec["dtype"])
    if dtype.kind in "OV":
        raise ValueError(f"numpy dtype {dtype} is not allowed")
    array = raw.cpu().numpy().view(dtype).reshape(spec["shape"]).copy()
    return array[()] if spec["scalar"] else array


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Rebuild the object that :func:`flatten_state` split into ``tensors`` and ``skeleton``.

    Args:
        tensors: the tensors by key (as saved; they are used as they are, on their device).
        skeleton: the JSON skeleton.

    Returns:
        The nested object, with tuples, non-string dict keys, numpy arrays and non-finite floats
        restored.

    Raises:
        CheckpointError: a referenced tensor is missing or the skeleton is malformed (the message
            names the path inside the object).
    """
    return _decode(skeleton, tensors, ())


# --------------------------------------------------------------------------------------------------
# files


def _state_files(path_stem: str | Path) -> tuple[Path, Path]:
    stem = Path(path_stem)
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_state(obj: Any, path_stem: str | Path) -> None:
    """Write ``obj`` as ``<path_stem>.safetensors`` (tensors) and ``<path_stem>.json`` (skeleton).

    Each file is written through a temporary file and a rename. ``path_stem`` is used as given
    (``ema.v2`` gives ``ema.v2.safetensors``).

    Raises:
        TypeError: ``obj`` holds a value that cannot be saved (see :func:`flatten_state`).
    """
    tensors, skeleton = flatten_state(obj)
    tensor_file, json_file = _state_files(path_stem)
    text = json.dumps(
        {"format": _FORMAT, "format_version": _FORMAT_VERSION, "skeleton": skeleton},
        indent=1,
        allow_nan=False,
    )
    with atomic_path(tensor_file) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(json_file, text + "\n")


def load_state(path_stem: str | Path, device: str | torch.device = "cpu") -> Any:
    """Read the object written by :func:`save_state`.

    Args:
        path_stem: the path given to :func:`save_state`.
        device: where tensors are loaded (``"cpu"``, ``"cuda:0"``, ...); numpy arrays stay in memory.

    Raises:
        CheckpointError: naming the file, when either file is missing, unreadable or malformed,
            or when the skeleton refers to a tensor that the safetensors file lacks.
    """
    tensor_file, json_file = _state_files(path_stem)
    for file in (json_file, tensor_file):
        if not file.is_file():
            raise CheckpointError(f"{file}: file missing")
    try:
        document = json.loads(json_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{json_file}: cannot read the state skeleton: {err}") from err
    if not isinstance(document, dict) or document.get("format") != _FORMAT or "skeleton" not in document:
        raise CheckpointError(f"{json_file}: not a {_FORMAT} file (no 'format' or 'skeleton' entry)")
    if document.get("format_version") != _FORMAT_VERSION:
        raise CheckpointError(
            f"{json_file}: format_version {document.get('format_version')!r} is not supported "
            f"(expected {_FORMAT_VERSION})"
        )
    try:
        tensors = load_file(str(tensor_file), device=str(device))
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{tensor_file}: cannot read the tensors: {err}") from err
    try:
        return unflatten_state(tensors, document["skeleton"])
    except CheckpointError as err:
        raise CheckpointError(f"{json_file} (tensors in {tensor_file.name}): {err}") from err


# --------------------------------------------------------------------------------------------------
# random number generators


def rng_state() -> dict[str, Any]:
    """Capture the global random number generators: Python, numpy, torch CPU and every CUDA device.

    Returns:
        ``{"python": ..., "numpy": ..., "torch": uint8 tensor, "cuda": [uint8 tensor per device]}``
        (``"cuda"`` is empty without CUDA); it survives :func:`save_state` / :func:`load_state`.
    """
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators captured by :func:`rng_state`.

    Lists are accepted where Python and numpy expect tuples. CUDA states are restored for as many
    devices as both the state and this machine have; a different device count gives a warning.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda", [])
    if cuda_states and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda_states) != count:
            warnings.warn(
                f"RNG state holds {len(cuda_states)} CUDA generator(s), this machine has {count} "
                "device(s); restoring the common ones",
                stacklevel=2,
            )
        for index, cuda_state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
    elif cuda_states:
        warnings.warn("RNG state holds CUDA generators but CUDA is not available; ignored", stacklevel=2)
