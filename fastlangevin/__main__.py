"""``python -m fastlangevin``: the ``fastlangevin`` command (``fastlangevin.cli``)."""

import sys

from fastlangevin.cli import main

sys.exit(main())
