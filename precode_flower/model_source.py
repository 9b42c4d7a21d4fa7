"""Turn what a user names as "the model" into a factory that works in spawned worker processes.

The auditor rebuilds the clients' model in worker processes started with ``spawn`` (a fresh
interpreter), so whatever the user passes must survive pickling into one. :func:`model_factory`
accepts

* a class (``Net``) or any zero-argument callable returning an ``nn.Module``;
* an ``nn.Module`` instance, used as a template (copied; its weights are replaced by the
  global model's anyway);
* a string ``"pkg.module:Name"`` naming either of the above, imported where it is used.

Objects importable by reference (defined at the top level of an importable module) travel by
reference, as pickle does. Objects that are not (a lambda, a class defined in a function or in
``__main__`` of a notebook or script) travel by value with cloudpickle (the standalone package,
else the copy that ships with Ray, Flower's simulation engine). Errors are raised here, in the
server, with the cause, not later in a worker.
"""

from __future__ import annotations

import copy
import importlib
import pickle
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

ModelSource = type[nn.Module] | Callable[[], nn.Module] | nn.Module | str


def _cloudpickle() -> Any:
    try:
        import cloudpickle
    except ImportError:
        try:
            from ray import cloudpickle
        except ImportError:
            return None
    return cloudpickle


def _importable(obj: Any) -> bool:
    """Whether pickle can send ``obj`` by reference to a process that does not run our main."""
    module = getattr(obj, "__module__", None)
    if module in (None, "__main__", "__mp_main__"):
        return False
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - any pickling failure means "not by reference"
        return False
    return True


class ImportedModel:
    """``"pkg.module:Name"``: imported in the process that builds the model."""

    def __init__(self, path: str) -> None:
        module, sep, name = path.partition(":")
        if not sep or not module or not name:
            raise ValueError(f"model {path!r}: expected 'package.module:Name'")
        self.path = path

    def resolve(self) -> Any:
        module, _, name = self.path.partition(":")
        try:
            obj: Any = importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"model {self.path!r}: cannot import {module!r}: {err}") from None
        for part in name.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ValueError(f"model {self.path!r}: {module!r} has no {name!r}") from None
        return obj

    def __call__(self) -> nn.Module:
        return instantiate(self.resolve(), self.path)

    def __repr__(self) -> str:
        return f"ImportedModel({self.path!r})"


class PickledModel:
    """A class, callable or template module sent by value (cloudpickle bytes)."""

    def __init__(self, obj: Any, name: str) -> None:
        cp = _cloudpickle()
        if cp is None:
            raise ValueError(
                f"model {name}: not importable by reference (defined in __main__, in a function, "
                "or a lambda) and cloudpickle is not installed; define it at the top level of a "
                "module and pass it or 'package.module:Name'"
            )
        try:
            self.blob = cp.dumps(obj)
        except Exception as err:  # noqa: BLE001 - the cause is named below
            raise ValueError(f"model {name}: cannot be sent to worker processes: {err}") from None
        self.name = name

    def __call__(self) -> nn.Module:
        return instantiate(pickle.loads(self.blob), self.name)

    def __repr__(self) -> str:
        return f"PickledModel({self.name})"


def copy_module(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that skips cached non-leaf tensors (e.g. a bottleneck's last KL).

    Deep-copying a tensor that is part of an autograd graph is an error in torch; such
    attributes are per-forward caches, so the copy gets None instead.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and value.grad_fn is not None:
                memo[id(value)] = None
    return copy.deepcopy(model, memo)


def instantiate(obj: Any, name: str) -> nn.Module:
    """A fresh module from a template module, a class or a zero-argument callable."""
    if isinstance(obj, nn.Module):
        return copy_module(obj)  # a template: the caller loads the global weights into it
    if not callable(obj):
        raise TypeError(f"model {name}: expected an nn.Module, a class or a callable, got {obj!r}")
    try:
        built = obj()
    except TypeError as err:
        raise TypeError(f"model {name}: cannot be called without arguments: {err}") from None
    if not isinstance(built, nn.Module):
        raise TypeError(f"model {name}() returned {type(built).__name__}, not an nn.Module")
    return built


def model_factory(model: ModelSource) -> Callable[[], nn.Module]:
    """A picklable zero-argument factory for ``model`` (see the module docstring).

    The factory is tried once here, so a model that cannot be built fails now.

    Raises:
        ValueError, TypeError: naming the model and the cause.
    """
    if isinstance(model, ImportedModel | PickledModel | _Template | _Called):
        return model  # already a factory
    name = getattr(model, "__qualname__", None) or type(model).__qualname__
    if isinstance(model, str):
        factory: Callable[[], nn.Module] = ImportedModel(model)
    elif isinstance(model, nn.Module):
        by_reference = _importable(type(model))
        factory = _Template(model) if by_reference else PickledModel(copy_module(model), name)
    elif callable(model):
        factory = _Called(model, name) if _importable(model) else PickledModel(model, name)
    else:
        raise TypeError(f"model: expected a class, a callable, a module or 'pkg.module:Name', "
                        f"got {model!r}")  # fmt: skip
    factory()  # fail here, with the cause, not in a worker
    return factory


class _Template:
    """A template module sent by reference to its class, with its state; copied per build."""

    def __init__(self, module: nn.Module) -> None:
        self.module = copy_module(module)

    def __call__(self) -> nn.Module:
        return copy_module(self.module)

    def __repr__(self) -> str:
        return f"template {type(self.module).__qualname__}"


class _Called:
    """A class or function sent by reference, called in the worker."""

    def __init__(self, fn: Callable[[], nn.Module], name: str) -> None:
        self.fn, self.name = fn, name

    def __call__(self) -> nn.Module:
        return instantiate(self.fn, self.name)

    def __repr__(self) -> str:
        return self.name
