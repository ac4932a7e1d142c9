"""Reading the published Patch Diffusion / EDM `network-snapshot-*.pkl` files without running them.

Those files are Python pickles whose network objects are "persistent classes": each one pickles as a
call `torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the source text
of the module that defined the class, the class name and the object's `__dict__`. The published loader
executes that source, so loading such a file the usual way runs whatever the file holds.

`read_published` uses a restricted unpickler instead. It resolves only the globals needed to rebuild
tensors, numpy scalars and plain containers; a persistent object becomes an inert `Record` (class name,
state) and its module source is dropped unread. Any other global is refused with one line naming it.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


class PublishedError(ValueError):
    """A published snapshot that cannot be read safely; the message names the file and the reason."""


class Refused(pickle.UnpicklingError):
    """The file asks for something a network snapshot never needs (it is not merely damaged)."""


@dataclass
class Record:
    """An object of a persistent class (or of a plain torch module class), as data: its class name and
    its `__dict__` (sub-modules, parameters and plain attributes, themselves records or plain values)."""

    class_name: str
    state: dict[str, Any] = field(default_factory=dict)
    module: str = ""

    def __setstate__(self, state: Any) -> None:  # BUILD of a module object pickled by copyreg
        if not isinstance(state, dict):
            raise Refused(f"{self.class_name} has a state of type {type(state).__name__}")
        self.state = state

    # The nn.Module layout: parameters, buffers and sub-modules live in three ordered dicts.
    @property
    def parameters(self) -> dict[str, torch.Tensor | None]:
        return dict(self.state.get("_parameters") or {})

    @property
    def buffers(self) -> dict[str, torch.Tensor | None]:
        return dict(self.state.get("_buffers") or {})

    @property
    def modules(self) -> dict[str, Record]:
        return {k: v for k, v in (self.state.get("_modules") or {}).items() if v is not None}

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Every parameter and buffer below this module, by dotted name (a state_dict)."""
        out = {prefix + k: v for k, v in {**self.parameters, **self.buffers}.items() if v is not None}
        for name, sub in self.modules.items():
            if not isinstance(sub, Record):
                raise PublishedError(f"sub-module {prefix + name} is a {type(sub).__name__}, not a module")
            out.update(sub.tensors(f"{prefix}{name}."))
        return out

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The constructor's keyword arguments, which persistent objects keep."""
        return dict(self.state.get("_init_kwargs") or {})


class PlainDict(dict):
    """dnnlib's EasyDict, as a plain dict (its attribute access is not needed)."""


def _reconstruct_persistent(meta: Any) -> Record:
    if (
        not isinstance(meta, dict)
        or meta.get("type") != "class"
        or not isinstance(meta.get("class_name"), str)
    ):
        raise Refused("a persistent object without the expected class name and state")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise Refused(f"persistent object {meta['class_name']} has no state dict")
    # meta["module_src"] is the defining module's source text: deliberately never looked at.
    return Record(meta["class_name"], state, module="persistent")


def _load_storage(data: Any) -> torch.UntypedStorage:
    """A storage serialised by torch.save (how tensors pickle outside torch.save), loaded by torch's own
    weights-only loader."""
    if not isinstance(data, bytes):
        raise Refused("a tensor storage that is not bytes")
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise Refused(f"a tensor storage that loads as {type(storage).__name__}")
    return storage


def _rebuild_tensor(
    storage, offset, size, stride, requires_grad=False, hooks=None, *_metadata
) -> torch.Tensor:
    if hooks:
        raise Refused("a tensor with backward hooks")
    if isinstance(storage, torch.storage.TypedStorage):
        dtype, storage = storage.dtype, storage._untyped_storage
    else:
        raise Refused("a tensor without a typed storage")
    t = torch.empty((0,), dtype=dtype)
    t.set_(storage, int(offset), tuple(size), tuple(stride))
    return t


def _rebuild_parameter(data, requires_grad=True, hooks=None, *_rest) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or hooks:
        raise Refused("a parameter that is not a plain tensor")
    return data


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise Refused("a numpy scalar of an object dtype")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_array(cls: Any, shape: Any = (0,), dtype: Any = b"b") -> np.ndarray:
    """An empty array that BUILD then fills (numpy's own __setstate__, with data this unpickler made)."""
    if cls is not np.ndarray:
        raise Refused("a numpy array of a subclass")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


# Plain torch containers that may appear inside a network; they hold no behaviour we need.
TORCH_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential", "Identity", "Dropout", "SiLU")

ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("dnnlib.util", "EasyDict"): PlainDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_array,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_array,
}


def _container_class(name: str) -> type:
    """A Record subclass standing for torch.nn.<name>: pickle's NEWOBJ creates it, BUILD fills its state."""

    def new(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.class_name, obj.state, obj.module = name, {}, "torch"
        return obj

    def init(self, *args, **kwargs):
        Record.__init__(self, name, module="torch")

    return type(name, (Record,), {"__new__": new, "__init__": init, "class_name": name})


CONTAINERS = {name: _container_class(name) for name in TORCH_CONTAINERS}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in ALLOWED (and plain torch containers as records); refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if module.startswith("torch.nn.modules.") and name in CONTAINERS:
            return CONTAINERS[name]
        raise Refused(f"it refers to {module}.{name}, which a network snapshot never needs")

    def persistent_load(self, pid: Any) -> Any:
        raise Refused("it uses persistent ids (a torch.save file, not a network snapshot)")


def read_published(path: str | Path) -> dict[str, Any]:
    """The top-level dict of a published snapshot (`ema`, `loss_fn`, ...), its network objects as Records.
    Every failure is a PublishedError whose one-line message names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"published snapshot {path} does not exist")
    try:
        with open(path, "rb") as f:
            data = RestrictedUnpickler(f).load()
    except Refused as error:
        text = str(error).splitlines()[0]
        raise PublishedError(f"{path}: refused: {text}") from None
    except Exception as error:  # truncated or random bytes: EOFError, ValueError, KeyError, ...
        text = (str(error).splitlines() or [""])[0][:200] or type(error).__name__
        raise PublishedError(
            f"{path} is damaged or not a published network snapshot ({type(error).__name__}: {text})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("ema"), Record):
        kind = (
            type(data).__name__ if not isinstance(data, dict) else f"dict with keys {sorted(map(str, data))}"
        )
        raise PublishedError(f"{path} is not a published network snapshot (a {kind}, no 'ema' network)")
    return data
