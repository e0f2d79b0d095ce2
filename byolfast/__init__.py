"""byolfast: fast, faithful BYOL pretraining.

Every part of the project lives under this one import name, so nothing in a user's working folder (a `train.py`, a
`model.py`) can stand in for it: `byolfast.pipeline` (formats, loaders, augmentations), `byolfast.model` (ResNet,
heads, BYOL, EMA), `byolfast.train` (config, loop, optimizer, schedules, distributed, checkpoints, CLI) and
`byolfast.benchmarks`. An installed copy holds them as sub-folders (setup.cfg's `package_dir`); in a source checkout
they are the repository's top-level folders, which this file adds to the package's search path.
"""
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if not (Path(__file__).resolve().parent / "pipeline").is_dir() and (_ROOT / "pipeline" / "__init__.py").is_file():
    __path__.append(str(_ROOT))  # noqa: F821 (a package's __path__)
