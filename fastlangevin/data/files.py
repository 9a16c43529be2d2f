"""Finding a data set's files under a local data directory, and the errors when they are missing or malformed.

Nothing is ever downloaded: the user places the standard files in a folder and passes it (``--data-dir``), or
installs a package that ships them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format (bad magic number, wrong sizes, not a pickle…)."""


class MissingDataPackage(ImportError):
    """The optional package that ships a data set's files is not installed; the message says what to install."""


def locate_files(data_dir: str | os.PathLike | None, dataset: str, subdirs: Sequence[str],
                 files: Sequence[Sequence[str]], hint: str = "") -> list[Path]:
    """The paths of ``files`` in the first of ``data_dir/subdir`` that holds any of them.

    files: one entry per required file, each a sequence of accepted names in order of preference (e.g. the raw
    file, then its ``.gz``). subdirs: folders under data_dir to look in, in order; ``""`` is data_dir itself.
    Raises FileNotFoundError naming the directory and the missing files, followed by ``hint`` (where to get them).
    """
    wanted = ", ".join(" or ".join(names) for names in files)
    if data_dir is None:
        raise FileNotFoundError(f"{dataset} is read from local files and nothing is downloaded: pass data_dir "
                                f"(--data-dir) naming a folder that holds {wanted}{hint}")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data directory {root} does not exist (needed for {dataset}: {wanted}){hint}")
    if not root.is_dir():
        raise NotADirectoryError(f"data directory {root} is not a directory")
    searched = [root / sub for sub in subdirs if (root / sub).is_dir()]
    for folder in searched:
        found = [next((folder / n for n in names if (folder / n).is_file()), None) for names in files]
        if any(path is not None for path in found):
            missing = [" or ".join(names) for names, path in zip(files, found) if path is None]
            if missing:
                raise FileNotFoundError(f"{dataset}: {folder} is missing {', '.join(missing)}{hint}")
            return found
    raise FileNotFoundError(f"{dataset}: none of {wanted} found in {', '.join(str(f) for f in searched)}{hint}")
