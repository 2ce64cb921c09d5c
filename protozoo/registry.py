"""Name -> constructor registries for models and backbones.

Following timm's ``_registry.py``: a registry is a dict plus a decorator, and creating an object
only looks its name up and dispatches. Registering a name twice is an error (as in torchvision's
``models/_api.py``), and an unknown name raises a :class:`~protozoo.errors.UserError` that lists the
closest registered names.

Lookup only: this module never imports the families, they import it to register. Importing
:mod:`protozoo` (which any ``import protozoo.<module>`` does first) imports
:mod:`protozoo.models`, and with it every family, before any lookup runs.
"""
from __future__ import annotations

import difflib
from typing import Callable, Iterable, TypeVar

from .errors import UserError

F = TypeVar("F", bound=Callable)


def unknown_name_error(kind: str, name: str, choices: Iterable[str], hint: str = "") -> UserError:
    """Build the one-line error for an unknown ``name`` of ``kind``, naming close matches."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    if close:
        listing = f"did you mean {', '.join(close)}?"
    elif len(choices) <= 12:
        listing = f"choose one of: {', '.join(choices)}"
    else:
        listing = f"see protozoo.list_{kind}s() for the {len(choices)} names"
    return UserError(f"unknown {kind} '{name}': {listing}{hint}")


class Registry:
    """A named table of constructors; ``kind`` ("model", "backbone") appears in error messages."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name``; a second registration of a name raises."""

        def decorator(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered "
                                 f"(by {self._entries[name].__module__}); pick another name")
            self._entries[name] = fn
            return fn

        return decorator

    def unregister(self, name: str) -> Callable:
        """Remove ``name`` (e.g. a family a test registered); returns its constructor."""
        try:
            return self._entries.pop(name)
        except KeyError:
            raise unknown_name_error(self.kind, name, self._entries) from None

    def get(self, name: str) -> Callable:
        try:
            return self._entries[name]
        except KeyError:
            raise unknown_name_error(self.kind, name, self._entries) from None

    def name_of(self, fn: Callable) -> str | None:
        """The name ``fn`` is registered under (the exact constructor, not a subclass), or
        None."""
        return next((name for name, entry in self._entries.items() if entry is fn), None)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self, sort: bool = True) -> list[str]:
        """The registered names, sorted (or in registration order)."""
        return sorted(self._entries) if sort else list(self._entries)


MODELS = Registry("model")


def register_model(name: str) -> Callable[[F], F]:
    """Register a model constructor; it must accept only JSON-serialisable keyword arguments."""
    return MODELS.register(name)


def create_model(name: str, **kwargs):
    """Build a registered model by name.

    The constructor's arguments -- the ones given *and* the defaults of the others -- are
    recorded on the model (``model.model_name``, ``model.init_kwargs``) so that
    :func:`protozoo.save` can rebuild it from the checkpoint alone (nanoGPT's rule: a checkpoint
    carries the arguments that rebuild its model). Recording the defaults too means a checkpoint
    keeps meaning the same model when a later version changes a default.
    """
    check_model_kwargs(name, kwargs)
    model = MODELS.get(name)(**kwargs)
    model.model_name = name
    model.init_kwargs = {**_constructor_defaults(name), **kwargs}
    return model


def check_model_kwargs(name: str, kwargs: dict) -> None:
    """A one-line UserError for an argument model ``name``'s constructor does not take, or a value
    of the wrong type for its annotation (``film="False"`` would otherwise be a true string, and
    ``hops=2.5`` fail deep inside the model)."""
    import inspect

    from .config import check_type

    params = inspect.signature(MODELS.get(name)).parameters
    hints = constructor_hints(name)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in kwargs.items():
        if key not in params and not open_ended:
            close = difflib.get_close_matches(key, params, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else \
                f"it takes {', '.join(p for p in params if p != 'self')}"
            raise UserError(f"model '{name}' has no argument '{key}': {hint}")
        if key in hints:
            check_type(value, hints[key], f"argument '{key}' of model '{name}'")


def constructor_hints(name: str) -> dict:
    """The type hints of model ``name``'s constructor arguments, evaluated
    (:func:`typing.get_type_hints`); empty when an annotation cannot be evaluated here."""
    import typing

    constructor = MODELS.get(name)
    try:
        hints = typing.get_type_hints(constructor.__init__ if isinstance(constructor, type)
                                      else constructor)
    except Exception:  # e.g. a name imported for type checkers only: leave the values unchecked
        return {}
    hints.pop("return", None)
    return hints


def saved_kwargs(name: str, kwargs: dict) -> dict:
    """Constructor arguments read back from a checkpoint or resume state, as the model they
    trained was built. Before arguments were type-checked, ``--model-arg film=False`` was saved
    as the string "False", which the model read as true; such a value becomes that truth value,
    so an old run loads as the model its weights belong to. For the same reason an argument the
    saved run predates takes the family's ``absent_kwargs`` value (what the model computed before
    the argument existed), not today's default."""
    hints = constructor_hints(name)
    kwargs = {**getattr(MODELS.get(name), "absent_kwargs", {}), **kwargs}
    return {key: bool(value) if isinstance(value, str) and hints.get(key) is bool else value
            for key, value in kwargs.items()}


def model_task(name: str) -> str:
    """What model ``name`` does with its input: ``"classify"`` images or answer questions about
    them (``"vqa"``), from the family's ``ZooModel.task``."""
    return getattr(MODELS.get(name), "task", "classify")


def models_for_task(task: str) -> list[str]:
    return [n for n in MODELS.names() if model_task(n) == task]


def _constructor_defaults(name: str) -> dict:
    """Every keyword of model ``name``'s constructor that has a default, with that default."""
    import inspect

    return {key: param.default
            for key, param in inspect.signature(MODELS.get(name)).parameters.items()
            if param.default is not inspect.Parameter.empty}


def model_default(name: str, argument: str):
    """The default value of keyword ``argument`` of model ``name``'s constructor (e.g. the
    family's default backbone), or None when it has none."""
    return _constructor_defaults(name).get(argument)


def model_batch_size(name: str) -> int:
    """The family's default training batch size (``ZooModel.default_batch_size``)."""
    return int(getattr(MODELS.get(name), "default_batch_size", 64))


def list_models() -> list[str]:
    return MODELS.names()
