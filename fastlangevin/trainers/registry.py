"""Which trainers the ``fastlangevin`` command offers.

A trainer is a ``fastlangevin.trainers.loop.Trainer`` subclass decorated with ``@register("command")`` in its own
module. The
modules are the package's (``TRAINER_MODULES``: adding a trainer to fastlangevin is one new file and one line here)
and those that installed packages name under the entry-point group ``fastlangevin.trainers``, e.g. in a
``pyproject.toml``::

    [project.entry-points."fastlangevin.trainers"]
    my-trainer = "my_package.my_trainer"

They are imported by ``trainers()``; a trainer module keeps heavy imports (data sets, plots)
inside its functions, so that building the command line stays light.
"""

from __future__ import annotations

import importlib
from importlib import metadata

TRAINER_MODULES = (
    "fastlangevin.trainers.base",
    "fastlangevin.trainers.tilt",
    "fastlangevin.trainers.pixel_ebm",
    "fastlangevin.trainers.lebm",
    "fastlangevin.trainers.hierarchical",
    "fastlangevin.trainers.hierarchical_ebm",
)
ENTRY_POINT_GROUP = "fastlangevin.trainers"

_TRAINERS: dict[str, type] = {}


def register(command: str):
    """Class decorator: offer the trainer as ``command`` (one or two words: ``"tilt"``, ``"train-prior lebm"``; the
    first line of the class docstring is its help)."""
    if not isinstance(command, str) or not 1 <= len(command.split()) <= 2:
        raise ValueError(f"command must be one or two words, e.g. 'tilt', got {command!r}")

    def add(cls: type) -> type:
        previous = _TRAINERS.get(command)
        if previous is not None and previous.__qualname__ != cls.__qualname__:
            raise ValueError(f"two trainers claim the command {command!r}: {previous.__module__}."
                             f"{previous.__qualname__} and {cls.__module__}.{cls.__qualname__}")
        cls.command = command
        _TRAINERS[command] = cls
        return cls
    return add


def trainers() -> dict[str, type]:
    """Every registered trainer by command: the package's, then those of the entry points installed now."""
    for name in TRAINER_MODULES:
        importlib.import_module(name)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
    return dict(_TRAINERS)


def trainer_modules() -> list[str]:
    """The modules of every registered trainer (after ``trainers()``), in registration order."""
    return list(dict.fromkeys(cls.__module__ for cls in trainers().values()))
