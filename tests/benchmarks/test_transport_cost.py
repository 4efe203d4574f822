"""The transport-cost benchmark's pure helpers, on hand-written logs and histories (no FLARE)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.transport_cost import (
    exchanges_per_round,
    history_summary,
    max_abs_difference,
    parse_exchanges,
    table,
)


def record(seq: int, rnd: int, sent: dict[str, int], seconds: float, what: str = "weighted all-reduce") -> dict:
    return {"seq": seq, "op": "sum", "what": what, "round": rnd, "seconds": seconds, "bytes": sent, "pids": {}}


def test_the_prefix_is_the_controllers():
    pytest.importorskip("nvflare")
    from benchmarks.transport_cost import RECORD_PREFIX
    from lightning_fedseg.deploy.controller import RECORD_PREFIX as CONTROLLER_PREFIX

    assert RECORD_PREFIX == CONTROLLER_PREFIX


def test_parse_exchanges_keeps_only_the_hubs_lines_in_order():
    first, second = record(1, 0, {"1": 8}, 0.5), record(2, -1, {"1": 0}, 0.1, what="done")
    log = "\n".join([
        "2026-12-06 16:20:00,001 - ServerRunner - INFO - starting",
        f"2026-12-06 16:20:01,002 - FederatedController - INFO - fedseg exchange: {json.dumps(first)}",
        "a line about something else",
        f"2026-12-06 16:20:02,003 - FederatedController - INFO - fedseg exchange: {json.dumps(second)}",
    ])  # fmt: skip
    assert parse_exchanges(log) == [first, second]
    assert parse_exchanges("nothing here\n") == []


def test_exchanges_per_round_counts_and_sums_by_round():
    records = [
        record(1, -1, {"1": 0, "2": 0}, 0.2, what="initial weights"),
        record(2, 0, {"1": 2000, "2": 6000}, 1.0),
        record(3, 0, {"1": 8, "2": 8}, 0.5, what="flag"),
        record(4, 1, {"1": 2000, "2": 6000}, 2.0),
        record(5, -1, {"1": 0, "2": 0}, 0.1, what="done"),
    ]
    got = exchanges_per_round(records)
    assert got["exchanges"] == 5 and got["outside_rounds"] == 2
    assert got["per_round"] == [
        {"round": 0, "exchanges": 2, "bytes": {"1": 2008, "2": 6008}, "seconds": 1.5},
        {"round": 1, "exchanges": 1, "bytes": {"1": 2000, "2": 6000}, "seconds": 2.0},
    ]
    assert got["mean_exchanges_per_round"] == 1.5  # (2 + 1) / 2
    assert got["mean_bytes_per_site_per_round"] == pytest.approx(4004.0)  # ((2008 + 6008) / 2 + (2000 + 6000) / 2) / 2
    assert got["mean_hub_seconds_per_round"] == pytest.approx(1.75)  # (1.5 + 2.0) / 2
    assert got["mean_exchanges_per_round_all"] == 1.5  # 3 exchanges but the start and `done`, over 2 rounds
    assert got["mean_hub_seconds_per_round_all"] == pytest.approx(1.75)  # (1.0 + 0.5 + 2.0) / 2
    assert got["small_exchange_seconds"] == 0.5  # the flag, the only one of at most 1 KiB
    assert exchanges_per_round([])["mean_exchanges_per_round"] == 0.0


def history(train: float, comm: float, handover: float, sent: int, received: int) -> dict:
    return {"train_seconds": train, "comm_seconds": comm, "handover_seconds": handover,
            "bytes_sent": sent, "bytes_received": received}  # fmt: skip


def test_history_summary_means_over_every_site_and_round():
    histories = {
        "site 1": [history(2.0, 0.4, 0.1, 100, 200), history(4.0, 0.6, 0.1, 100, 200)],
        "site 2": [history(3.0, 1.0, 0.3, 300, 600), history(3.0, 0.0, 0.3, 300, 600)],
    }
    got = history_summary(histories)
    assert got["train_seconds"] == pytest.approx(3.0)  # (2 + 4 + 3 + 3) / 4
    assert got["comm_seconds"] == pytest.approx(0.5)  # (0.4 + 0.6 + 1.0 + 0.0) / 4
    assert got["handover_seconds"] == pytest.approx(0.2)
    assert got["beyond_training_seconds"] == pytest.approx(0.2)  # the hand-over, which holds the comm
    assert got["bytes_sent"] == 200 and got["bytes_received"] == 400 and got["records"] == 4
    with pytest.raises(ValueError, match="at least one round"):
        history_summary({"site 1": []})


def test_max_abs_difference_over_every_tensor_and_refuses_other_keys():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3), "e": torch.zeros(0)}
    b = {"w": torch.tensor([1.0, 1.75]), "n": torch.tensor(3), "e": torch.zeros(0)}
    assert max_abs_difference(a, b) == 0.25
    assert max_abs_difference(a, a) == 0.0
    with pytest.raises(KeyError, match="Expected the keys"):
        max_abs_difference({"w": a["w"]}, b)


def test_table_from_fake_runs():
    summary = history_summary({"site 1": [history(2.0, 0.5, 0.25, 2**20, 2**21)]})
    runs = [
        {"way": "simulation", "label": "simulation", "histories": {"the process": []}, "summary": summary,
         "fit_seconds": 10.0},
        {"way": "flare", "label": "FLARE", "histories": {"site 1": [], "site 2": []}, "summary": summary,
         "fit_seconds": 30.0, "max_abs_difference": 0.0, "provision_seconds": 2.0,
         "server_and_clients_up_seconds": 5.0, "submit_to_controller_seconds": 3.0,
         "submit_to_first_exchange_seconds": 9.0, "submit_to_completed_seconds": 40.0,
         "first_exchange": {"op": "sum", "what": "weighted all-reduce", "round": 0},
         "hub": exchanges_per_round([record(1, 0, {"1": 2**20, "2": 2**20}, 0.5)])},
    ]  # fmt: skip
    lines = table(runs)
    assert "| simulation | the process | 0.250 (0.500) | 2.00 | 1.00 / 2.00 | 10.0 | reference |" in lines
    assert "| FLARE | site 1; site 2 | 0.250 (0.500) | 2.00 | 1.00 / 2.00 | 30.0 | 0.00e+00 |" in lines
    assert "| 2.0 | 5.0 | 3.0 | 9.0 | 40.0 | 1.0 (1.0) | 1.00 | 0.50 (0.50) | - |" in lines
    assert "The first exchange: sum (weighted all-reduce, round 0); 1 exchanges in all." in lines
    assert not any("start-up" in line for line in table(runs[:1]))
