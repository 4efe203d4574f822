"""A federated toy project: an ordinary Lightning classifier on random data, trained by three sites.

This is the whole seam a project of your own meets (``docs/own-project.md``):

* the LightningModule (:class:`ToyClassifier`) is ordinary and knows nothing of federation;
* the DataModule (:class:`ToyDataModule`) hands over one site's training loader by name
  (``site_names``, ``site_train_dataloader(site)``), and for several processes also
  ``restrict_sites(sites)``, while ``val_dataloader()`` returns one loader per site;
* the Trainer gets ``strategy=FederatedStrategy(mode=...)``.

Run it from the repository root::

    python examples/toy_federation.py                  # FedAvg, 5 rounds
    python examples/toy_federation.py --mode ciil --rounds 3

It prints each site's validation accuracy of the global model after the last round. The test
suite imports these classes (``tests/federation/toy.py``) and runs this file
(``tests/examples/test_toy_federation.py``).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fedseg import FederatedStrategy
from lightning_fedseg.federation.modes import mode_from_name


def make_site_data(sites: Sequence[str], sizes: Sequence[int], seed: int = 0, identical: bool = False):
    gen = torch.Generator().manual_seed(seed)
    data = {}
    first = None
    for site, n in zip(sites, sizes, strict=True):
        if identical and first is not None:
            data[site] = first
            continue
        x = torch.randn(n, 4, generator=gen) + 0.5 * sites.index(site)
        y = (x.sum(dim=1) > 0.5 * sites.index(site)).long()
        data[site] = (x, y)
        first = data[site]
    return data


class ToyDataModule(pl.LightningDataModule):
    """Per-site loaders through the documented protocol (`site_names`, `site_train_dataloader`)."""

    def __init__(self, sites=("a", "b", "c"), sizes=(24, 16, 8), batch_size=8, shuffle=True, identical=False):
        super().__init__()
        self.site_names = list(sites)
        self.data = make_site_data(self.site_names, sizes, identical=identical)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.requested: list[str] = []
        self.val_sites = list(self.site_names)

    def restrict_sites(self, sites) -> None:
        """Called by the strategy on torch.distributed: this process owns only these sites."""
        self.val_sites = list(sites)

    def site_train_dataloader(self, site: str) -> DataLoader:
        if site not in self.val_sites:
            raise AssertionError(f"site {site!r} is not owned by this process")
        self.requested.append(site)
        x, y = self.data[site]
        ds = TensorDataset(x, y, torch.full((len(y),), self.site_names.index(site)))
        return DataLoader(ds, batch_size=self.batch_size, shuffle=self.shuffle)

    def train_dataloader(self) -> DataLoader:
        xs = torch.cat([self.data[s][0] for s in self.site_names])
        ys = torch.cat([self.data[s][1] for s in self.site_names])
        idx = torch.cat([torch.full((len(self.data[s][1]),), i) for i, s in enumerate(self.site_names)])
        return DataLoader(TensorDataset(xs, ys, idx), batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(TensorDataset(*self._site_tensors(s, i)), batch_size=64) for i, s in enumerate(self.site_names)
        ]

    def _site_tensors(self, site, index):
        # Every process returns one loader per site (the same count on every rank); another
        # process's sites are empty here.
        x, y = self.data[site]
        if site not in self.val_sites:
            x, y = x[:0], y[:0]
        return x, y, torch.full((len(y),), index)


class ToyClassifier(pl.LightningModule):
    """An ordinary LightningModule, unaware of federation; BatchNorm makes buffers matter.

    ``scheduler(optimizer)`` may return a Lightning scheduler config (a dict with ``scheduler``,
    ``interval``, ...); ``manual=True`` trains with two optimizers under manual optimization.
    """

    def __init__(self, lr: float = 0.05, dropout: float = 0.0, scheduler=None, batchnorm: bool = True, manual=False):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 8, bias=False),
            nn.BatchNorm1d(8) if batchnorm else nn.Identity(),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(8, 2),
        )
        self.lr = lr
        self.scheduler = scheduler
        self.seen_sites: list[int] = []
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y, site = batch
        self.seen_sites.extend(site.tolist())
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        if not self.automatic_optimization:  # two optimizers: the first layer, then the rest
            for opt in self.optimizers():
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in self.optimizers():
                opt.step()
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y, _ = batch
        acc = (self.net(x).argmax(1) == y).float().mean()
        name = self.trainer.datamodule.site_names[dataloader_idx]
        self.log(f"val/{name}/acc", acc, add_dataloader_idx=False)

    def configure_optimizers(self):
        if not self.automatic_optimization:
            first = list(self.net[0].parameters())
            rest = [p for p in self.parameters() if all(p is not q for q in first)]
            return [torch.optim.Adam(first, lr=self.lr), torch.optim.SGD(rest, lr=self.lr, momentum=0.9)]
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer)}


def trainer_kwargs(tmp_path, **overrides):
    """Quiet, deterministic CPU Trainer arguments (the tests use them too); ``overrides`` win."""
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train the toy federation and return (and print) the last round's validation metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="fedavg", choices=["fedavg", "ciil", "cds"], help="collaboration mode")
    parser.add_argument("--rounds", type=int, default=5, help="collaboration rounds (Trainer epochs)")
    args = parser.parse_args(argv)
    pl.seed_everything(0, workers=True, verbose=False)
    with tempfile.TemporaryDirectory() as root:
        strategy = FederatedStrategy(mode=mode_from_name(args.mode))
        trainer = pl.Trainer(**trainer_kwargs(root, max_epochs=args.rounds, strategy=strategy))
        trainer.fit(ToyClassifier(), datamodule=ToyDataModule())
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    for name, value in sorted(metrics.items()):
        print(f"{name}: {value:.3f}")
    return metrics


if __name__ == "__main__":
    main()
