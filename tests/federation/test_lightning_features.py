"""Every Trainer argument and built-in callback has a row (`lightning_features.FEATURES`), and each row a test.

The user guide's table (docs/lightning-features.md) is the generated one: tests/test_docs.py checks it.

"As in plain Lightning": a one-site federation with the feature equals plain Lightning with it, bit for
bit. A federated meaning: a test of that meaning, here or in the module named in ``ELSEWHERE``. A
refusal: the error names what the user set.
"""

from __future__ import annotations

import inspect
import operator
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import callbacks as cb
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.tuner import Tuner
from lightning_utilities.core.imports import compare_version

from lightning_fedseg import FedAvg, FederatedStrategy
from lightning_fedseg.federation import UnsupportedFeatureError
from lightning_fedseg.federation import lightning_compat as compat
from lightning_fedseg.federation.lightning_features import FEATURES, Meaning
from tests.federation.toy import ToyClassifier, ToyDataModule, states_equal, trainer_kwargs

ROOT = Path(__file__).resolve().parents[2]
ONE_SITE = dict(sites=("a",), sizes=(40,), batch_size=8, shuffle=False)
THREE_SITES = dict(sites=("a", "b", "c"), sizes=(24, 20, 12), batch_size=8, shuffle=False)
TRAINER_ARGS = [p for p in inspect.signature(pl.Trainer.__init__).parameters if p != "self"]


class Freeze(cb.BaseFinetuning):
    def freeze_before_training(self, pl_module) -> None:
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module, epoch, optimizer) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer)


class WithBackbone(ToyClassifier):
    @property
    def backbone(self):
        return self.net[0]


class Writer(cb.BasePredictionWriter):
    def write_on_batch_end(self, *args, **kwargs) -> None:
        return None


def _csv(tmp):
    return {"logger": CSVLogger(tmp, name="log")}


# Trainer arguments and callbacks that act as in plain Lightning: the overrides (or a function of the
# run's folder returning them) under which a one-site federation must equal plain Lightning.
PLAIN = {
    "accelerator": {"accelerator": "cpu"},
    "precision": {"precision": "bf16-mixed"},
    "logger": _csv,
    "callbacks": {"callbacks": [cb.LambdaCallback()]},
    "limit_val_batches": {"limit_val_batches": 1},
    "limit_test_batches": {"limit_test_batches": 1},
    "limit_predict_batches": {"limit_predict_batches": 1},
    "num_sanity_val_steps": {"num_sanity_val_steps": 2},
    "log_every_n_steps": lambda tmp: {**_csv(tmp), "log_every_n_steps": 1},
    "enable_checkpointing": {"enable_checkpointing": True},
    "enable_progress_bar": {"enable_progress_bar": True},
    "enable_model_summary": {"enable_model_summary": True},
    "gradient_clip_val": {"gradient_clip_val": 0.05},
    "gradient_clip_algorithm": {"gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"},
    "deterministic": {"deterministic": False},
    "benchmark": {"benchmark": True},
    "inference_mode": {"inference_mode": False},
    "profiler": {"profiler": "simple"},
    "detect_anomaly": {"detect_anomaly": True},
    "barebones": {"barebones": True},
    "plugins": {"plugins": [TorchCheckpointIO()]},
    "default_root_dir": {},  # every run of this module gives one
    "enable_autolog_hparams": {"enable_autolog_hparams": False},
    "model_registry": {"model_registry": None},
    "BasePredictionWriter": {"callbacks": [Writer("epoch")]},
    "Callback": {"callbacks": [cb.Callback()]},
    "Checkpoint": {"callbacks": [cb.ModelCheckpoint(save_last=True)], "enable_checkpointing": True},
    "ModelCheckpoint": {
        "callbacks": [cb.ModelCheckpoint(monitor="val/a/acc", mode="max", save_top_k=2, every_n_epochs=1)],
        "enable_checkpointing": True,
    },
    "DeviceStatsMonitor": lambda tmp: {**_csv(tmp), "callbacks": [cb.DeviceStatsMonitor()]},
    "EarlyStopping": {"callbacks": [cb.EarlyStopping(monitor="val/a/acc", mode="max", patience=1)]},
    "LambdaCallback": {"callbacks": [cb.LambdaCallback(on_train_batch_end=lambda *a: None)]},
    "LearningRateMonitor": lambda tmp: {**_csv(tmp), "callbacks": [cb.LearningRateMonitor()]},
    "ModelSummary": {"callbacks": [cb.ModelSummary(max_depth=2)], "enable_model_summary": True},
    "ProgressBar": {"callbacks": [cb.TQDMProgressBar()], "enable_progress_bar": True},
    "TQDMProgressBar": {"callbacks": [cb.TQDMProgressBar(refresh_rate=2)], "enable_progress_bar": True},
    "RichModelSummary": {"callbacks": [cb.RichModelSummary()], "enable_model_summary": True},
    "RichProgressBar": {"callbacks": [cb.RichProgressBar()], "enable_progress_bar": True},
    "SpikeDetection": {"callbacks": [cb.SpikeDetection(rtol=1e6)]},
    "ThroughputMonitor": lambda tmp: {**_csv(tmp), "callbacks": [cb.ThroughputMonitor(batch_size_fn=len)]},
}

# Federated meanings tested one-site-equal to plain Lightning here (their federated part elsewhere).
FEDERATED_EQUAL = {
    "use_distributed_sampler": {"use_distributed_sampler": False},
    "sync_batchnorm": {"sync_batchnorm": True},
    "reload_dataloaders_every_n_epochs": {"reload_dataloaders_every_n_epochs": 1},
    "GradientAccumulationScheduler": {"callbacks": [cb.GradientAccumulationScheduler({0: 1, 1: 2, 2: 3})]},
    "max_epochs": {"max_epochs": 3},
    "min_epochs": {"min_epochs": 3, "callbacks": [cb.EarlyStopping(monitor="val/a/acc", patience=0)]},
}

# Rows whose federated meaning is tested in another module.
ELSEWHERE = {
    "strategy": "test_strategy.py (every mode; the short name `federated` in test_cli.py)",
    "devices": "test_distributed.py (one process per site equals the simulation)",
    "num_nodes": "test_distributed.py",
    "limit_train_batches": "test_semantics.py::test_one_site_federation_equals_plain_lightning",
    "check_val_every_n_epoch": "test_resume.py, test_semantics.py",
    "accumulate_grad_batches": "test_semantics.py",
    "Timer": "test_semantics.py::test_epoch_timer_stops_at_a_rounds_end",
}

# Refusals: the overrides (callbacks included) and what the message must name.
REFUSED = {
    "fast_dev_run": ({"fast_dev_run": 2}, r"`fast_dev_run=2`"),
    "max_steps": ({"max_steps": 3}, r"`max_steps=3`"),
    "min_steps": ({"min_steps": 3}, r"`min_steps=3`"),
    "max_time": ({"max_time": {"seconds": 30}}, r"`max_time`"),
    "overfit_batches": ({"overfit_batches": 2}, r"`overfit_batches=2`"),
    "val_check_interval": ({"val_check_interval": 0.5}, r"`val_check_interval=0.5`"),
    "BackboneFinetuning": (
        {"callbacks": [cb.BackboneFinetuning(unfreeze_backbone_at_epoch=1)], "model": WithBackbone},
        "BackboneFinetuning",
    ),
    "BaseFinetuning": ({"callbacks": [Freeze()]}, r"`Freeze` callback: it adds parameter groups"),
    # Lightning refuses it itself for every DDP-based strategy, naming it: "The Batch size finder is not supported".
    "BatchSizeFinder": ({"callbacks": [cb.BatchSizeFinder()]}, "Batch size finder"),
    "LearningRateFinder": ({"callbacks": [cb.LearningRateFinder()]}, "LearningRateFinder"),
    "ModelPruning": ({"callbacks": [cb.ModelPruning("l1_unstructured", amount=0.1)]}, "ModelPruning"),
    "OnExceptionCheckpoint": ({"callbacks": [cb.OnExceptionCheckpoint(".")]}, "OnExceptionCheckpoint"),
    "StochasticWeightAveraging": ({"callbacks": [cb.StochasticWeightAveraging(swa_lrs=0.01)]}, "StochasticWeight"),
}
if hasattr(cb, "WeightAveraging"):  # Lightning 2.6
    REFUSED["WeightAveraging"] = ({"callbacks": [cb.WeightAveraging()]}, "WeightAveraging")
    REFUSED["EMAWeightAveraging"] = ({"callbacks": [cb.EMAWeightAveraging()]}, "EMAWeightAveraging")


def run(tmp_path, federated: bool, overrides, dm=ONE_SITE):
    overrides = dict(overrides(tmp_path) if callable(overrides) else overrides)
    callbacks = overrides.pop("callbacks", [])
    pl.seed_everything(0)
    model = overrides.pop("model", ToyClassifier)()
    kwargs = trainer_kwargs(tmp_path, max_epochs=overrides.pop("max_epochs", 2))
    kwargs.update(overrides)
    if federated:
        kwargs["strategy"] = FederatedStrategy(FedAvg(), optimizer_state="keep")
    datamodule = ToyDataModule(**dm)
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(model, datamodule=datamodule)
    return model, trainer, datamodule


def _fresh(overrides):
    """A case's overrides with fresh callback objects (a callback must not be shared by two Trainers)."""
    import copy

    return overrides if callable(overrides) else copy.deepcopy(overrides)


def test_every_trainer_argument_and_callback_has_a_row():
    names = set(TRAINER_ARGS) | set(cb.__all__)
    assert sorted(names - FEATURES.keys()) == []


def test_every_row_has_a_test():
    covered = PLAIN.keys() | FEDERATED_EQUAL.keys() | ELSEWHERE.keys() | REFUSED.keys()
    installed = set(TRAINER_ARGS) | set(cb.__all__)
    assert sorted((FEATURES.keys() & installed) - covered) == []
    for name in FEATURES.keys() & installed:
        meaning = FEATURES[name][0]
        assert (name in REFUSED) == (meaning is Meaning.REFUSED), name
        assert (name in PLAIN) <= (meaning is Meaning.PLAIN), name


def _available(name: str) -> bool:
    return name in TRAINER_ARGS or name in cb.__all__


@pytest.mark.parametrize("name", [*PLAIN, *FEDERATED_EQUAL])
def test_one_site_federation_equals_plain_lightning(tmp_path, name):
    if not _available(name):
        pytest.skip(f"{name} is not in this Lightning")
    if name == "RichProgressBar" and not compare_version("lightning", operator.ge, "2.6.0"):
        pytest.skip(
            "Lightning 2.5's RichProgressBar fails with rich >= 14 in plain Lightning too (`_live_stack.pop()`)"
        )
    case = PLAIN.get(name, FEDERATED_EQUAL.get(name))
    plain, _, _ = run(tmp_path / "plain", False, _fresh(case))
    fed, _, _ = run(tmp_path / "fed", True, _fresh(case))
    assert states_equal(fed.state_dict(), plain.state_dict())
    assert fed.seen_sites == plain.seen_sites


@pytest.mark.parametrize("name", list(REFUSED))
def test_refusals_name_what_the_user_set(tmp_path, name):
    overrides, match = REFUSED[name]
    overrides = _fresh(overrides)
    if any(isinstance(c, cb.Checkpoint) for c in overrides.get("callbacks", [])):
        overrides["enable_checkpointing"] = True
    with pytest.raises(MisconfigurationException, match=match):  # UnsupportedFeatureError, or Lightning's own
        run(tmp_path, True, overrides, dm=THREE_SITES)


def test_fast_dev_run_is_refused_without_naming_max_steps(tmp_path):
    with pytest.raises(UnsupportedFeatureError) as info:
        run(tmp_path, True, {"fast_dev_run": True}, dm=THREE_SITES)
    assert "max_steps" not in str(info.value).split("HINT")[0].split(":")[0]
    assert "fast_dev_run=True" in str(info.value)


@pytest.mark.parametrize("tune", ["scale_batch_size", "lr_find"])
def test_the_tuners_are_refused_naming_their_callback(tmp_path, tune):
    pl.seed_everything(0)
    strategy = FederatedStrategy(FedAvg())
    trainer = pl.Trainer(strategy=strategy, **trainer_kwargs(tmp_path, max_epochs=1))
    datamodule = ToyDataModule(**THREE_SITES)
    # Lightning refuses batch-size tuning itself for every DDP-based strategy, naming the tuner.
    match = "Tuning the batch size" if tune == "scale_batch_size" else "LearningRateFinder"
    with pytest.raises((UnsupportedFeatureError, ValueError), match=match):
        getattr(Tuner(trainer), tune)(ToyClassifier(), datamodule=datamodule)


def test_reloaded_dataloaders_ask_each_site_again(tmp_path):
    _, _, datamodule = run(tmp_path, True, {"reload_dataloaders_every_n_epochs": 1}, dm=THREE_SITES)
    assert sorted(datamodule.requested) == sorted(["a", "b", "c"] * 2)  # one request per site and round
    _, _, datamodule = run(tmp_path / "once", True, {}, dm=THREE_SITES)
    assert sorted(datamodule.requested) == ["a", "b", "c"]


def test_barebones_keeps_the_round_records(tmp_path):
    pl.seed_everything(0)
    strategy = FederatedStrategy(FedAvg())
    trainer = pl.Trainer(strategy=strategy, barebones=True, **{**trainer_kwargs(tmp_path, max_epochs=2)})
    trainer.fit(ToyClassifier(), datamodule=ToyDataModule(**THREE_SITES))
    assert [r["round"] for r in strategy.history] == [0, 1]


def test_sync_batchnorm_across_processes_is_refused(tmp_path, monkeypatch):
    from lightning.pytorch.plugins import TorchSyncBatchNorm

    strategy = FederatedStrategy(FedAvg())
    strategy._layer_sync = TorchSyncBatchNorm()
    monkeypatch.setattr(FederatedStrategy, "is_multiprocess", property(lambda self: True))
    with pytest.raises(UnsupportedFeatureError, match="sync_batchnorm=True"):
        strategy.setup(pl.Trainer(**trainer_kwargs(tmp_path)))


def test_dataloader_iter_training_steps_are_refused(tmp_path):
    class IterStep(ToyClassifier):
        def training_step(self, dataloader_iter):
            batch, _, _ = next(dataloader_iter)
            return super().training_step(batch, 0)

    pl.seed_everything(0)
    trainer = pl.Trainer(strategy=FederatedStrategy(FedAvg()), **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(UnsupportedFeatureError, match="dataloader_iter"):
        trainer.fit(IterStep(), datamodule=ToyDataModule(**THREE_SITES))


def test_the_self_check_names_the_version_and_the_range(monkeypatch):
    compat.check_lightning()  # the installed Lightning has everything
    from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization

    monkeypatch.delattr(_AutomaticOptimization, "_make_zero_grad_fn")
    with pytest.raises(compat.LightningVersionError) as info:
        compat.check_lightning()
    message = str(info.value)
    assert f"Lightning {pl.__version__} is installed" in message
    assert ">=2.5,<2.7" in message and "_AutomaticOptimization._make_zero_grad_fn" in message


def test_the_declared_range_is_setup_cfg_s():
    setup = (ROOT / "setup.cfg").read_text()
    assert f"lightning{','.join(compat.SUPPORTED)}" in setup
    assert compat.in_supported_range()


def test_gradient_accumulation_scheduler_windows_stay_within_each_site(tmp_path):
    """The schedule is by round; each site's partial window is stepped at the site's end."""
    steps: list[int] = []

    class Count(cb.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            steps.append(trainer.current_epoch)

    overrides = {"callbacks": [cb.GradientAccumulationScheduler({0: 1, 1: 2}), Count()], "max_epochs": 2}
    run(tmp_path, True, overrides, dm=THREE_SITES)  # 3, 3 and 2 batches per site
    assert steps.count(0) == 8  # every batch steps
    assert steps.count(1) == 2 + 2 + 1  # windows of 2 within each site: 3 -> 2 steps, 3 -> 2, 2 -> 1


def test_torch_is_seeded_per_site(tmp_path):
    """`deterministic` runs are reproducible: the same fit twice gives the same weights."""
    first, _, _ = run(tmp_path / "1", True, {}, dm=THREE_SITES)
    second, _, _ = run(tmp_path / "2", True, {}, dm=THREE_SITES)
    assert states_equal(first.state_dict(), second.state_dict())
