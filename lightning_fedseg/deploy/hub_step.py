"""A server step that needs every site's own state, run at the hub (Krum, the median, ...).

Over NVIDIA FLARE, gathering every site's state to every site would show each institution's
weights to the others; instead each site sends its state (with its index and sample weight) to
the hub only, and :class:`HubStep` runs the study's own rule there, the same
``ServerStep.step_from_sites`` the simulation runs, and returns the new global state to every
site. The rule comes from the job's configuration (the YAML's ``server``: ``class_path`` and
``init_args``, built here as LightningCLI would), the state's layout (keys, shapes, dtypes, which
keys are parameters) from the sites' message.

The round's global state (which rules such as norm bounding or centered clipping start from)
comes with the first site's message, after its own state: every site holds the same one, and so
a resumed federation needs nothing from an earlier job.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_fedseg.federation.transport import flatten_state, unflatten_state

__all__ = ["HubStep", "build", "import_class"]


def import_class(path: str) -> Any:
    """The class a config names: a dotted path, or a name ``lightning_fedseg`` exports (as in the CLI).

    Example:
        >>> import_class("FedAvg").__name__, import_class("lightning_fedseg.federation.Krum").__name__
        ('FedAvg', 'Krum')
    """
    module, _, name = (path if "." in path else f"lightning_fedseg.{path}").rpartition(".")
    return getattr(importlib.import_module(module), name)


def build(spec: Any) -> Any:
    """An object from a ``{"class_path": ..., "init_args": {...}}`` config, or the same as
    ``{"class": ..., "args": {...}}`` (:func:`~lightning_fedseg.deploy.job.plain_spec`), nested ones too.

    Example:
        >>> build({"class_path": "lightning_fedseg.federation.CoordinateMedian"})
        CoordinateMedian()
        >>> build({"class": "lightning_fedseg.federation.Krum", "args": {"num_byzantine": 0}})
        Krum(num_byzantine=0, multi=1)
    """
    if isinstance(spec, Mapping) and ("class_path" in spec or "class" in spec):
        kwargs = {k: build(v) for k, v in dict(spec.get("init_args", spec.get("args")) or {}).items()}
        return import_class(str(spec.get("class_path", spec.get("class"))))(**kwargs)
    if isinstance(spec, list):
        return [build(v) for v in spec]
    return spec


class HubStep:
    """The study's server step at the hub, and the global state it starts each round from.

    Args:
        server: the YAML's ``server`` config.
        sites: the federation's sites, in order.
    """

    def __init__(self, server: Mapping[str, Any], sites: Sequence[str]) -> None:
        self.server = build(server)
        if not getattr(self.server, "needs_site_states", False):
            raise ValueError(f"{self.server!r} does not need each site's state: the sites compute it from the sum.")
        self.sites = list(sites)
        self.reference: dict[str, Tensor] | None = None

    def _layout(self, layout: Mapping[str, Any]) -> dict[str, Tensor]:
        if self.reference is None:
            dtypes = [getattr(torch, d) for d in layout["dtypes"]]
            self.reference = {
                k: torch.zeros(shape, dtype=dtype)
                for k, shape, dtype in zip(layout["keys"], layout["shapes"], dtypes, strict=True)
            }
            self.server.setup(layout["param_keys"])
        return self.reference

    def step(self, rows: Sequence[np.ndarray], layout: Mapping[str, Any], round_idx: int) -> np.ndarray:
        """The new global state (float64, then the site count), or only the count with fewer than
        ``min_sites`` sites. ``rows``: each site's ``[state..., index, weight]`` (weight 0: failed), the
        first site's followed by the round's global state."""
        reference = self._layout(layout)
        size = sum(v.numel() for v in reference.values())
        global_state = unflatten_state(torch.from_numpy(rows[0][size + 2 :]), reference)
        taken = sorted((int(r[size]), float(r[size + 1]), r[:size]) for r in rows if float(r[size + 1]) > 0)
        if len(taken) < int(layout["min_sites"]):
            return np.array([float(len(taken))])
        states = [unflatten_state(torch.from_numpy(r), reference) for _, _, r in taken]
        names = [self.sites[i] for i, _, _ in taken]
        new = self.server.step_from_sites(global_state, states, [w for _, w, _ in taken], round_idx, sites=names)
        return flatten_state(new, float(len(taken))).numpy()
