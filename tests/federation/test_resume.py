"""Resume is exact at any validation cadence: a resumed fit equals the uninterrupted one bit for bit.

``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` wherever Lightning saves: at a validated
round's ``on_validation_end``, or at ``on_train_epoch_end`` where no validation runs. Either way
the checkpoint must hold a round that is closed as a whole (global weights, server state, round
counter, mode state and history together), so that the resumed fit trains the next round.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_fedseg import CIIL, IIL, FedAvg, FederatedStrategy
from lightning_fedseg.federation.server import FedAdam
from tests.federation.toy import ToyClassifier, ToyDataModule, states_equal, trainer_kwargs

THREE = dict(sites=("a", "b", "c"), sizes=(24, 20, 12), batch_size=8, shuffle=True)
ROUNDS = 5

MODES = {
    "fedavg+FedAdam": lambda: {"mode": FedAvg(), "server": FedAdam(server_lr=0.05)},
    "ciil": lambda: {"mode": CIIL()},
    "iil": lambda: {"mode": IIL(patience=1, monitor="val/{site}/acc", mode="max")},
}


def fit(root, rounds, make, every_n, ckpt_path=None, top_k=1):
    pl.seed_everything(0)
    model = ToyClassifier()
    strategy = FederatedStrategy(seed=3, **make())
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=top_k)
    kwargs = trainer_kwargs(root, max_epochs=rounds, check_val_every_n_epoch=every_n, enable_checkpointing=True)
    trainer = pl.Trainer(strategy=strategy, callbacks=[checkpoint], **kwargs)
    trainer.fit(model, datamodule=ToyDataModule(**THREE), ckpt_path=ckpt_path)
    return strategy, model


CASES = [(1, 2), (2, 2), (2, 3), (3, 3), (3, 4)]  # (validate every n rounds, stop the first fit after)


@pytest.mark.parametrize("top_k", [1, 0], ids=["default-checkpoint", "last-only"])
@pytest.mark.parametrize(("every_n", "stopped_at"), CASES, ids=[f"every{n}-stop{s}" for n, s in CASES])
@pytest.mark.parametrize("mode", list(MODES))
def test_resumed_fit_equals_the_uninterrupted_one(tmp_path, mode, every_n, stopped_at, top_k):
    if mode == "iil" and every_n != 1:
        pytest.skip("IIL decides on every round's validation: other cadences are refused (tested in test_semantics)")
    full_strategy, full = fit(tmp_path / "full", ROUNDS, MODES[mode], every_n, top_k=top_k)
    fit(tmp_path / "part", stopped_at, MODES[mode], every_n, top_k=top_k)
    last = tmp_path / "part" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)["federation"]["completed_rounds"]
    strategy, resumed = fit(tmp_path / "part", ROUNDS, MODES[mode], every_n, ckpt_path=str(last), top_k=top_k)
    assert 0 < saved < ROUNDS
    assert strategy.completed_rounds == full_strategy.completed_rounds == ROUNDS
    assert [r["round"] for r in strategy.history] == list(range(ROUNDS))
    assert [r["sites"] for r in strategy.history] == [r["sites"] for r in full_strategy.history]
    assert states_equal(resumed.state_dict(), full.state_dict())
    assert strategy.server.state_dict().keys() == full_strategy.server.state_dict().keys()


def test_a_checkpoint_during_a_rounds_validation_is_refused(tmp_path):
    """Between the round's server step and its close (mode decision, counter), nothing is consistent to save."""
    from lightning.pytorch.callbacks import Callback

    class SaveWhileValidating(Callback):
        def on_validation_batch_end(self, trainer, *args, **kwargs):
            trainer.save_checkpoint(tmp_path / "during.ckpt")

    pl.seed_everything(0)
    strategy = FederatedStrategy(FedAvg(), server=FedAdam(server_lr=0.05))
    trainer = pl.Trainer(strategy=strategy, callbacks=[SaveWhileValidating()], **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(RuntimeError, match="inside round 0, while the module holds the round's new global weights"):
        trainer.fit(ToyClassifier(), datamodule=ToyDataModule(**THREE))
    assert not (tmp_path / "during.ckpt").exists()
