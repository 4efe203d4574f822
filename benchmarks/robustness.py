"""Robust aggregation under attack: rules x attacks x f, held-out Dice, the worst case and the benign cost.

Every run is FedAvg's round (the CPU U-Net, Adam 5e-4 reset every round, 1 local epoch, every
institution in every round) with one aggregation rule, ``f`` Byzantine institutions drawn with the
run's seed (:func:`~lightning_fedseg.federation.byzantine.byzantine_sites`) and one attack from
round 0. Site-side attacks run at the site (:class:`SiteAttack`); omniscient ones at the server
(:class:`ByzantineServer`), which also reports how often Krum selected a Byzantine site.

Reported per rule and ``f``: held-out Dice of the last round's global model (mean over seeds) with
no attack, under each attack, the worst case over the attacks, and the benign cost (FedAvg's
held-out Dice without attack minus the rule's, same seeds); seconds per round and peak resident
memory of the process. The global model of the last round is tested, not the best-validation
round: under attack the best round may be one before the damage, and a consortium deploys the
model it has.

Parameters: the defender knows ``f`` (Krum, multi-Krum ``m = n - f``, the trimmed mean's
``beta = f / n``, nearest-neighbour mixing), as the papers assume. The radii, norm bounding's
``max_norm`` and centered clipping's ``radius``, have no scale-free default: each is chosen from a
grid (multiples of the median honest update norm of a clean FedAvg round, measured first) by the
best worst-case *validation* Dice over the attacks on seed 0, and then run on every seed; the
choice is stated in the table. Bucketing wraps centered clipping (the pairing of Karimireddy et al.
2022) with the radius chosen for centered clipping, bucket size 2; mixing wraps the coordinate
median.

Each finished run is ``<out>/runs/<key>.json``; a run that exists is not repeated (an interrupted
benchmark resumes), and the tables are assembled from whatever runs are finished.

Usage::

    python benchmarks/robustness.py --preset tiny            # 2 CPU cores, single-threaded, in the background
    python benchmarks/robustness.py --preset smoke           # seconds, for the tests
    python benchmarks/robustness.py --preset tiny --report   # tables of the finished runs
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch

from benchmarks.common import (
    REPO_ROOT,
    finished,
    model_kwargs,
    provenance,
    quiet,
    set_threads,
    trainer_defaults,
    write_json,
    write_report,
)
from lightning_fedseg import BrainTumorSegmentation, FedAvg, FederatedDataModule, FederatedStrategy
from lightning_fedseg.federation import (
    Bucketing,
    ByzantineServer,
    CenteredClipping,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    NearestNeighborMixing,
    NormBounding,
    ServerStep,
    SiteAttack,
    TrimmedMean,
    byzantine_sites,
)
from lightning_fedseg.federation.robust_updates import UpdateRule
from lightning_fedseg.federation.server import FedAvgStep


@dataclass(frozen=True)
class Preset:
    name: str
    synthetic_subjects: int | None
    synthetic_shape: tuple[int, int, int]
    batch_size: int
    rounds: int
    seeds: tuple[int, ...]
    settings: tuple[tuple[str, int], ...]  # (split, f)
    attacks: tuple[str, ...]
    grid: tuple[float, ...]  # radii as multiples of the median honest update norm


ALL_ATTACKS = ("none", "sign_flip", "scaling", "gaussian", "label_flip", "alie", "alie_z1.5", "ipm_0.1", "ipm_n",
               "min_max", "min_sum", "mimic")  # fmt: skip
PRESETS = {
    "smoke": Preset("smoke", 24, (16, 16, 8), 8, 2, (0,), (("sim6", 1),), ("none", "sign_flip", "label_flip", "alie"),
                    (1.0,)),
    "tiny": Preset("tiny", 60, (16, 16, 8), 4, 6, (0, 1, 2), (("real", 3),),
                   ("none", "sign_flip", "gaussian", "label_flip", "alie", "alie_z1.5", "ipm_0.1", "min_max"),
                   (0.5, 2.0)),
    "quick": Preset("quick", None, (48, 48, 32), 16, 8, (0, 1, 2),
                    (("real", 1), ("real", 2), ("real", 3), ("sim32", 8)), ALL_ATTACKS, (0.5, 1.0, 2.0)),
}  # fmt: skip

RULES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "norm_bounding", "centered_clipping",
         "geometric_median", "bucketing", "nnm")  # fmt: skip
TUNED = ("norm_bounding", "centered_clipping")
LABELS = {
    "fedavg": "FedAvg",
    "median": "coordinate median",
    "trimmed_mean": "trimmed mean beta=f/n",
    "krum": "Krum f",
    "multi_krum": "multi-Krum f, m=n-f",
    "norm_bounding": "norm bounding M",
    "centered_clipping": "centered clipping tau",
    "geometric_median": "geometric median (RFA)",
    "bucketing": "bucketing s=2 + CC tau",
    "nnm": "NNM f + median",
}


def num_sites(split: str) -> int:
    return int(split[3:]) if split.startswith("sim") else 10


def make_rule(rule: str, n: int, f: int, radius: float | None) -> ServerStep:
    if rule == "fedavg":
        return FedAvgStep()
    if rule == "median":
        return CoordinateMedian()
    if rule == "trimmed_mean":
        return TrimmedMean(beta=f / n)
    if rule == "krum":
        return Krum(num_byzantine=f)
    if rule == "multi_krum":
        return Krum(num_byzantine=f, multi=n - f)
    if rule == "geometric_median":
        return GeometricMedian()
    if rule == "nnm":
        return NearestNeighborMixing(CoordinateMedian(), num_byzantine=f)
    assert radius is not None, rule
    if rule == "norm_bounding":
        return NormBounding(max_norm=radius)
    if rule == "centered_clipping":
        return CenteredClipping(radius=radius)
    if rule == "bucketing":
        return Bucketing(CenteredClipping(radius=radius), bucket_size=2)
    raise KeyError(f"Unknown rule {rule!r}; expected one of {RULES}.")


def attack_parts(attack: str, n: int, f: int, seed: int, norm: float) -> tuple[dict[str, Any], SiteAttack | None]:
    """``(ByzantineServer arguments, SiteAttack or None)``: the same Byzantine set for both."""
    choice = {"num_byzantine": f, "seed": seed}
    site = {"sign_flip": {}, "scaling": {"gamma": float(n)}, "gaussian": {"std": norm}, "label_flip": {}}
    if attack == "none":
        return {"attack": None, "num_byzantine": 0}, None
    if attack in site:
        return {"attack": None, **choice}, SiteAttack(attack, **choice, **site[attack])
    server = {
        "alie": {"attack": "alie"},
        "alie_z1.5": {"attack": "alie", "z": 1.5},
        "ipm_0.1": {"attack": "ipm", "epsilon": 0.1},
        "ipm_n": {"attack": "ipm", "epsilon": float(n)},
        "min_max": {"attack": "min_max"},
        "min_sum": {"attack": "min_sum"},
        "mimic": {"attack": "mimic"},
    }[attack]
    return {**server, **choice}, None


class NormProbe(UpdateRule):
    """FedAvg's unweighted mean that records the norms of the updates (to scale the radii)."""

    def __init__(self) -> None:
        super().__init__()
        self.norms: list[list[float]] = []

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.norms.append(torch.linalg.vector_norm(updates, dim=1).tolist())
        return updates.mean(dim=0)


@dataclass(frozen=True)
class Job:
    split: str
    f: int
    rule: str
    attack: str
    seed: int
    scale: float | None = None  # the radius as a multiple of the median honest update norm

    @property
    def key(self) -> str:
        scale = "" if self.scale is None else f"-x{self.scale:g}"
        return f"{self.split}-f{self.f}-{self.rule}{scale}-{self.attack}-seed{self.seed}"


def _datamodule(preset: Preset, split: str) -> FederatedDataModule:
    kwargs: dict[str, Any] = {
        "batch_size": preset.batch_size,
        "synthetic_subjects": preset.synthetic_subjects,
        "synthetic_shape": preset.synthetic_shape,
        "seed": 0,  # the partition is the dataset: fixed across the runs' seeds
    }
    if split.startswith("sim"):
        kwargs.update(partition="simulated", num_sites=num_sites(split))
    dm = FederatedDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    if len(dm.site_names) != num_sites(split):
        raise RuntimeError(f"Expected {num_sites(split)} sites for split {split!r}, got {len(dm.site_names)}.")
    return dm


def fit(preset: Preset, split: str, seed: int, server: ServerStep, callbacks: list[Any]) -> dict[str, Any]:
    """One federated fit and test; the last round's validation and held-out Dice, time, history."""
    quiet()
    set_threads(1)
    torch.set_flush_denormal(True)  # a wrecked model's tiny values would otherwise slow every operation
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = _datamodule(preset, split)
    model = BrainTumorSegmentation(**model_kwargs("cpu", in_channels=dm.in_channels, compute_hd95=False))
    strategy = FederatedStrategy(FedAvg(local_epochs=1), server=server, seed=seed)
    trainer = pl.Trainer(
        **trainer_defaults("cpu"),
        strategy=strategy,
        max_epochs=preset.rounds,
        check_val_every_n_epoch=preset.rounds,  # only the last round's model is validated and tested
        callbacks=callbacks,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - started
    val = float(trainer.callback_metrics.get("val/dice", float("nan")))
    tester = pl.Trainer(**trainer_defaults("cpu"))
    heldout = float(tester.test(model, datamodule=dm, verbose=False)[0]["test/dice"])
    history = [{k: v for k, v in h.items() if isinstance(v, int | float)} for h in strategy.history]
    return {"sites": list(dm.site_names), "val_dice": val, "heldout": heldout, "seconds_per_round":
            seconds / preset.rounds, "history": history}  # fmt: skip


def calibrate(preset: Preset, split: str, folder: Path) -> float:
    """The median honest update norm of round 0 of a clean FedAvg (seed 0), kept in a file."""
    path = folder / f"{split}-calibration.json"
    if path.exists():
        return float(json.loads(path.read_text())["median_norm"])
    probe = NormProbe()
    result = fit(preset, split, 0, probe, [])
    norm = statistics.median(probe.norms[0])
    write_json(path, {"median_norm": norm, "norms_round0": probe.norms[0], "heldout": result["heldout"]})
    return norm


def run_job(preset: Preset, job: Job, norm: float) -> dict[str, Any]:
    n = num_sites(job.split)
    radius = None if job.scale is None else job.scale * norm
    byzantine, site_attack = attack_parts(job.attack, n, job.f, job.seed, norm)
    server = ByzantineServer(make_rule(job.rule, n, job.f, radius), **byzantine)
    result = fit(preset, job.split, job.seed, server, [site_attack] if site_attack else [])
    chosen = byzantine_sites(result["sites"], byzantine["num_byzantine"], seed=job.seed)
    return {**asdict(job), "radius": radius, "byzantine": list(chosen), **result,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def run_pending(preset: Preset, jobs: Sequence[Job], folder: Path, norms: dict[str, float]) -> None:
    todo = [j for j in jobs if not (folder / f"{j.key}.json").exists()]
    print(f"{len(todo)} of {len(jobs)} runs to do", flush=True)
    for job in todo:
        result = run_job(preset, job, norms[job.split])
        write_json(folder / f"{job.key}.json", result)
        print(f"  {job.key}: val {result['val_dice']:.3f} held-out {result['heldout']:.3f}"
              f" ({result['seconds_per_round']:.1f} s/round)", flush=True)  # fmt: skip


def choose_scales(preset: Preset, results: Sequence[dict[str, Any]]) -> dict[tuple[str, int, str], float]:
    """Per (split, f, tuned rule): the grid value with the best worst-case validation Dice on seed 0."""
    chosen: dict[tuple[str, int, str], float] = {}
    for split, f in preset.settings:
        for rule in TUNED:
            worst: dict[float, float] = {}
            for scale in preset.grid:
                runs = [r for r in results if (r["split"], r["f"], r["rule"], r["scale"], r["seed"]) ==
                        (split, f, rule, scale, preset.seeds[0])]  # fmt: skip
                if len(runs) == len(preset.attacks):
                    worst[scale] = min(r["val_dice"] for r in runs)
            if len(worst) == len(preset.grid):
                chosen[split, f, rule] = max(worst, key=lambda s: (worst[s], -s))
    return chosen


def jobs_for(preset: Preset, chosen: dict[tuple[str, int, str], float], rules: Sequence[str], seed: int) -> list[Job]:
    """The runs of ``seed``: on the first seed, the tuning grid; on the others, the chosen radii
    (bucketing: centered clipping's, once chosen)."""
    jobs: list[Job] = []
    index = preset.seeds.index(seed)
    for split, f in preset.settings:
        for rule in rules:
            tuned = rule in TUNED or rule == "bucketing"
            source = "centered_clipping" if rule == "bucketing" else rule
            if not tuned:
                scales: Sequence[float | None] = [None]
            elif index == 0 and rule != "bucketing":
                scales = preset.grid
            elif (split, f, source) in chosen:
                scales = [chosen[split, f, source]]
            else:
                continue
            jobs += [Job(split, f, rule, a, seed, s) for s in scales for a in preset.attacks]
    return jobs


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def tables(preset: Preset, results: Sequence[dict[str, Any]], chosen: dict[tuple[str, int, str], float],
           norms: dict[str, float]) -> tuple[str, dict[str, Any]]:  # fmt: skip
    lines: list[str] = []
    numbers: dict[str, Any] = {}
    attacked = [a for a in preset.attacks if a != "none"]
    for split, f in preset.settings:
        n = num_sites(split)
        runs = [r for r in results if (r["split"], r["f"]) == (split, f)]
        if not runs:
            continue
        lines += [
            f"#### {split}: {n} institutions, f = {f} Byzantine, {preset.rounds} rounds (median honest update norm"
            f" {norms.get(split, math.nan):.3g})",
            "",
            "Held-out Dice of the last round's global model, mean over seeds (seeds in brackets where fewer than"
            f" {len(preset.seeds)}).",
            "",
            "| rule | " + " | ".join(preset.attacks) + " | worst case | benign cost | s/round |",
            "|---|" + "---:|" * (len(preset.attacks) + 3),
        ]
        fedavg_clean = {r["seed"]: r["heldout"] for r in runs if (r["rule"], r["attack"]) == ("fedavg", "none")}
        for rule in RULES:
            source = "centered_clipping" if rule == "bucketing" else rule
            scale = chosen.get((split, f, source)) if rule in TUNED or rule == "bucketing" else None
            mine = [r for r in runs if r["rule"] == rule and r["scale"] == scale]
            if not mine:
                continue
            cells, means = [], {}
            for attack in preset.attacks:
                values = [r["heldout"] for r in mine if r["attack"] == attack]
                means[attack] = _mean(values)
                seeds = f" ({len(values)})" if 0 < len(values) < len(preset.seeds) else ""
                cells.append("-" if not values else f"{means[attack]:.3f}{seeds}")
            worst = min((means[a] for a in attacked if not math.isnan(means[a])), default=math.nan)
            clean = [r for r in mine if r["attack"] == "none" and r["seed"] in fedavg_clean]
            cost = _mean([fedavg_clean[r["seed"]] - r["heldout"] for r in clean])
            label = LABELS[rule] + ("" if scale is None else f" = {scale:g} x norm")
            lines.append(
                f"| {label} | " + " | ".join(cells) + f" | {worst:.3f} | {cost:+.3f} |"
                f" {_mean([r['seconds_per_round'] for r in mine]):.1f} |"
            )
            selected = [h.get("byzantine/selected") for r in mine if r["attack"] != "none" for h in r["history"]]
            numbers.setdefault(f"{split}-f{f}", {})[rule] = {
                "scale": scale,
                "heldout": means,
                "worst": worst,
                "benign_cost": cost,
                "byzantine_selected": _mean([s for s in selected if s is not None]),
            }
        lines.append("")
    return "\n".join(lines), numbers


def aggregation_child(rule: str, n: int, model: str, device: str) -> dict[str, Any]:
    """One rule's aggregation of ``n`` site states shaped like the ``model`` U-Net: seconds (median of
    3) and the peak memory above what holding the states takes (resident set, or CUDA allocations)."""
    quiet()
    set_threads(1)
    template = BrainTumorSegmentation(**model_kwargs(model, in_channels=1, compute_hd95=False)).state_dict()
    gen = torch.Generator().manual_seed(0)
    states = [
        {k: (v + 0.01 * torch.randn(v.shape, generator=gen)).to(device) if v.is_floating_point() else v.to(device)
         for k, v in template.items()}
        for _ in range(n)
    ]  # fmt: skip
    global_state = {k: v.to(device) for k, v in template.items()}
    step = ByzantineServer(make_rule(rule, n, max(1, n // 10), 1.0), None, num_byzantine=0)
    step.setup([k for k, v in template.items() if v.is_floating_point()])
    step.setup_federation(n, 1.0, n)
    names = [str(i) for i in range(n)]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = []
    for round_idx in range(3):
        started = time.perf_counter()
        step.step_from_sites(global_state, states, [1.0] * n, round_idx, sites=names)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    values = sum(v.numel() for v in template.values() if v.is_floating_point())
    return {"rule": rule, "n": n, "model": model, "device": device, "values": values,
            "seconds": statistics.median(seconds), "peak_extra_mb": max(0, peak - base) / 2**20}  # fmt: skip


def aggregation(model: str, device: str, sizes: Sequence[int], out: Path) -> str:
    """Each rule in its own process (so that its peak memory is its own); a table."""
    rows = []
    for n in sizes:
        for rule in RULES:
            path = out / f"{model}-{device.replace(':', '')}-n{n}-{rule}.json"
            if not path.exists():
                command = [sys.executable, __file__, "--aggregation-child", rule, str(n), model, device]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                path.write_text(done.stdout.strip().splitlines()[-1] + "\n")
            rows.append(json.loads(path.read_text()))
    lines = ["| rule | n | seconds per aggregation | peak memory above the states (MB) |", "|---|---:|---:|---:|"]
    lines += [f"| {LABELS[r['rule']]} | {r['n']} | {r['seconds']:.3f} | {r['peak_extra_mb']:.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    parser.add_argument("--report", action="store_true", help="only assemble the tables of finished runs")
    parser.add_argument(
        "--aggregation",
        nargs=2,
        metavar=("MODEL", "DEVICE"),
        default=None,
        help="time each rule's aggregation of states of configs/model/MODEL.yaml on DEVICE",
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 32], help="site counts for --aggregation")
    parser.add_argument("--aggregation-child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quiet()
    if args.aggregation_child:
        rule, n, model, device = args.aggregation_child
        print(json.dumps(aggregation_child(rule, int(n), model, device)))
        return {}
    if args.aggregation:
        model, device = args.aggregation
        out = args.out or REPO_ROOT / "benchmarks" / "results" / "robustness-aggregation"
        out.mkdir(parents=True, exist_ok=True)
        text = aggregation(model, device, args.sizes, out)
        (out / f"{model}-{device.replace(':', '')}.md").write_text(text + "\n")
        print(text)
        return {}
    preset = PRESETS[args.preset]
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"robustness-{preset.name}"
    folder = out / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    splits = sorted({split for split, _ in preset.settings})
    norms = {split: calibrate(preset, split, out) for split in splits}
    if not args.report:
        for seed in preset.seeds:  # seed by seed, so that an interrupted benchmark has whole seeds
            for _ in range(2):  # the second pass runs what the first one's tuning grid chose
                chosen = choose_scales(preset, finished(folder))
                run_pending(preset, jobs_for(preset, chosen, args.rules, seed), folder, norms)
    results = finished(folder)
    chosen = choose_scales(preset, results)
    text, numbers = tables(preset, results, chosen, norms)
    meta = provenance(argv)
    named = {"/".join(map(str, key)): value for key, value in chosen.items()}
    document = {"meta": {**meta, "preset": asdict(preset)}, "chosen": named, "norms": norms, "tables": numbers}
    write_report(out, document, text)
    return document


if __name__ == "__main__":
    main()
