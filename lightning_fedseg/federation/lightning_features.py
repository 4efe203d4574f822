"""Every Trainer argument, built-in callback and tuner of the supported Lightning under the federation.

Each entry says one of three things (:class:`Meaning`): the feature acts **as in plain Lightning**
(a one-site federation equals plain Lightning with it, bit for bit), it has a stated **federated**
meaning, or it is **refused** at setup with an error that names what the user set. The README's
table "Lightning features under the federation" is :func:`markdown_table` of :data:`FEATURES`;
``tests/federation/test_lightning_features.py`` checks that every argument of the installed
``Trainer`` and every name of ``lightning.pytorch.callbacks.__all__`` has an entry, and tests each
entry. Refusals are made by :func:`~lightning_fedseg.federation.semantics.check_trainer`.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["FEATURES", "Meaning", "markdown_table"]


class Meaning(StrEnum):
    PLAIN = "as in plain Lightning"
    FEDERATED = "federated meaning"
    REFUSED = "refused"


_PLAIN = Meaning.PLAIN
_FED = Meaning.FEDERATED
_NO = Meaning.REFUSED

FEATURES: dict[str, tuple[Meaning, str]] = {
    # ------------------------------------------------------------------ Trainer arguments
    "accelerator": (_PLAIN, "the device every site trains on"),
    "strategy": (_FED, "`FederatedStrategy` (or its short name `federated`) is what makes the fit federated"),
    "devices": (_FED, "one process per site (or several sites per process) on torch.distributed; `cds` is plain DDP"),
    "num_nodes": (_FED, "as `devices`: processes on several machines, each training its own sites"),
    "precision": (
        _PLAIN,
        "`bf16-mixed`, `16-mixed` (GradScaler): a failed site's or idle process's batches skip the step",
    ),
    "logger": (_PLAIN, "also receives `federation/*` figures each round"),
    "callbacks": (_PLAIN, "see the callbacks below; `on_site_start`/`on_site_end` are called where defined"),
    "fast_dev_run": (
        _NO,
        "it stops after n optimizer steps, inside a round's first site."
        " Use `max_epochs=1, limit_train_batches=n, limit_val_batches=n`",
    ),
    "max_epochs": (_FED, "counts rounds"),
    "min_epochs": (_FED, "counts rounds"),
    "max_steps": (_NO, "it would stop training inside a round. Use `max_epochs` (rounds)"),
    "min_steps": (_NO, "it counts optimizer steps of every site together. Use `min_epochs` (rounds)"),
    "max_time": (_NO, "it would stop inside a round. Use `Timer(duration=..., interval='epoch')`"),
    "limit_train_batches": (_FED, "limits each site's local epoch (int or fraction)"),
    "limit_val_batches": (_PLAIN, "limits each site's validation loader"),
    "limit_test_batches": (_PLAIN, "testing is not federated"),
    "limit_predict_batches": (_PLAIN, "prediction is not federated"),
    "overfit_batches": (
        _NO,
        "it replaces the training loader's sampler, which the federation's sites do not use."
        " Use `limit_train_batches` with a site DataModule that does not shuffle",
    ),
    "val_check_interval": (
        _NO,
        "other than 1.0 (int, float or time): validation would close a round mid-way. Use `check_val_every_n_epoch`",
    ),
    "check_val_every_n_epoch": (
        _FED,
        "validates every N rounds (resume is exact at any N); refused for IIL, which decides on every round's"
        " validation",
    ),
    "num_sanity_val_steps": (_PLAIN, "the sanity check is not a round"),
    "log_every_n_steps": (_PLAIN, "steps count over the sites of a round"),
    "enable_checkpointing": (_PLAIN, "on the global model after each round"),
    "enable_progress_bar": (_PLAIN, "`FederatedProgressBar` / `FederatedRichProgressBar` name the round and site"),
    "enable_model_summary": (_PLAIN, ""),
    "accumulate_grad_batches": (
        _FED,
        "per site: gradients are zeroed when a site starts, a window never spans two sites, and a partial"
        " window is stepped at the site's (local epoch's) end",
    ),
    "gradient_clip_val": (_PLAIN, "per optimizer step"),
    "gradient_clip_algorithm": (_PLAIN, "per optimizer step"),
    "deterministic": (_PLAIN, "data order and dropout are seeded from (seed, round, site)"),
    "benchmark": (_PLAIN, ""),
    "inference_mode": (_PLAIN, "validation and testing only"),
    "use_distributed_sampler": (
        _FED,
        "sites' loaders are never sharded (a process trains whole sites); `cds` on several processes as plain DDP",
    ),
    "profiler": (_PLAIN, ""),
    "detect_anomaly": (_PLAIN, ""),
    "barebones": (_PLAIN, "the round's figures are then not logged (`strategy.history` keeps them)"),
    "plugins": (_PLAIN, "precision and checkpoint-IO plugins, cluster environments"),
    "sync_batchnorm": (
        _FED,
        "no effect in one process, as on one device; refused across processes, where it would train the"
        " processes' sites together. `FedBN` keeps statistics per site",
    ),
    "reload_dataloaders_every_n_epochs": (_FED, "each site's training loader is requested again every N rounds"),
    "default_root_dir": (_PLAIN, ""),
    "enable_autolog_hparams": (_PLAIN, "Lightning 2.6"),
    "model_registry": (_PLAIN, "Lightning 2.6"),
    # ------------------------------------------------------------------ built-in callbacks
    "BackboneFinetuning": (_NO, "as `BaseFinetuning`"),
    "BaseFinetuning": (_NO, "it adds parameter groups to the optimizer, which each site's stored state lacks"),
    "BasePredictionWriter": (_PLAIN, "prediction is not federated"),
    "BatchSizeFinder": (
        _NO,
        "its trials (and `Tuner.scale_batch_size`'s) would stop inside a round; Lightning itself refuses it with"
        " DDP-based strategies. Tune on one site's data with a plain Trainer",
    ),
    "Callback": (_PLAIN, "each hook sees the site's own weights from a site's first batch on"),
    "Checkpoint": (_PLAIN, "as `ModelCheckpoint`"),
    "DeviceStatsMonitor": (_PLAIN, ""),
    "EarlyStopping": (_PLAIN, "on the round's global metrics"),
    "GradientAccumulationScheduler": (_FED, "the schedule is by round; each window stays within a site"),
    "LambdaCallback": (_PLAIN, ""),
    "LearningRateFinder": (
        _NO,
        "its trials (and `Tuner.lr_find`'s) would stop inside a round. Tune on one site's data with a plain Trainer",
    ),
    "LearningRateMonitor": (_PLAIN, "the round's learning rate (step schedules: the site's)"),
    "ModelCheckpoint": (
        _PLAIN,
        "`every_n_epochs`, `save_last`, `save_top_k`, `monitor` on the global model after each round;"
        " `every_n_train_steps`, `train_time_interval` refused (they would save one site's weights)",
    ),
    "ModelPruning": (_NO, "it changes the model's state keys at round ends. Prune the final global model"),
    "ModelSummary": (_PLAIN, ""),
    "OnExceptionCheckpoint": (
        _NO,
        "a failure inside a round would save one site's weights. `ModelCheckpoint(save_last=True)` keeps the"
        " last round",
    ),
    "ProgressBar": (_PLAIN, ""),
    "RichModelSummary": (_PLAIN, ""),
    "RichProgressBar": (_PLAIN, "`FederatedRichProgressBar` also names the round and site"),
    "StochasticWeightAveraging": (
        _NO,
        "it averages and re-normalizes inside the training loop across sites. Average global models after fit",
    ),
    "SpikeDetection": (_PLAIN, "its running mean spans the sites of a round"),
    "ThroughputMonitor": (_PLAIN, ""),
    "Timer": (_FED, "`interval='epoch'` stops at a round's end; `interval='step'` (and `max_time`) refused"),
    "TQDMProgressBar": (_PLAIN, "`FederatedProgressBar` also names the round and site"),
    "EMAWeightAveraging": (_NO, "as `WeightAveraging` (Lightning 2.6)"),
    "WeightAveraging": (
        _NO,
        "it averages the weights after optimizer steps, i.e. one site's local weights (Lightning 2.6)",
    ),
}


def markdown_table() -> str:
    """The README's table of :data:`FEATURES` (Trainer arguments, then callbacks)."""
    lines = ["| feature | under the federation |", "|---|---|"]
    for name, (meaning, detail) in FEATURES.items():
        label = f"`{name}`" if name[0].islower() else f"`{name}` callback"
        text = meaning.value if not detail else f"{meaning.value}: {detail}"
        lines.append(f"| {label} | {text} |")
    return "\n".join(lines)
