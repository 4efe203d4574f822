"""The toy federation of ``examples/toy_federation.py`` for the tests, and a state comparison.

The example is a script, not a package (``examples`` is also the name of a package some
dependencies install), so it is loaded from its file here; its classes keep their names.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "toy_federation.py"
_NAME = "lightning_fedseg_examples_toy_federation"


def _load_example():
    if _NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_NAME, _EXAMPLE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module  # classes pickle by reference within this process
        spec.loader.exec_module(module)
    return sys.modules[_NAME]


_example = _load_example()
make_site_data = _example.make_site_data
ToyDataModule = _example.ToyDataModule
ToyClassifier = _example.ToyClassifier
trainer_kwargs = _example.trainer_kwargs

__all__ = ["ToyClassifier", "ToyDataModule", "make_site_data", "states_equal", "trainer_kwargs"]


def states_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
