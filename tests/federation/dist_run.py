"""Run the toy federation with N processes (or simulated with N=1); rank 0 saves the final weights.

Usage: python -m tests.federation.dist_run MODE WORLD OUT [--kill-rank R --kill-round K] [--ckpt-dir D] [...]
Launched exactly like a user's script: Lightning starts the other ranks itself (``devices=WORLD``).
"""

from __future__ import annotations

import argparse
import os
import warnings

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_fedseg import CDS, CIIL, IIL, FedAvg, FederatedStrategy
from lightning_fedseg.federation import (
    SCAFFOLD,
    ByzantineServer,
    CoordinateMedian,
    DPFedAvg,
    FedAdam,
    FedBN,
    FedProx,
    Krum,
    SiteAttack,
)
from lightning_fedseg.federation.server import FedAvgStep
from tests.federation.toy import ToyClassifier, ToyDataModule

MODES = {
    "cds": CDS,
    "fedavg": lambda: FedAvg(local_epochs=1),
    "ciil": lambda: CIIL(epochs_per_site=1),
    "iil": lambda: IIL(patience=1, monitor="val/{site}/acc"),
}


SERVERS = {
    "fedadam": lambda: FedAdam(server_lr=0.05),
    "median": CoordinateMedian,
    "krum": lambda: Krum(0, multi=2),
    "dp": lambda: DPFedAvg(clip_norm=1.0, noise_multiplier=0.5),
    # adaptive clipping without noise: deterministic, so several processes must equal one
    # one Byzantine site drawn with seed 3 sends ALIE against the median; "watched": FedAvg that only
    # reports the Byzantine sites (beside a site-side --attack with the same draw)
    "alie_median": lambda: ByzantineServer(CoordinateMedian(), "alie", z=1.5, num_byzantine=1, seed=3),
    "watched": lambda: ByzantineServer(FedAvgStep(), None, num_byzantine=1, seed=3),
    "dp_adaptive": lambda: DPFedAvg(
        clip_norm=0.05, noise_multiplier=0.0, target_unclipped_quantile=0.5, count_stddev=0.0
    ),
}
CLIENTS = {"fedprox": lambda: FedProx(mu=0.1), "scaffold": SCAFFOLD, "fedbn": FedBN}

OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


def forbid_object_collectives() -> None:
    """Make every pickling collective raise: nothing but tensors may cross a process boundary."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pickled object collective was used")

    for name in OBJECT_COLLECTIVES:
        setattr(dist, name, refuse)


class KillRank(Callback):
    """Fault drill: the given rank dies abruptly at the start of the given round."""

    def __init__(self, rank: int, round_idx: int) -> None:
        self.rank, self.round_idx = rank, round_idx

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.global_rank == self.rank and trainer.current_epoch == self.round_idx:
            os._exit(17)


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("world", type=int)
    parser.add_argument("out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-round", type=int, default=1)
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--policy", default="keep")
    parser.add_argument("--no-batchnorm", action="store_true")
    parser.add_argument("--no-shuffle", action="store_true")
    parser.add_argument("--forbid-object-collectives", action="store_true")
    parser.add_argument("--server", choices=sorted(SERVERS), default=None)
    parser.add_argument("--client", choices=sorted(CLIENTS), nargs="*", default=())
    parser.add_argument("--masking", action="store_true")
    parser.add_argument("--attack", default=None, help="a SiteAttack kind; one site drawn with seed 3")
    args = parser.parse_args()
    if args.forbid_object_collectives:
        forbid_object_collectives()
    pl.seed_everything(0, workers=True)
    sites = tuple("abcdef"[: args.sites])
    sizes = (24, 16, 8, 16, 8, 8)[: args.sites]
    callbacks: list[Callback] = []
    if args.kill_rank is not None:
        callbacks.append(KillRank(args.kill_rank, args.kill_round))
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, save_last=True))
    if args.attack:
        callbacks.append(SiteAttack(args.attack, num_byzantine=1, seed=3, gamma=-2.0, std=0.1, target_key=1))
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.world,
        strategy=FederatedStrategy(
            MODES[args.mode](),
            server=SERVERS[args.server]() if args.server else None,
            client=[CLIENTS[name]() for name in args.client],
            masking=args.masking,
            timeout=args.timeout,
            optimizer_state=args.policy,
        ),
        max_epochs=args.rounds,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(args.ckpt_dir),
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=callbacks,
    )
    model = ToyClassifier(batchnorm=not args.no_batchnorm)
    datamodule = ToyDataModule(sites=sites, sizes=sizes, batch_size=args.batch_size, shuffle=not args.no_shuffle)
    trainer.fit(model, datamodule=datamodule, ckpt_path=args.resume)
    if trainer.is_global_zero:
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        torch.save({"state": state, "history": trainer.strategy.history}, args.out)


if __name__ == "__main__":
    main()
