"""The package version, written only here: pyproject.toml (``[tool.setuptools.dynamic]``), CMakeLists.txt (the
extensions' ``build_info()["version"]``) and ``fastlangevin.__version__`` all read this line."""

__version__ = "0.1.0"
