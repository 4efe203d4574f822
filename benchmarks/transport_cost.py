"""The transport's cost: one FedAvg job simulated, on torch.distributed and over NVIDIA FLARE.

One invocation runs ``lightning-fedseg fit --config configs/fedavg.yaml`` three ways on the same
small synthetic data set (3 sites, 24 subjects of 24x24x12 voxels, batch 32, 3 rounds, no HD95,
no images, no progress bar):

1. **simulation**: the three sites in one process;
2. **torch.distributed**: ``--trainer.devices 3``, one site per process, gloo on loopback;
3. **FLARE**: a project provisioned on free loopback ports, the FLARE server and three FLARE
   clients (``lightning-fedseg deploy start``), one trainer per site attached to its own FLARE
   client (``--trainer.strategy.init_args.flare_profile``) and the job submitted with
   ``lightning-fedseg deploy submit --wait``.

Per way: the seconds per round beyond local training and the bytes per site per round (from
``federation.history`` of the checkpoints: ``comm_seconds``, ``handover_seconds``, ``bytes_sent``,
``bytes_received``), the wall time of the fit, and the largest absolute difference of the final
weights from the simulation's. For FLARE also the provisioning time, the time until the server has
seen every FLARE client join, the job's start-up (from ``deploy submit`` until the hub's controller
runs and until its first exchange, polled every 0.1 s) and the hub's own record of every exchange
(the ``fedseg exchange: {json}`` lines of the server's log): exchanges and bytes per round.

Decisions:

* **The ways run one after the other**, never at once: on a 2-core machine they would slow each
  other down.
* **torch.distributed's history is rank 0's** (site 1's): Lightning writes the checkpoint on rank 0
  only. Each FLARE site writes its own, so FLARE's figures are every site's.
* **The job is the shipped config**, unchanged: the FLARE job's polling interval
  (``task_request_interval``, 0.05 s) and the controller's ``task_check_period`` (0.05 s) are the
  package's, not tuned here.
* **Nothing outlives its way**: every process started here runs in its own process group, killed
  by the group's id when the way ends, whatever happens. Every listener is on loopback.

Each finished way is written to ``<out>/runs/<way>.json`` and is not run again; the simulation's
checkpoint (in ``<out>/work``, not committed) is what the others are compared with, so it runs first.

Usage::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/transport_cost.py
    .venv/bin/python benchmarks/transport_cost.py --report   # the tables of the finished ways
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, finished, provenance, write_json, write_report
from lightning_fedseg.deploy.local import LocalParties, free_ports

SITES = ("1", "2", "3")
SUBJECTS = 24
SHAPE = (24, 24, 12)
BATCH = 32
ROUNDS = 3
WAYS = ("simulation", "distributed", "flare")
LABELS = {"simulation": "simulation (1 process)", "distributed": "torch.distributed (3 processes, gloo)",
          "flare": "NVIDIA FLARE (server, 3 clients, 3 trainers)"}  # fmt: skip
JOB_ENDS = ("initial weights", "done")  # the hub's exchanges that open and close the job, in no round
RECORD_PREFIX = "fedseg exchange: "  # lightning_fedseg.deploy.controller's (importing it needs nvflare)
CONTROLLER_RUNS = "a federation of"  # the controller's first log line
CLIENT_JOINED = "Client: New client {}@"  # FLARE's server log, one line per FLARE client
PATIENCE = 1200.0  # seconds any one way may take before it is stopped


def environment(work: Path) -> dict[str, str]:
    """One thread per process (the same reduction order in every way), loopback, the work's cache."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env["LIGHTNING_FEDSEG_CACHE"] = str(work / "cache")
    env["MASTER_ADDR"] = "127.0.0.1"
    env.pop("MASTER_PORT", None)
    return env


def fit_command(data: Path, out: Path, *extra: str) -> list[str]:
    """The job, as every way runs it."""
    return [
        sys.executable, "-m", "lightning_fedseg", "fit", "--config", str(REPO_ROOT / "configs" / "fedavg.yaml"),
        "--data.init_args.data_root", str(data), "--data.init_args.batch_size", str(BATCH),
        "--model.init_args.compute_hd95", "false", "--model.init_args.log_images", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", str(ROUNDS),
        "--trainer.logger.init_args.save_dir", str(out), *extra,
    ]  # fmt: skip


def wait_all(procs: Mapping[str, subprocess.Popen[bytes]], deadline: float) -> dict[str, float]:
    """Wait for every process; ``{name: the time it exited}`` (``time.perf_counter``)."""
    ended: dict[str, float] = {}
    while len(ended) < len(procs):
        for name, proc in procs.items():
            if name not in ended and proc.poll() is not None:
                ended[name] = time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"Still running after {PATIENCE:.0f} s: {sorted(set(procs) - set(ended))}.")
        time.sleep(0.1)
    return ended


def check_exits(procs: Mapping[str, subprocess.Popen[bytes]], logs: Mapping[str, Path]) -> None:
    failed = {n: p.returncode for n, p in procs.items() if p.returncode != 0}
    if failed:
        tails = "\n".join(f"--- {n}\n{logs[n].read_text(errors='replace')[-2000:]}" for n in failed)
        raise RuntimeError(f"Expected every process to exit with 0, but got {failed}.\n{tails}")


def last_checkpoint(out: Path) -> Path:
    (last,) = out.rglob("last.ckpt")
    return last


def max_abs_difference(got: Mapping[str, Any], expected: Mapping[str, Any]) -> float:
    """The largest absolute difference between two state dicts of the same keys (every tensor).

    Example:
        >>> import torch
        >>> max_abs_difference({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 2.5])})
        0.5
    """
    if got.keys() != expected.keys():
        raise KeyError(f"Expected the keys {sorted(expected)}, but got {sorted(got)}.")
    worst = 0.0
    for key, value in expected.items():
        diff = (got[key].double() - value.double()).abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


def parse_exchanges(log: str) -> list[dict[str, Any]]:
    """The hub's records of its exchanges (``fedseg exchange: {json}`` lines), in order.

    Example:
        >>> parse_exchanges('x\\n2026 INFO - fedseg exchange: {"seq": 1, "round": 0}\\n')
        [{'seq': 1, 'round': 0}]
    """
    return [json.loads(line.split(RECORD_PREFIX, 1)[1]) for line in log.splitlines() if RECORD_PREFIX in line]


def exchanges_per_round(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The hub's exchanges by round: count, bytes each site sent and the hub's seconds.

    Only a round's weighted sum carries the round's index; the others (``round`` -1: the round's
    flags, the reduces of logged values) are counted apart. ``*_all`` figures count every exchange
    but the job's start and end (:data:`JOB_ENDS`), divided by the rounds; ``small_exchange_seconds``
    is the median of those of at most 1 KiB from every site.
    """
    rounds = sorted({int(r["round"]) for r in records if int(r["round"]) >= 0})
    per_round: list[dict[str, Any]] = []
    for rnd in rounds:
        mine = [r for r in records if int(r["round"]) == rnd]
        sites = sorted({s for r in mine for s in r["bytes"]})
        per_round.append({
            "round": rnd,
            "exchanges": len(mine),
            "bytes": {s: sum(int(r["bytes"].get(s, 0)) for r in mine) for s in sites},
            "seconds": sum(float(r["seconds"]) for r in mine),
        })  # fmt: skip
    job = [r for r in records if r["what"] not in JOB_ENDS]
    small = [float(r["seconds"]) for r in job if max(r["bytes"].values(), default=0) <= 1024]
    n = len(rounds)
    return {
        "exchanges": len(records),
        "outside_rounds": sum(1 for r in records if int(r["round"]) < 0),
        "per_round": per_round,
        "mean_exchanges_per_round": statistics.fmean(p["exchanges"] for p in per_round) if n else 0.0,
        "mean_bytes_per_site_per_round": (
            statistics.fmean(statistics.fmean(p["bytes"].values()) for p in per_round) if n else 0.0
        ),
        "mean_hub_seconds_per_round": statistics.fmean(p["seconds"] for p in per_round) if n else 0.0,
        "mean_exchanges_per_round_all": len(job) / n if n else 0.0,
        "mean_hub_seconds_per_round_all": sum(float(r["seconds"]) for r in job) / n if n else 0.0,
        "small_exchange_seconds": statistics.median(small) if small else None,
    }


def history_summary(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, float]:
    """Means over every (site, round) record of ``federation.history``, keyed by the field.

    ``beyond_training_seconds`` is ``handover_seconds``: a process's site starts and ends and the
    round's combine, which holds the round's ``comm_seconds``. (Reduces of logged values are in
    neither.)

    Example:
        >>> rec = {"train_seconds": 2.0, "comm_seconds": 0.5, "handover_seconds": 0.1}
        >>> history_summary({"1": [{**rec, "bytes_sent": 8, "bytes_received": 4}]})["beyond_training_seconds"]
        0.1
    """
    records = [r for history in histories.values() for r in history]
    if not records:
        raise ValueError("Expected at least one round in the histories, but got none.")
    fields = ("train_seconds", "comm_seconds", "handover_seconds", "bytes_sent", "bytes_received")
    out = {f: statistics.fmean(float(r[f]) for r in records) for f in fields}
    out["beyond_training_seconds"] = out["handover_seconds"]
    out["records"] = float(len(records))
    return out


# ---------------------------------------------------------------------------------- the three ways
def run_fit(way: str, label: str, data: Path, work: Path, *extra: str) -> dict[str, Any]:
    """The simulation or torch.distributed: one command, its wall time and rank 0's checkpoint (``label``)."""
    procs = LocalParties(environment(work), REPO_ROOT)
    out, log = work / way, work / f"{way}.log"
    shutil.rmtree(out, ignore_errors=True)
    try:
        started = time.perf_counter()
        proc = procs.start(fit_command(data, out, *extra), log)
        ended = wait_all({way: proc}, started + PATIENCE)
        check_exits({way: proc}, {way: log})
    finally:
        procs.stop()
    return {"fit_seconds": ended[way] - started, "checkpoints": {label: str(last_checkpoint(out))}}


def run_flare(data: Path, work: Path) -> dict[str, Any]:
    """Provision, start the server and the FLARE clients, then the trainers and the job."""
    from lightning_fedseg.deploy.provision import provision

    root = work / "flare"
    shutil.rmtree(root, ignore_errors=True)  # a fresh project each time: provisioning makes a new CA
    root.mkdir(parents=True)
    fed_port, admin_port, *site_ports = free_ports(2 + len(SITES))
    started = time.perf_counter()
    kits = provision(root / "ws", SITES, fed_port=fed_port, admin_port=admin_port, site_ports=site_ports)
    provision_seconds = time.perf_counter() - started
    procs = LocalParties(environment(work), REPO_ROOT)
    server_log = root / "server.log"
    try:
        started = time.perf_counter()
        for name, kit in (("server", kits.server), *kits.sites.items()):
            procs.start([sys.executable, "-m", "lightning_fedseg", "deploy", "start", str(kit)], root / f"{name}.log")
        joined = [CLIENT_JOINED.format(f"site-{s}") for s in SITES]
        while not all(j in server_log.read_text(errors="replace") for j in joined):
            if time.perf_counter() > started + PATIENCE:
                raise TimeoutError(f"The FLARE clients did not all join within {PATIENCE:.0f} s; see {server_log}.")
            time.sleep(0.1)
        up_seconds = time.perf_counter() - started

        fit_started = time.perf_counter()
        logs = {f"trainer {s}": root / f"trainer_{s}.log" for s in SITES}
        trainers = {}
        for s in SITES:
            profile = ("--trainer.strategy.init_args.flare_profile", str(kits.attach_profile(s)))
            trainers[f"trainer {s}"] = procs.start(fit_command(data, root / f"site{s}", *profile), logs[f"trainer {s}"])
        submit_at = time.perf_counter()
        logs["submit"] = root / "submit.log"
        submit_cmd = [
            sys.executable, "-m", "lightning_fedseg", "deploy", "submit", "--config",
            str(REPO_ROOT / "configs" / "fedavg.yaml"), "--startup-kit", str(kits.admin),
            "--job-dir", str(root / "job"), "--wait", str(PATIENCE),
        ]  # fmt: skip
        submit = procs.start(submit_cmd, logs["submit"])
        controller_at = first_at = None
        while first_at is None and submit.poll() is None:
            text = server_log.read_text(errors="replace")
            now = time.perf_counter()
            if controller_at is None and CONTROLLER_RUNS in text:
                controller_at = now
            if RECORD_PREFIX in text:
                first_at = now
            if now > submit_at + PATIENCE:
                raise TimeoutError(f"No exchange within {PATIENCE:.0f} s of the submission; see {server_log}.")
            time.sleep(0.1)
        ended = wait_all({**trainers, "submit": submit}, submit_at + PATIENCE)
        check_exits({**trainers, "submit": submit}, logs)
        status = logs["submit"].read_text(errors="replace").strip().splitlines()[-1]
        if "FINISHED:COMPLETED" not in status:
            raise RuntimeError(f"Expected the job to finish COMPLETED, but `deploy submit` said {status!r}.")
    finally:
        procs.stop()
    records = parse_exchanges(server_log.read_text(errors="replace"))
    return {
        "fit_seconds": max(ended[n] for n in trainers) - fit_started,
        "checkpoints": {f"site {s}": str(last_checkpoint(root / f"site{s}")) for s in SITES},
        "provision_seconds": provision_seconds,
        "server_and_clients_up_seconds": up_seconds,
        "submit_to_controller_seconds": None if controller_at is None else controller_at - submit_at,
        "submit_to_first_exchange_seconds": None if first_at is None else first_at - submit_at,
        "submit_to_completed_seconds": ended["submit"] - submit_at,
        "first_exchange": records[0] if records else None,
        "submit_status": status,
        "hub": exchanges_per_round(records),
        "hub_records": records,
    }


def run_way(way: str, data: Path, work: Path, reference: Path | None) -> dict[str, Any]:
    """One way, its history figures and its final weights against the simulation's."""
    import torch

    if way == "simulation":
        result = run_fit(way, "the process (every site)", data, work)
    elif way == "distributed":
        result = run_fit(way, f"rank 0 (site {SITES[0]})", data, work, "--trainer.devices", str(len(SITES)))
    else:
        result = run_flare(data, work)
    ckpts = {site: torch.load(path, weights_only=False) for site, path in result["checkpoints"].items()}
    histories = {site: ckpt["federation"]["history"] for site, ckpt in ckpts.items()}
    rounds = {site: ckpt["federation"]["completed_rounds"] for site, ckpt in ckpts.items()}
    if set(rounds.values()) != {ROUNDS}:
        raise RuntimeError(f"Expected {ROUNDS} completed rounds at every site, but got {rounds}.")
    result.update(way=way, label=LABELS[way], histories=histories, summary=history_summary(histories))
    if reference is not None:
        expected = torch.load(reference, weights_only=False)["state_dict"]
        result["max_abs_difference"] = max(max_abs_difference(c["state_dict"], expected) for c in ckpts.values())
    return result


# ---------------------------------------------------------------------------------- report
def mib(value: float) -> str:
    return f"{value / 2**20:.2f}"


def table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The markdown tables of the finished ways (FLARE's own figures apart)."""
    lines = [
        f"### One FedAvg job ({len(SITES)} sites, {ROUNDS} rounds) three ways",
        "",
        "| way | history of | s per round beyond training: hand-over (of which comm) | local training s per round "
        "| MiB sent / received per site per round | fit wall s | final weights vs simulation (max abs diff) |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for run in runs:
        s = run["summary"]
        diff = run.get("max_abs_difference")
        lines.append(
            f"| {run['label']} | {'; '.join(run['histories'])} "
            f"| {s['beyond_training_seconds']:.3f} ({s['comm_seconds']:.3f}) "
            f"| {s['train_seconds']:.2f} | {mib(s['bytes_sent'])} / {mib(s['bytes_received'])} "
            f"| {run['fit_seconds']:.1f} | {'reference' if diff is None else f'{diff:.2e}'} |"
        )
    lines.append("")
    flare = next((r for r in runs if r["way"] == "flare"), None)
    if flare is None:
        return lines
    hub = flare["hub"]
    first = flare["first_exchange"] or {}
    small = "-" if hub["small_exchange_seconds"] is None else f"{hub['small_exchange_seconds']:.2f}"
    lines += [
        "### NVIDIA FLARE: start-up and the hub's record of its exchanges",
        "",
        "| provisioning s | server + 3 clients up s | submit to controller s | submit to first exchange s "
        "| submit to COMPLETED s | exchanges per round (with the round's index) | MiB per site per round at the hub "
        "| hub s per round (the weighted sum) | hub s of an exchange of at most 1 KiB (median) |",
        "|---:|---:|---:|---:|---:|---|---:|---|---:|",
        f"| {flare['provision_seconds']:.1f} | {flare['server_and_clients_up_seconds']:.1f} "
        f"| {flare['submit_to_controller_seconds']:.1f} | {flare['submit_to_first_exchange_seconds']:.1f} "
        f"| {flare['submit_to_completed_seconds']:.1f} "
        f"| {hub['mean_exchanges_per_round_all']:.1f} ({hub['mean_exchanges_per_round']:.1f}) "
        f"| {mib(hub['mean_bytes_per_site_per_round'])} "
        f"| {hub['mean_hub_seconds_per_round_all']:.2f} ({hub['mean_hub_seconds_per_round']:.2f}) "
        f"| {small} |",
        "",
        f"The first exchange: {first.get('op')} ({first.get('what') or '-'}, round {first.get('round')});"
        f" {hub['exchanges']} exchanges in all.",
        "",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="quick", help="results go to benchmarks/results/transport_cost-<name>")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--report", action="store_true", help="only assemble the tables of the finished ways")
    args = parser.parse_args(argv)
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"transport_cost-{args.name}"
    folder, work = out / "runs", out / "work"
    folder.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if not args.report:
        from lightning_fedseg.data.synthetic import write_synthetic_dataset

        data = write_synthetic_dataset(work / "data", num_subjects=SUBJECTS, shape=SHAPE, num_sites=len(SITES), seed=0)
        for way in [w for w in WAYS if w in args.ways]:  # the simulation first: it is the reference
            if (folder / f"{way}.json").exists():
                continue
            sim = folder / "simulation.json"
            reference = Path(next(iter(json.loads(sim.read_text())["checkpoints"].values()))) if sim.exists() else None
            print(f"running {way}", flush=True)
            result = run_way(way, data.root, work, reference)
            write_json(folder / f"{way}.json", result)
            print(f"  {way}: fit {result['fit_seconds']:.1f} s", flush=True)
    by_way = {r["way"]: r for r in finished(folder)}
    runs = [by_way[w] for w in WAYS if w in by_way]
    for run in runs:  # the figures from the raw records, so a report shows today's definitions
        run["summary"] = history_summary(run["histories"])
        if "hub_records" in run:
            run["hub"] = exchanges_per_round(run["hub_records"])
    text = "\n".join(table(runs))
    document = {"meta": {**provenance(argv), "sites": SITES, "subjects": SUBJECTS, "shape": SHAPE, "batch": BATCH,
                         "rounds": ROUNDS}, "runs": runs}  # fmt: skip
    write_report(out, document, text)
    return document


if __name__ == "__main__":
    main()
