"""Overhead experiment 2: aggregation time and peak memory against the number of sites.

:class:`~lightning_fedseg.federation.WeightedMean` (add every site's state, then the final
division, as the engine does) beside one flat add over the same bytes, for the CPU and the paper
model; times from a child process with glibc's default allocator, peak memory from a second child
where glibc maps every allocation of 128 KiB or more on its own. The rules that hold every site's
state (keep every state, median, trimmed mean, Krum) are measured beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import REPO_ROOT, figure, quiet, save_figure, set_threads
from benchmarks.overhead_setup import ENTRY, Preset, make_model
from lightning_fedseg.federation import CoordinateMedian, Krum, TrimmedMean, WeightedMean
from lightning_fedseg.federation.aggregate import finalize_mean, state_to_cpu
from lightning_fedseg.federation.flat import BLOCK

__all__ = ["KEEPS_STATES", "METHODS", "aggregation", "aggregation_tables", "aggregation_worker", "plot_aggregation"]


def _memory_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def _release_free_memory() -> None:
    """Return glibc's free heap pages to the OS, so that the resident set counts live memory."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _site_state(reference: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """A site's distinct state: the reference scaled (floats) or shifted (integers)."""
    return {k: v * (1 + 0.01 * index) if v.is_floating_point() else v + index for k, v in reference.items()}


METHODS = (
    "WeightedMean",
    "fused add",
    "blocked add",
    "float32 add",
    "keep every state",
    "median",
    "trimmed mean",
    "Krum",
)


KEEPS_STATES = ("keep every state", "median", "trimmed mean", "Krum")


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in state.values() if v.is_floating_point()])


_ACCUMULATORS: dict[int, WeightedMean] = {}  # per reference state, reused as the engine reuses its own


def _blocked_add(acc: torch.Tensor, x: torch.Tensor, alpha: float, block: torch.Tensor | None) -> None:
    """``acc += alpha * x``; with ``block``, ``x`` cast to ``acc``'s dtype block by block through it."""
    if block is None:
        acc.add_(x, alpha=alpha)
        return
    for start in range(0, x.numel(), block.numel()):
        stop = min(x.numel(), start + block.numel())
        part = block[: stop - start]
        part.copy_(x[start:stop])
        acc[start:stop].add_(part, alpha=alpha)


def _aggregate(reference: dict[str, torch.Tensor], n: int, method: str) -> tuple[float, int, dict[str, float]]:
    """Combine ``n`` generated site states by ``method``; returns the seconds of the combining alone
    (a site's state is made before its clock starts, as the module holds it in a round), the bytes
    the method held at the end, and extra figures (float32 add: its error against float64).

    ``fused add`` is the issue's reference: one ``add_(flat float32 state, alpha=w)`` per site into
    a flat float64 buffer, over states already flat. On a CPU torch first makes a promoted float64
    copy of the whole operand, so ``blocked add`` is the same add cast through one reused float64
    block of :data:`~lightning_fedseg.federation.flat.BLOCK` values (:func:`_blocked_add`): the
    fastest single pass over the same bytes we know of. The robust rules and ``keep every state``
    hold every site's state until the round's end."""
    seconds, extra = 0.0, {}
    if method == "WeightedMean":  # as the engine does it: one accumulator for the whole fit
        acc = _ACCUMULATORS.setdefault(id(reference), WeightedMean())
        acc.reset()
        for i in range(n):
            state = _site_state(reference, i)
            start = time.perf_counter()
            acc.add(state, weight=float(i + 1), site=str(i))
            seconds += time.perf_counter() - start
        start = time.perf_counter()
        sums, total = acc.sums()
        finalize_mean(sums, total, reference)
        seconds += time.perf_counter() - start
        return seconds, sum(t.numel() * t.element_size() for t in sums.values()), extra
    if method in ("fused add", "blocked add", "float32 add"):
        total = None
        exact = None
        block = None
        for i in range(n):
            flat = _flat(_site_state(reference, i))
            if total is None:
                total = torch.zeros(flat.numel(), dtype=torch.float32 if method == "float32 add" else torch.float64)
                exact = torch.zeros(flat.numel(), dtype=torch.float64) if method == "float32 add" else None
                block = torch.empty(BLOCK, dtype=torch.float64) if method == "blocked add" else None
            start = time.perf_counter()
            _blocked_add(total, flat, float(i + 1), block)
            seconds += time.perf_counter() - start
            if exact is not None:
                exact.add_(flat, alpha=float(i + 1))
        assert total is not None
        if exact is not None:
            weight = n * (n + 1) / 2
            mean64, mean32 = exact / weight, (total / weight).double()
            error = (mean32 - mean64).abs()
            extra = {
                "max_abs_error": float(error.max()),
                "max_rel_error": float((error / mean64.abs().clamp_min(1e-6)).max()),
            }
        return seconds, total.numel() * total.element_size(), extra
    kept = [(_site_state(reference, i), float(i + 1)) for i in range(n)]
    start = time.perf_counter()
    if method == "keep every state":
        total = sum(w for _, w in kept)
        for key, value in reference.items():
            mean = sum(s[key].double() * w for s, w in kept) / total
            (mean if value.is_floating_point() else torch.round(mean)).to(value.dtype)
    else:
        step = {
            "median": CoordinateMedian(),
            "trimmed mean": TrimmedMean(beta=0.1),
            "Krum": Krum(num_byzantine=1, multi=max(1, n - 1)),
        }[method]
        step.step_from_sites(reference, [s for s, _ in kept], [w for _, w in kept], round_idx=0)
    seconds = time.perf_counter() - start
    return seconds, sum(t.numel() * t.element_size() for s, _ in kept for t in s.values()), extra


def aggregation_worker(
    models: Sequence[str], sites: Sequence[int], naive_max_bytes: int, repeats: int = 2
) -> dict[str, Any]:
    """Run in a child process (see :func:`aggregation`): time and peak memory per configuration,
    the smallest of ``repeats`` measurements, after one unmeasured warm-up."""
    quiet()
    set_threads(1)
    results: dict[str, Any] = {"peak_method": "VmHWM", "configs": []}
    for name in models:
        reference = state_to_cpu(make_model(name).state_dict())
        state_bytes = sum(v.numel() * v.element_size() for v in reference.values())
        params = sum(v.numel() for v in reference.values() if v.is_floating_point())
        for method in METHODS:
            _aggregate(reference, 5, method)  # warm-up: first-use allocations are not the method's
        for n in sites:
            for method in METHODS:
                if method in KEEPS_STATES and n * state_bytes > naive_max_bytes:
                    continue
                if method == "Krum" and n < 5:  # Krum with f = 1 needs more than 2f + 2 sites
                    continue
                seconds, peak_kib, held, extra = float("inf"), float("inf"), 0, {}
                for _ in range(repeats):
                    _release_free_memory()
                    before = _memory_kib()["VmRSS"]
                    if not _reset_peak():
                        results["peak_method"] = "unavailable (no /proc/self/clear_refs)"
                    took, held, extra = _aggregate(reference, n, method)
                    seconds = min(seconds, took)
                    peak_kib = min(peak_kib, _memory_kib()["VmHWM"] - before)
                results["configs"].append(
                    {
                        "model": name,
                        "parameters": params,
                        "state_mib": state_bytes / 2**20,
                        "sites": n,
                        "method": method,
                        "seconds": seconds,
                        "ms_per_site": 1000 * seconds / n,
                        "peak_mib": peak_kib / 1024,
                        "held_mib": held / 2**20,
                        **extra,
                    }
                )
    return results


def aggregation(preset: Preset, work: Path) -> dict[str, Any]:
    """Run :func:`aggregation_worker` in two fresh child processes: times from one with glibc's
    default allocator, peak memory from one with every allocation of 128 KiB or more mmapped."""
    results = {}
    for kind, extra in (("timing", {}), ("memory", {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})):
        out = work / f"aggregation-{kind}.json"
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        env.update(OMP_NUM_THREADS="1", **extra)
        command = [sys.executable, str(ENTRY), "--aggregation-worker", str(out), "--preset", preset.name]
        subprocess.run(command, cwd=REPO_ROOT, env=env, check=True)
        results[kind] = json.loads(out.read_text())
    merged = results["timing"]
    peaks = {(c["model"], c["sites"], c["method"]): c["peak_mib"] for c in results["memory"]["configs"]}
    for config in merged["configs"]:
        config["peak_mib"] = peaks[(config["model"], config["sites"], config["method"])]
    merged["peak_method"] = results["memory"]["peak_method"]
    merged["timing_allocator"] = "glibc default"
    return merged


def aggregation_tables(agg: dict[str, Any]) -> list[str]:
    configs = agg["configs"]

    def get(model: str, n: int, method: str, key: str) -> float | None:
        found = [c for c in configs if (c["model"], c["sites"], c["method"]) == (model, n, method)]
        return found[0].get(key) if found else None

    def fmt(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    models = list(dict.fromkeys(c["model"] for c in configs))
    sites = sorted({c["sites"] for c in configs})
    lines = [
        "### Aggregation per site against one fused pass over the same bytes (1 thread; times with glibc's"
        f" default allocator; peak: {agg['peak_method']} rise in a second run with glibc's mmap threshold at 128 KiB)",
        "",
        "| model | sites | WeightedMean ms/site | fused add ms/site | ratio | blocked add ms/site | ratio"
        " | WeightedMean peak MiB | float32 add ms/site | float32 max abs / rel error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in models:
        first = next(c for c in configs if c["model"] == m)
        label = f"{m} ({first['parameters'] / 1e6:.2f}M, {first['state_mib']:.1f} MiB)"
        for n in sites:
            ours, fused = get(m, n, "WeightedMean", "ms_per_site"), get(m, n, "fused add", "ms_per_site")
            blocked = get(m, n, "blocked add", "ms_per_site")
            ratio = None if ours is None or not fused else ours / fused
            ratio_blocked = None if ours is None or not blocked else ours / blocked
            abs_error, rel_error = get(m, n, "float32 add", "max_abs_error"), get(m, n, "float32 add", "max_rel_error")
            error = "-" if abs_error is None or rel_error is None else f"{abs_error:.1e} / {rel_error:.1e}"
            peak, f32 = get(m, n, "WeightedMean", "peak_mib"), get(m, n, "float32 add", "ms_per_site")
            lines.append(
                f"| {label} | {n} | {fmt(ours, 3)} | {fmt(fused, 3)} | {fmt(ratio)} | {fmt(blocked, 3)}"
                f" | {fmt(ratio_blocked)} | {fmt(peak, 1)} | {fmt(f32, 3)} | {error} |"
            )
            label = ""
    lines += [
        "",
        "WeightedMean: per site, copy the state into a flat staging buffer of its own dtype, one finiteness"
        " reduction over it, one float64 add cast through a reused block (the first site: a multiply into"
        " the sum); plus the"
        " final division (`finalize_mean`, as the engine does), with the buffers of the previous round"
        " reused (the engine keeps one accumulator for the whole fit). Fused add: only the"
        " add, one `add_(flat float32, alpha=w)` into a flat float64 buffer over a state already flat (torch"
        " first copies the whole operand to float64). Blocked add: the same add cast through one reused"
        " float64 block of 32768 values, the fastest single pass we know of. Float32 add: the same add into"
        " a float32 buffer; its error is against the float64 mean.",
        "",
        "### Rules that hold every site's state of the round: time of the combine and peak memory",
        "",
        "| model | sites | keep-all mean s / peak MiB | median s / peak MiB | trimmed mean s / peak MiB "
        "| Krum (f=1, m=n-1) s / peak MiB |",
        "|---|---:|---|---|---|---|",
    ]
    for m in models:
        label = m
        for n in sites:
            cells = [
                f"{fmt(get(m, n, method, 'seconds'), 3)} / {fmt(get(m, n, method, 'peak_mib'), 0)}"
                for method in KEEPS_STATES
            ]
            if all(c.startswith("- ") for c in cells):
                continue
            lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
            label = ""
    lines += ["", "-: not run (more than the preset's byte limit of held states, or too few sites for Krum).", ""]
    return lines


def plot_aggregation(report: dict[str, Any], out: Path) -> list[Path]:
    agg = report.get("aggregation")
    if not agg:
        return []
    fig, axes = figure(ncols=2, size=(5.0, 3.8))
    ax_t, ax_m = axes[0]
    styles = {
        "WeightedMean": "-",
        "fused add": "-.",
        "blocked add": (0, (1, 1)),
        "keep every state": "--",
        "median": ":",
    }
    colors = {"cpu": "tab:blue", "paper": "tab:red"}
    for model in sorted({c["model"] for c in agg["configs"]}):
        for method, style in styles.items():
            rows = [c for c in agg["configs"] if c["model"] == model and c["method"] == method]
            if not rows:
                continue
            xs = [c["sites"] for c in rows]
            line = {"linestyle": style, "marker": "o", "color": colors.get(model), "label": f"{model} model, {method}"}
            ax_t.plot(xs, [1000 * c["seconds"] for c in rows], **line)
            ax_m.plot(xs, [c["peak_mib"] for c in rows], **line)
    for ax, ylabel in ((ax_t, "aggregation time (ms)"), (ax_m, f"peak memory rise (MiB, {agg['peak_method']})")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sites")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax_t.set_title("WeightedMean: add every site's state, then compute")
    ax_m.set_title("Peak memory stays flat in the number of sites")
    return [save_figure(fig, out / f"{report['preset']['name']}-overhead-aggregation.png")]
