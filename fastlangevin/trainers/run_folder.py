"""A run folder: what the trainers write and the commands read.

RUN/config.json     a section per stage ("base", "tilt", "prior", "vae", "ebm", "pixel_ebm"): its settings and what
                    rebuilds its model (``model_config``, ``energy``, …)
RUN/metrics.json    a section per stage ("base_training", …): history, best, time spent
RUN/metrics.jsonl   every history entry as it is made, one JSON object a line ({"stage", "run", "step", …}): appended
                    at once, so a crash loses nothing; "run" tells a fresh start from a resumed one
RUN/*.safetensors   checkpoints; each also holds the config section it was written with and the loop's state
                    (``extra.config``, ``extra.loop``), so a checkpoint always loads with the settings that made it,
                    even while a new run in the folder has not yet written its own
RUN/*.png           figures

Every file is written atomically (``checkpoint.write_json``, ``checkpoint.save_checkpoint``; metrics.jsonl is
appended to), with the umask's permissions. A checkpoint is written before the config section that describes it.
A command removes what an earlier one that was killed mid-write left (``clean``).
"""

from __future__ import annotations

import json
import os

from fastlangevin._io import remove_stale_temporaries
from fastlangevin.trainers.checkpoint import read_json, read_metadata, write_json

CONFIG, METRICS, LOG = "config.json", "metrics.json", "metrics.jsonl"


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

    def log(self, record: dict) -> None:
        """Append ``record`` as one line to metrics.jsonl (a line cut short by a crash is closed first)."""
        os.makedirs(self.path, exist_ok=True)
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.file(LOG), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            os.write(fd, line)
        finally:
            os.close(fd)

    def read_log(self) -> list[dict]:
        """The records of metrics.jsonl (a line a crash cut short is skipped)."""
        records = []
        if self.has(LOG):
            with open(self.file(LOG)) as f:
                for line in f:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        return records

    def clean(self) -> list[str]:
        """Remove the temporary files of writers that were killed mid-write; returns their paths."""
        return remove_stale_temporaries(self.path)

    def remove(self, names, sections=()) -> None:
        """Delete the files ``names``, then the config and metrics ``sections`` that described them."""
        for name in names:
            if self.has(name):
                os.unlink(self.file(name))
        for file_name in (CONFIG, METRICS):
            content = self._read(file_name)
            if any(section in content for section in sections):
                write_json(self.file(file_name), {k: v for k, v in content.items() if k not in sections})

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
