"""Byzantine sites on purpose: a seeded choice of sites and the attacks they mount, to measure robust rules.

Two halves, configured alike (``byzantine_sites`` or ``num_byzantine`` with ``seed``, ``from_round``):

* :class:`SiteAttack`, a Lightning callback, mounts the attacks a site can mount alone (sign flip,
  scaling, Gaussian, label flipping) at the site: it alters what the site contributes in
  ``on_site_end`` (or its masks in ``on_train_batch_start``), so it also works under masking and on
  several processes.
* :class:`ByzantineServer`, a server step around any rule, mounts the omniscient attacks (ALIE, IPM,
  min-max, min-sum, mimic, sign flip of the mean) where every site's state of the round is seen:
  it replaces the Byzantine sites' states by the attack's and calls the inner rule. With
  ``attack=None`` it only reports, which is how a site-side attack's metrics are logged.

Decisions:

* **The Byzantine set** is a pure function of ``(seed, site names, f)`` (:func:`byzantine_sites`),
  identical on every process; explicit names take precedence. The strategy names the federation's
  sites at setup (``setup_federation(..., sites=...)``); a step used on its own learns them from the
  first round in which every site reports (kept in its checkpoint state).
* **Honest updates** for the omniscient attacks are those of the round's non-Byzantine sites; every
  Byzantine site of the round sends the same attack vector, as in the papers.
* **Integer and boolean buffers** (``num_batches_tracked``) are never touched; float buffers (BatchNorm
  statistics) are part of the update, like parameters.
* A Byzantine site keeps the sample count it reports: weighted FedAvg gives it its usual share.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_fedseg._validation import check_int
from lightning_fedseg.federation import attacks
from lightning_fedseg.federation.modes import derive_seed
from lightning_fedseg.federation.robust import _RobustStep
from lightning_fedseg.federation.robust_updates import stack_updates
from lightning_fedseg.federation.server import ServerStep

__all__ = ["ByzantineServer", "OmniscientAttack", "SiteAttack", "SiteAttackKind", "byzantine_sites"]

State = Mapping[str, Tensor]


class SiteAttackKind(StrEnum):
    """Attacks a Byzantine site mounts alone."""

    SIGN_FLIP = "sign_flip"
    SCALING = "scaling"
    GAUSSIAN = "gaussian"
    LABEL_FLIP = "label_flip"


class OmniscientAttack(StrEnum):
    """Attacks that need the round's honest updates."""

    SIGN_FLIP = "sign_flip"
    ALIE = "alie"
    IPM = "ipm"
    MIN_MAX = "min_max"
    MIN_SUM = "min_sum"
    MIMIC = "mimic"


def byzantine_sites(
    sites: Sequence[str], num_byzantine: int = 0, names: Iterable[str] = (), seed: int = 0
) -> tuple[str, ...]:
    """The Byzantine sites, in the federation's order: ``names`` if given, else ``num_byzantine`` of
    ``sites`` drawn with ``seed`` (a pure function of its arguments, the same on every process).

    Example:
        >>> byzantine_sites(["a", "b", "c", "d"], names=["c"]), len(byzantine_sites("abcdefghij", 3, seed=1))
        (('c',), 3)
    """
    sites = [str(s) for s in sites]
    names = [str(n) for n in names]
    if names:
        unknown = sorted(set(names) - set(sites))
        if unknown:
            raise ValueError(f"Expected `byzantine_sites` to name sites of the federation {sites}, but got {unknown}.")
        return tuple(s for s in sites if s in names)
    num_byzantine = check_int("num_byzantine", num_byzantine, minimum=0)
    if num_byzantine > len(sites):
        raise ValueError(f"Expected `num_byzantine` to be at most the {len(sites)} sites, but got {num_byzantine}.")
    chosen = set(random.Random(derive_seed(seed, 26)).sample(range(len(sites)), num_byzantine))
    return tuple(s for i, s in enumerate(sites) if i in chosen)


class _Choice:
    """The shared arguments: which sites are Byzantine, from which round."""

    def __init__(self, num_byzantine: int, byzantine_sites: Sequence[str] | None, seed: int, from_round: int) -> None:
        self.num_byzantine = check_int("num_byzantine", num_byzantine, minimum=0)
        self.names = tuple(str(s) for s in byzantine_sites or ())
        self.seed = check_int("seed", seed, minimum=0)
        self.from_round = check_int("from_round", from_round, minimum=0)

    def choose(self, sites: Sequence[str]) -> tuple[str, ...]:
        return byzantine_sites(sites, self.num_byzantine, self.names, self.seed)


def _floating_keys(state: State) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


class SiteAttack(Callback):
    """Makes the chosen sites Byzantine at the site: what they contribute, or the masks they train on.

    Args:
        attack: ``"sign_flip"`` (``-Delta``), ``"scaling"`` (``gamma * Delta``), ``"gaussian"``
            (``N(0, std**2)`` in place of ``Delta``) or ``"label_flip"`` (train on altered masks).
        num_byzantine: ``f``, drawn with ``seed`` among the federation's sites.
        byzantine_sites: explicit site names instead.
        seed: the draw's seed (also the Gaussian noise's, with the round and site).
        from_round: the first round attacked.
        gamma: the scaling factor (default: the number of sites, model replacement at server_lr 1).
        std: the Gaussian attack's standard deviation.
        label_flip: ``"erase"`` or ``"invert"`` the masks.
        target_key: where the masks are in a batch: a dict key or a tuple index.
    """

    def __init__(
        self,
        attack: SiteAttackKind | str = SiteAttackKind.SIGN_FLIP,
        num_byzantine: int = 1,
        byzantine_sites: Sequence[str] | None = None,
        seed: int = 0,
        from_round: int = 0,
        gamma: float | None = None,
        std: float = 1.0,
        label_flip: attacks.LabelFlip | str = attacks.LabelFlip.ERASE,
        target_key: str | int = "target",
    ) -> None:
        try:
            self.attack = SiteAttackKind(attack)
        except ValueError:
            raise ValueError(
                f"Expected `attack` to be one of {[k.value for k in SiteAttackKind]}, but got {attack!r}."
            ) from None
        self.choice = _Choice(num_byzantine, byzantine_sites, seed, from_round)
        if gamma is not None and not math.isfinite(gamma):
            raise ValueError(f"Expected `gamma` to be finite, but got {gamma!r}.")
        if not (std >= 0 and math.isfinite(std)):
            raise ValueError(f"Expected `std` to be non-negative, but got {std!r}.")
        self.gamma, self.std = gamma, float(std)
        self.label_flip = attacks.LabelFlip(label_flip)
        self.target_key = target_key
        self.byzantine: tuple[str, ...] = ()
        self.attacked: list[tuple[int, str]] = []
        self._sites: tuple[str, ...] = ()
        self._active: str | None = None
        self._start: dict[str, Tensor] = {}

    def _byzantine(self, trainer: Any) -> tuple[str, ...]:
        sites = tuple(getattr(trainer.strategy, "sites", ()))
        if sites != self._sites:
            self._sites, self.byzantine = sites, self.choice.choose(sites)
            server = getattr(trainer.strategy, "server", None)
            if isinstance(server, ByzantineServer) and server.choice.choose(sites) != self.byzantine:
                raise ValueError(
                    f"SiteAttack chose {self.byzantine} but the ByzantineServer chose {server.choice.choose(sites)}."
                    " HINT: give both the same `num_byzantine`, `byzantine_sites` and `seed`."
                )
        return self.byzantine

    def on_site_start(self, trainer: Any, pl_module: Any, site: str, round_idx: int) -> None:
        self._active = None
        if round_idx < self.choice.from_round or site not in self._byzantine(trainer):
            return
        self._active = site
        self.attacked.append((round_idx, site))
        if self.attack is not SiteAttackKind.LABEL_FLIP:
            state = pl_module.state_dict()
            self._start = {k: state[k].detach().clone() for k in _floating_keys(state)}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._active is not None and self.attack is SiteAttackKind.LABEL_FLIP:
            attacks.flip_labels(batch[self.target_key], self.label_flip)

    @torch.no_grad()
    def on_site_end(self, trainer: Any, pl_module: Any, site: str, round_idx: int) -> None:
        if self._active != site or self.attack is SiteAttackKind.LABEL_FLIP:
            self._active = None
            return
        self._active = None
        state = pl_module.state_dict()
        keys = list(self._start)
        update = stack_updates(self._start, [state])[0]
        if self.attack is SiteAttackKind.SIGN_FLIP:
            update = attacks.sign_flip(update)
        elif self.attack is SiteAttackKind.SCALING:
            update = attacks.scaling(update, float(len(self._sites)) if self.gamma is None else self.gamma)
        else:
            seed = derive_seed(self.choice.seed, round_idx, self._sites.index(site), 26)
            update = attacks.gaussian(update, self.std, torch.Generator().manual_seed(seed))
        offset = 0
        for key in keys:
            start = self._start[key]
            part = update[offset : offset + start.numel()].view(start.shape)
            offset += start.numel()
            state[key].copy_((start.double() + part.to(start.device)).to(start.dtype))
        self._start = {}


class ByzantineServer(_RobustStep):
    """A server step around ``inner`` whose Byzantine sites send an omniscient attack (or, with
    ``attack=None``, that only reports which sites are Byzantine and how often ``inner`` selected one).

    Metrics each round: ``byzantine/count``, ``byzantine/site/<name>`` (1 for each Byzantine site of
    the round) and, for selection rules with ``last_selected`` (Krum), ``byzantine/selected``: the
    fraction of the selected sites that are Byzantine.

    Args:
        inner: the aggregation rule under attack.
        attack: ``None``, or one of ``sign_flip`` (``-mu``), ``alie``, ``ipm``, ``min_max``,
            ``min_sum``, ``mimic``.
        num_byzantine, byzantine_sites, seed, from_round: as :class:`SiteAttack`.
        z: ALIE's ``z`` (default: the paper's ``z_max`` for the round's ``n`` and ``f``).
        epsilon: IPM's ``epsilon``.
        perturbation: min-max / min-sum direction: ``"std"``, ``"unit"`` or ``"sign"``.
        tol: min-max / min-sum's binary-search tolerance on ``gamma``.
        mimic_target: which honest site (by position among the round's honest sites) is copied.
    """

    def __init__(
        self,
        inner: ServerStep,
        attack: OmniscientAttack | str | None = None,
        num_byzantine: int = 1,
        byzantine_sites: Sequence[str] | None = None,
        seed: int = 0,
        from_round: int = 0,
        z: float | None = None,
        epsilon: float = 0.1,
        perturbation: attacks.Perturbation | str = attacks.Perturbation.STD,
        tol: float = 1e-3,
        mimic_target: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(inner, ServerStep):
            raise TypeError(f"Expected `inner` to be a ServerStep, but got {type(inner).__name__}.")
        self.inner = inner
        try:
            self.attack = None if attack is None else OmniscientAttack(attack)
        except ValueError:
            raise ValueError(
                f"Expected `attack` to be None or one of {[k.value for k in OmniscientAttack]}, but got {attack!r}."
            ) from None
        self.choice = _Choice(num_byzantine, byzantine_sites, seed, from_round)
        self.z, self.epsilon, self.tol = z, float(epsilon), float(tol)
        self.perturbation = attacks.Perturbation(perturbation)
        self.mimic_target = check_int("mimic_target", mimic_target, minimum=0)
        self.num_sites = 0
        self.sites: tuple[str, ...] = ()
        self.byzantine: tuple[str, ...] = ()
        self._metrics: dict[str, float] = {}

    def setup(self, param_keys: Iterable[str]) -> None:
        super().setup(param_keys)
        self.inner.setup(param_keys)

    def setup_federation(
        self, num_sites: int, sample_rate: float, sites_per_round: int, sites: Sequence[str] = ()
    ) -> None:
        self.num_sites = num_sites
        if not self.choice.names and self.choice.num_byzantine > num_sites:
            raise ValueError(
                f"Expected `num_byzantine` to be at most the {num_sites} sites, but got {self.choice.num_byzantine}."
            )
        self.inner.setup_federation(num_sites, sample_rate, sites_per_round, sites=sites)
        if sites and not self.sites:  # the federation's sites are known: draw the Byzantine set now
            self._learn_sites(sites)

    def _learn_sites(self, sites: Sequence[str]) -> None:
        if self.sites or self.choice.names:
            return
        if not sites or (self.num_sites and len(sites) < self.num_sites):
            raise ValueError(
                f"ByzantineServer draws its {self.choice.num_byzantine} Byzantine sites from all the federation's"
                f" {self.num_sites} sites, but this round has only {list(sites)}. HINT: name them in `byzantine_sites`."
            )
        self.sites = tuple(sites)
        self.byzantine = self.choice.choose(self.sites)

    def step_from_sites(
        self,
        global_state: State,
        site_states: Sequence[State],
        weights: Sequence[float],
        round_idx: int,
        sites: Sequence[str] = (),
    ) -> dict[str, Tensor]:
        if len(sites) != len(site_states):
            raise ValueError(
                f"ByzantineServer needs the site of each state, but got {len(sites)} names for {len(site_states)}"
                " states. HINT: it must be the outermost server step (the engine names the sites)."
            )
        self._learn_sites(sites)
        byzantine = set(self.choice.names or self.byzantine)
        attacked = [i for i, s in enumerate(sites) if s in byzantine] if round_idx >= self.choice.from_round else []
        states = list(site_states)
        if self.attack is not None and attacked:
            honest = [i for i in range(len(states)) if i not in attacked]
            if not honest:
                raise ValueError(
                    f"Round {round_idx}: every site is Byzantine; an omniscient attack needs an honest one."
                )
            vector = self._attack_vector(
                stack_updates(global_state, [states[i] for i in honest]), len(states), len(attacked)
            )
            for i in attacked:
                states[i] = _with_update(global_state, states[i], vector)
        out = self.inner.step_from_sites(global_state, states, weights, round_idx, sites=sites)
        self._metrics = {"byzantine/count": float(len(attacked))}
        self._metrics.update({f"byzantine/site/{sites[i]}": 1.0 for i in attacked})
        selected = getattr(self.inner, "last_selected", None)
        if selected:
            self._metrics["byzantine/selected"] = sum(i in attacked for i in selected) / len(selected)
        return out

    def _attack_vector(self, honest: Tensor, n: int, f: int) -> Tensor:
        kind = self.attack
        if kind is OmniscientAttack.SIGN_FLIP:
            return attacks.sign_flip(honest.mean(dim=0))
        if kind is OmniscientAttack.ALIE:
            return attacks.alie(honest, attacks.alie_z(n, f) if self.z is None else self.z)
        if kind is OmniscientAttack.IPM:
            return attacks.ipm(honest, self.epsilon)
        if kind is OmniscientAttack.MIN_MAX:
            return attacks.min_max(honest, self.perturbation, self.tol)[0]
        if kind is OmniscientAttack.MIN_SUM:
            return attacks.min_sum(honest, self.perturbation, self.tol)[0]
        return attacks.mimic(honest, min(self.mimic_target, honest.shape[0] - 1))

    def metrics(self) -> dict[str, float]:
        return {**self.inner.metrics(), **self._metrics}

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "sites": list(self.sites)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        self.sites = tuple(state.get("sites", ()))
        self.byzantine = self.choice.choose(self.sites) if self.sites else ()

    def __repr__(self) -> str:
        return f"ByzantineServer({self.inner!r}, attack={self.attack and self.attack.value!r})"


def _with_update(global_state: State, state: State, update: Tensor) -> dict[str, Tensor]:
    """``global + update`` in the floating tensors; the site's own integer buffers."""
    out: dict[str, Tensor] = dict(state)
    offset = 0
    for key, reference in global_state.items():
        if not reference.is_floating_point():
            continue
        part = update[offset : offset + reference.numel()].view(reference.shape)
        offset += reference.numel()
        out[key] = (reference.detach().double() + part.to(reference.device)).to(reference.dtype)
    return out
