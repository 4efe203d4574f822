"""Patient-level differential privacy inside each institution: DP-SGD with per-patient clipping.

A client step (chosen in YAML beside FedProx and SCAFFOLD as the strategy's ``client:``) that turns
each site's local training into DP-SGD where the record is the *patient*: the data module samples
patients by Poisson sampling (``patient_sample_rate`` ``q``, ``slices_per_patient`` ``m``); every
step each sampled patient's gradient (of its own loss over its slices of the batch) is clipped to
``max_grad_norm`` ``C``, Gaussian noise ``N(0, sigma^2 C^2)`` is added to the sum, and the result, divided by
``q N`` (``N`` the site's training patients), replaces the gradient before the optimizer steps
(see :mod:`.patient_clipping` for the math). Everything after it (gradient clipping, the
optimizer, FedAvg, DP-FedAvg, masking) is post-processing.

Each institution has its own accountant (opacus's RDP or PRV) over all its steps in all rounds; it
lives in the site's state, on the site's process and in its checkpoint shard, so a resumed fit
continues it exactly. ``privacy/<site>/epsilon`` (at ``delta``) is logged every round.

Decisions:
    * The record is the patient (a training case). Slice-level DP converted to patients by group
      privacy multiplies epsilon by the slices per patient (20 to 155): vacuous.
    * Refused, with one error naming every problem: batch norm (it mixes patients and its running
      statistics are not private), the ``batch`` loss unit (a Dice over the whole batch couples
      patients, so a per-patient gradient does not exist), FedBN (normalization layers that never
      leave the site are still trained on its data, but nothing else changes: refused to keep one
      meaning), ``accumulate_grad_batches > 1`` (several Poisson draws in one step break the
      accounting), ``16-mixed`` (the gradients are still multiplied by the loss scale when
      clipped), and a data module without patient sampling.
    * The module's loss is a *mean* over the batch's units (patients, or slices): the step
      multiplies the per-patient sums back by the number of units, so each patient's gradient is
      the gradient of its own loss.
    * Each patient's gradient is computed by its own forward and backward pass over its slices
      (``module(image)`` and ``module.loss(logits, target, case_id)``), not by opacus's per-sample
      hooks: those wrap every layer's output in a backward hook, and timm's residual blocks add to
      that output in place (``x += shortcut``), which autograd refuses. It is exact for any
      architecture and needs memory for one patient at a time; the cost is that the batch's own
      forward and backward (Lightning's training step, whose gradient is replaced) is computed too:
      about twice the compute of a plain step (RESULTS.md has the figures).
    * An empty Poisson batch still steps: the update is the noise alone, and the step is counted.
    * ``noise_multiplier`` may be given; else it is calibrated (opacus's ``get_noise_multiplier``)
      so that ``target_epsilon`` is reached after the planned steps: ``max_epochs`` rounds of
      ``local_epochs`` epochs of ``round(1/q)`` steps, as if the site trained in every round (with
      ``fraction < 1`` it trains in fewer, and spends less).
    * With ``target_epsilon`` a site stops before the step that would take its epsilon past it and
      says so (a warning); from then on its steps change nothing (the gradients are dropped, so
      the optimizer skips them) and its accountant stops. Its weights still take part in FedAvg.
    * The noise is drawn on the CPU from fresh operating-system randomness, one generator per site
      visit; ``noise_seed`` (tests and reproductions only: it removes the privacy) derives it from
      (seed, site, steps so far), so a resumed fit draws what an uninterrupted one would.
    * Not privatized: what the site logs locally (``train/loss``, ``train/dice``) and anything a
      callback reads before the optimizer step (``on_after_backward`` sees the raw gradient). The
      global model and everything derived from it are private.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fedseg.federation.client_steps import ClientStep, State
from lightning_fedseg.federation.modes import derive_seed
from lightning_fedseg.federation.patient_clipping import clip_and_sum, noised_mean, patient_index

__all__ = ["PatientDPSGD", "clipped_patient_sum", "epsilon_of"]


def clipped_patient_sum(
    module: nn.Module, batch: Mapping[str, Any], max_grad_norm: float
) -> tuple[list[Tensor], Tensor]:
    """The sum over the batch's patients of each patient's gradient clipped to ``max_grad_norm``.

    A patient's gradient is that of its own loss, ``module.loss(module(image), target, case_id)``
    over its slices alone, times its number of loss units (1 patient, or its slices with the
    ``slice`` unit), so that the module's mean over units becomes the sum over patients.

    Returns:
        One tensor per trainable parameter (in ``module.parameters()`` order) and each patient's
        norm before clipping (in order of first appearance in the batch).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    case_ids = [str(c) for c in batch["case_id"]]
    index, num_patients = patient_index(case_ids, batch["image"].device)
    total = [torch.zeros_like(p) for p in params]
    norms = []
    per_slice = str(getattr(module, "loss_unit", "patient")) == "slice"
    for patient in range(num_patients):
        rows = torch.nonzero(index == patient).flatten()
        ids = [case_ids[i] for i in rows.tolist()]
        with torch.enable_grad():
            loss = module.loss(module(batch["image"][rows]), batch["target"][rows], ids)  # type: ignore[operator]
            loss = loss * (len(ids) if per_slice else 1)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True))
        clipped, norm = clip_and_sum([g.unsqueeze(0) for g in grads], max_grad_norm)
        for acc, g in zip(total, clipped, strict=True):
            acc.add_(g)
        norms.append(norm)
    return total, torch.cat(norms) if norms else torch.zeros(0)


def epsilon_of(history: Sequence[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of a history ``[(noise_multiplier, sample_rate, steps), ...]`` (opacus).

    Example:
        >>> round(epsilon_of([(1.0, 0.1, 100)], 1e-5), 2)
        7.9
    """
    if not history or all(int(h[2]) == 0 for h in history):
        return 0.0
    if any(float(h[0]) == 0 for h in history):
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant

    counter = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    counter.history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    return float(counter.get_epsilon(delta=delta))


class PatientDPSGD(ClientStep):
    """DP-SGD inside each site with per-patient clipping, one opacus accountant per site.

    Args:
        max_grad_norm: ``C``, the L2 bound of one patient's gradient (all parameters together).
        noise_multiplier: ``sigma``; the noise on the sum of clipped gradients has std ``sigma C``.
            ``None``: calibrated from ``target_epsilon`` and the planned steps. ``0``: clipping
            without noise (no privacy, epsilon infinite), to measure what clipping alone costs.
        target_epsilon: each site stops before exceeding it (``None``: never stops).
        delta: the ``delta`` of epsilon (e.g. below 1 / the patients of the largest site).
        accountant: ``"rdp"`` or ``"prv"`` (opacus).
        noise_seed: seed the noise, for tests and reproductions only. Default: fresh randomness.
    """

    name = "patient_dp"

    def __init__(
        self,
        max_grad_norm: float = 1.0,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float = 1e-5,
        accountant: str = "rdp",
        noise_seed: int | None = None,
    ) -> None:
        for name, value in (("max_grad_norm", max_grad_norm), ("delta", delta)):
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ValueError(f"Expected `{name}` to be positive, but got {value!r}.")
        if noise_multiplier is not None and not (isinstance(noise_multiplier, int | float) and noise_multiplier >= 0):
            raise ValueError(f"Expected `noise_multiplier` to be non-negative, but got {noise_multiplier!r}.")
        if target_epsilon is not None and not (isinstance(target_epsilon, int | float) and target_epsilon > 0):
            raise ValueError(f"Expected `target_epsilon` to be positive, but got {target_epsilon!r}.")
        if noise_multiplier is None and target_epsilon is None:
            raise ValueError(
                "Expected a `noise_multiplier` or a `target_epsilon`, but got neither."
                " HINT: set target_epsilon (e.g. 8.0) to calibrate the noise to the planned rounds."
            )
        if accountant not in ("rdp", "prv"):
            raise ValueError(f"Expected `accountant` to be 'rdp' or 'prv', but got {accountant!r}.")
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.noise_seed = noise_seed
        self.histories: dict[str, list[list[float]]] = {}  # per site: [sigma, q, steps]
        self.stopped: set[str] = set()
        self._sites: tuple[str, ...] = ()
        self._sampling: dict[str, tuple[float, int]] = {}
        self._site: str | None = None
        self._allowed = 0
        self._generator = torch.Generator()
        self._batch: Any = None

    # ------------------------------------------------------------------ setup
    @property
    def sigma(self) -> float:
        assert self.noise_multiplier is not None, "setup() calibrates the noise multiplier"
        return self.noise_multiplier

    def setup(self, module: nn.Module, sites: Sequence[str]) -> None:
        from lightning_fedseg.federation.client_steps import FedBN
        from lightning_fedseg.federation.semantics import UnsupportedFeatureError

        self._sites = tuple(sites)
        trainer: Any = getattr(module, "trainer", None)
        strategy = getattr(trainer, "strategy", None)
        datamodule: Any = getattr(trainer, "datamodule", None)
        problems: list[str] = []
        if any(isinstance(step, FedBN) for step in getattr(strategy, "clients", ())):
            problems.append("FedBN keeps normalization layers per site. HINT: drop FedBN; use group norm.")
        if trainer is not None and trainer.accumulate_grad_batches > 1:
            problems.append(
                f"`accumulate_grad_batches={trainer.accumulate_grad_batches}` would put several Poisson draws into"
                " one step. HINT: leave it at 1."
            )
        if trainer is not None and str(trainer.precision) == "16-mixed":
            problems.append(
                "`precision='16-mixed'` clips gradients still multiplied by the loss scale."
                " HINT: use 'bf16-mixed' or 32."
            )
        batch_norms = sorted(n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        if batch_norms:
            problems.append(
                f"batch norm mixes patients ({batch_norms[:3]}{' ...' if len(batch_norms) > 3 else ''})."
                " HINT: set `model.init_args.normalization: group` (or instance)."
            )
        unit = str(getattr(module, "loss_unit", "batch"))
        if not callable(getattr(module, "loss", None)):
            problems.append("the module has no `loss(logits, target, case_id)` to compute one patient's loss with.")
        elif unit not in ("slice", "patient"):
            problems.append(
                f"the loss unit is {unit!r}: a loss over the whole batch couples patients."
                " HINT: set `model.init_args.loss_unit: patient`."
            )
        if getattr(datamodule, "patient_sample_rate", None) is None or not hasattr(datamodule, "site_patient_sampler"):
            problems.append(
                "the data module does not sample patients. HINT: set `data.init_args.patient_sample_rate` (e.g. 0.1)."
            )
        if problems:
            raise UnsupportedFeatureError("PatientDPSGD cannot train privately with:\n- " + "\n- ".join(problems))
        if self.noise_multiplier is None:
            self.noise_multiplier = self._calibrate(trainer, strategy, float(datamodule.patient_sample_rate))

    def _calibrate(self, trainer: Any, strategy: Any, sample_rate: float) -> float:
        from opacus.accountants.utils import get_noise_multiplier

        from lightning_fedseg.data.patient_sampling import steps_per_epoch

        rounds = getattr(trainer, "max_epochs", None)
        if rounds is None or rounds < 1:
            raise ValueError(
                "Calibrating `noise_multiplier` to `target_epsilon` needs the planned rounds, but `max_epochs` is"
                f" {rounds!r}. HINT: set trainer.max_epochs, or give `noise_multiplier`."
            )
        local_epochs = int(getattr(getattr(strategy, "mode", None), "local_epochs", 1))
        steps = rounds * local_epochs * steps_per_epoch(sample_rate)
        assert self.target_epsilon is not None
        return float(
            get_noise_multiplier(
                target_epsilon=self.target_epsilon,
                target_delta=self.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=self.accountant,
            )
        )

    # ------------------------------------------------------------------ accounting
    def steps(self, site: str) -> int:
        """Steps the site has taken (all rounds)."""
        return int(sum(h[2] for h in self.histories.get(site, [])))

    def epsilon(self, site: str, extra_steps: int = 0) -> float:
        """The site's epsilon at ``delta`` after its steps so far (and ``extra_steps`` more)."""
        history = [list(h) for h in self.histories.get(site, [])]
        if extra_steps:
            q = self._sampling[site][0]
            history.append([self.sigma, q, extra_steps])
        return epsilon_of(history, self.delta, self.accountant)

    def _steps_allowed(self, site: str, planned: int) -> int:
        """How many of ``planned`` more steps keep the site within ``target_epsilon`` (bisection)."""
        if self.target_epsilon is None or site in self.stopped:
            return planned if site not in self.stopped else 0
        if self.epsilon(site, planned) <= self.target_epsilon:
            return planned
        low, high = 0, planned  # epsilon(low) fits, epsilon(high) does not
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self.epsilon(site, mid) <= self.target_epsilon else (low, mid)
        return low

    def _count_step(self, site: str) -> None:
        history = self.histories.setdefault(site, [])
        q = self._sampling[site][0]
        if history and history[-1][:2] == [self.sigma, q]:
            history[-1][2] += 1
        else:
            history.append([self.sigma, q, 1])

    # ------------------------------------------------------------------ the site's training
    def begin_site(self, site: str, module: nn.Module, global_state: State, site_state: Any | None) -> None:
        from lightning_fedseg.data.patient_sampling import steps_per_epoch

        trainer: Any = getattr(module, "trainer", None)
        if site not in self._sampling:
            sampler = trainer.datamodule.site_patient_sampler(site)
            self._sampling[site] = (sampler.sample_rate, sampler.num_patients)
        if site_state is not None:
            self.histories[site] = [list(h) for h in site_state["history"]]
            if site_state["stopped"]:
                self.stopped.add(site)
        self._site = site
        local_epochs = int(getattr(getattr(trainer.strategy, "mode", None), "local_epochs", 1))
        self._allowed = self._steps_allowed(site, local_epochs * steps_per_epoch(self._sampling[site][0]))
        if self.noise_seed is None:
            seed = secrets.randbits(63)
        else:
            seed = derive_seed(self.noise_seed, self._site_number(site), self.steps(site))
        self._generator = torch.Generator().manual_seed(seed)

    def _site_number(self, site: str) -> int:
        return self._sites.index(site) if site in self._sites else len(self._sites)

    def on_batch(self, module: nn.Module, batch: Any) -> None:
        self._batch = batch

    def before_optimizer_step(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        site = self._site
        assert site is not None and self._batch is not None, "begin_site and on_batch come first"
        params = [p for p in module.parameters() if p.requires_grad]
        if self._allowed <= 0:
            if site not in self.stopped:
                self.stopped.add(site)
                warnings.warn(  # on the site's own process, whichever rank it is
                    f"Site {site!r} stops training: one more step would take its epsilon past target_epsilon="
                    f"{self.target_epsilon} (it is {self.epsilon(site):.3g} at delta={self.delta}).",
                    UserWarning,
                    stacklevel=2,
                )
            for p in params:  # the optimizer skips parameters without a gradient
                p.grad = None
            self._batch = None
            return
        assert self._batch is not None
        clipped, _ = clipped_patient_sum(module, self._batch, self.max_grad_norm)
        self._batch = None
        q, num_patients = self._sampling[site]
        noised = noised_mean(clipped, self.sigma * self.max_grad_norm, q * num_patients, self._generator)
        for p, grad in zip(params, noised, strict=True):
            p.grad = grad.to(p.dtype)
        self._count_step(site)
        self._allowed -= 1

    def end_site(self, site: str, module: nn.Module) -> tuple[Any | None, dict[str, Tensor] | None]:
        self._site = None
        history = [list(h) for h in self.histories.get(site, [])]
        return {"history": history, "stopped": site in self.stopped}, None

    def metrics(self) -> dict[str, float]:
        return {f"privacy/{site}/epsilon": self.epsilon(site) for site in self.histories}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing: each site's accountant comes back with its own site state."""

    def __repr__(self) -> str:
        return (
            f"PatientDPSGD(max_grad_norm={self.max_grad_norm}, noise_multiplier={self.noise_multiplier},"
            f" target_epsilon={self.target_epsilon})"
        )
