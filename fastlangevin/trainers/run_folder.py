"""A run folder: what the trainers write and the commands read.

RUN/config.json     a section per stage ("base", "tilt", "prior", "vae", "ebm", "pixel_ebm"): its settings and what
                    rebuilds its model (``model_config``, ``energy``, …)
RUN/metrics.json    a section per stage ("base_training", …): history, best, time spent
RUN/*.safetensors   checkpoints; each also holds the config section it was written with and the loop's state
                    (``extra.config``, ``extra.loop``), so a checkpoint always loads with the settings that made it,
                    even while a new run in the folder has not yet written its own
RUN/*.png           figures

Every file is written atomically (``checkpoint.write_json``, ``checkpoint.save_checkpoint``). A checkpoint is written
before the config section that describes it.
"""

from __future__ import annotations

import os

from fastlangevin.trainers.checkpoint import read_json, read_metadata, write_json

CONFIG, METRICS = "config.json", "metrics.json"


class RunFolder:
    """The run folder at ``path`` (created by the first write)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"RunFolder({self.path!r})"

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def has(self, name: str) -> bool:
        return os.path.exists(self.file(name))

    def _read(self, name: str) -> dict:
        return read_json(self.file(name)) if self.has(name) else {}

    def _update(self, name: str, key: str, value) -> None:
        os.makedirs(self.path, exist_ok=True)
        content = self._read(name)
        content[key] = value
        write_json(self.file(name), content)

    def config(self) -> dict:
        """config.json ({} before the first checkpoint of the first stage)."""
        return self._read(CONFIG)

    def metrics(self) -> dict:
        return self._read(METRICS)

    def write_config(self, section: str, value: dict) -> None:
        if self.config().get(section) != value:
            self._update(CONFIG, section, value)

    def write_metrics(self, section: str, value: dict) -> None:
        self._update(METRICS, section, value)

    def section(self, section: str, checkpoint: str | None = None) -> dict | None:
        """The config section ``section`` that ``checkpoint`` was written with (its own copy, or, for a checkpoint
        written before they carried one, config.json's); None when neither has it."""
        if checkpoint is not None and self.has(checkpoint):
            embedded = read_metadata(self.file(checkpoint)).get("extra", {}).get("config", {})
            if section in embedded:
                return embedded[section]
        return self.config().get(section)

    def require(self, section: str, checkpoint: str, hint: str) -> dict:
        """``section(section, checkpoint)`` of an existing ``checkpoint``; FileNotFoundError ending in ``hint`` (what
        makes it) otherwise."""
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"no run folder at {self.path}; {hint}")
        found = self.section(section, checkpoint) if self.has(checkpoint) else None
        if found is None:
            raise FileNotFoundError(f"{self.path} has no {checkpoint} (or no {section!r} in {CONFIG}); {hint}")
        return found
