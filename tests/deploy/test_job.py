"""The coordinator's pure steps: the hub's relay, the project, the job, and what is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from lightning_fedseg import CDS, FedAvg, FederatedStrategy
from lightning_fedseg.deploy.job import check_study, write_job
from lightning_fedseg.deploy.provision import ALLOWED, project_yaml
from lightning_fedseg.deploy.relay import Message, RelayError, contribution_weights, relay
from lightning_fedseg.federation import ByzantineServer, Krum
from lightning_fedseg.federation.flare_transport import FlareSession
from lightning_fedseg.federation.masking import decode, encode, mask
from lightning_fedseg.federation.transport import flatten_state
from tests.federation.toy import ToyClassifier, ToyDataModule, trainer_kwargs


def test_the_hubs_sum_is_the_weighted_all_reduce_in_site_order():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -1.0])}, {"w": torch.tensor([0.5, 0.25])}]
    weights = [10.0, 30.0, 20.0]
    messages = [
        Message(str(i), "sum", 4, flatten_state({"w": s["w"] * w}, w, 1.0).numpy())
        for i, (s, w) in enumerate(zip(states, weights, strict=True))
    ]
    total = relay(messages)
    by_hand = [1.0 * 10 + 3.0 * 30 + 0.5 * 20, 2.0 * 10 - 1.0 * 30 + 0.25 * 20, 60.0, 3.0]
    assert total.tolist() == by_hand
    assert contribution_weights(messages) == {"0": (10.0, 1), "1": (30.0, 1), "2": (20.0, 1)}


def test_masked_encodings_summed_by_the_hub_decode_to_the_plain_sum():
    from lightning_fedseg.federation.masking import RoundKeys

    values = [torch.tensor([0.25, -1.5, 3.0], dtype=torch.float64), torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)]
    keys = [RoundKeys(), RoundKeys()]
    publics = [k.public_bytes() for k in keys]
    messages = []
    for rank, (value, key) in enumerate(zip(values, keys, strict=True)):
        peer = 1 - rank
        pair = {peer: key.shared_key(publics[peer], 7, 0, 1)}
        masked = mask(encode(value), rank, pair, 7)
        assert not torch.equal(masked, encode(value))  # the hub never sees the encoding in the clear
        messages.append(Message(str(rank), "sum", 1, masked.numpy()))
    torch.testing.assert_close(decode(torch.from_numpy(relay(messages))), values[0] + values[1])


def test_sites_that_disagree_are_named():
    with pytest.raises(RelayError, match="site 'b' sent op 'broadcast'"):
        relay([Message("a", "sum", 2, np.zeros(2)), Message("b", "broadcast", 2, np.zeros(2), 0)])
    with pytest.raises(RelayError, match="site 'b' sent a float64 array of shape \\(3,\\)"):
        relay([Message("a", "sum", 2, np.zeros(2)), Message("b", "sum", 2, np.zeros(3))])
    with pytest.raises(RelayError, match="unknown op 'scatter'"):
        relay([Message("a", "scatter", 2, np.zeros(2))])


def test_the_project_names_each_institution_as_a_flare_client():
    project = project_yaml(["1", "hospital_b"], server_host="fl.example.org", fed_port=443, admin_port=8443)
    clients = [p for p in project["participants"] if p["type"] == "client"]
    assert [c["name"] for c in clients] == ["site-1", "site-hospital_b"]
    assert project["participants"][0] == {
        "name": "fl.example.org", "type": "server", "org": "consortium", "fed_learn_port": 443, "admin_port": 8443,
    }  # fmt: skip
    with pytest.raises(ValueError, match="FLARE client names"):
        project_yaml(["a b"])
    with pytest.raises(ValueError, match="distinct"):
        project_yaml(["a", "a"])


def test_the_job_is_configuration_only(tmp_path):
    from lightning_fedseg import __version__

    job = write_job(tmp_path, ["1", "2", "3"], timeout=60)
    files = sorted(str(p.relative_to(job)) for p in job.rglob("*") if p.is_file())
    assert files == ["app/config/config_fed_client.json", "app/config/config_fed_server.json", "meta.json"]
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    (workflow,) = server["workflows"]
    assert workflow["path"] in ALLOWED
    assert workflow["args"] == {
        "sites": ["1", "2", "3"],
        "version": __version__,
        "exchange_timeout": 60.0,
        "server": None,
    }
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    executor = client["executors"][0]["executor"]
    assert executor["path"] in ALLOWED and executor["args"]["execution_mode"] == "attach"


def _study(tmp_path, **strategy):
    config = {"trainer": {"strategy": {"class_path": "lightning_fedseg.FederatedStrategy", "init_args": strategy}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_studies_with_no_meaning_across_institutions_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mode` is cds, which pools"):
        check_study(_study(tmp_path, mode={"class_path": "lightning_fedseg.CDS"}))
    drill = {"class_path": "lightning_fedseg.federation.ByzantineServer", "init_args": {"inner": None}}
    with pytest.raises(ValueError, match="server` is ByzantineServer, an attack drill"):
        check_study(_study(tmp_path, server=drill))
    krum = {"class_path": "lightning_fedseg.federation.Krum", "init_args": {"num_byzantine": 0}}
    assert check_study(_study(tmp_path, server=krum, timeout=30))["server"] == krum  # runs at the hub


@pytest.mark.parametrize(
    ("mode", "server", "match"),
    [
        (CDS(), None, "cds mode, which pools"),
        (FedAvg(), ByzantineServer(Krum(0, multi=2), "alie", num_byzantine=1), "an attack drill"),
    ],
)
def test_a_flare_site_refuses_what_the_hub_cannot_run(tmp_path, mode, server, match):
    profile = tmp_path / "attach.json"
    profile.write_text(json.dumps({"site_name": "site-a"}))
    strategy = FederatedStrategy(mode=mode, server=server, flare_profile=str(profile))
    trainer = trainer_kwargs(tmp_path, strategy=strategy, max_epochs=1)
    import lightning.pytorch as pl

    with pytest.raises(ValueError, match=match):
        pl.Trainer(**trainer).fit(ToyClassifier(), datamodule=ToyDataModule())


def test_a_missing_attach_profile_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"attach profile .*nope\.json"):
        FlareSession(tmp_path / "nope.json")


def _rows(states, weights, global_state):
    """What the sites send for a hub step: ``[state, index, weight]``, site 0's then the global state."""
    rows = [flatten_state(s, float(i), float(w)).numpy() for i, (s, w) in enumerate(zip(states, weights, strict=True))]
    rows[0] = np.concatenate([rows[0], flatten_state(global_state).numpy()])
    return rows


LAYOUT = {"keys": ["w", "n"], "shapes": [[3], []], "dtypes": ["float32", "int64"], "param_keys": ["w"]}


@pytest.mark.parametrize(
    "server",
    [
        {"class_path": "lightning_fedseg.federation.CoordinateMedian"},
        {"class_path": "lightning_fedseg.federation.CenteredClipping", "init_args": {"radius": 0.5}},
    ],
)
def test_the_hub_runs_the_studys_rule_as_the_simulation_does(server):
    from lightning_fedseg.deploy.hub_step import HubStep, build

    global_state = {"w": torch.tensor([0.0, 1.0, 2.0]), "n": torch.tensor(4)}
    states = [
        {"w": torch.tensor([1.0, 1.0, 1.0]), "n": torch.tensor(6)},
        {"w": torch.tensor([2.0, -3.0, 2.5]), "n": torch.tensor(6)},
        {"w": torch.tensor([9.0, 0.5, 2.0]), "n": torch.tensor(6)},
    ]
    weights = [3.0, 1.0, 2.0]
    hub = HubStep(server, ["a", "b", "c"])
    out = hub.step(_rows(states, weights, global_state), {**LAYOUT, "min_sites": 1}, round_idx=2)
    reference = build(server)
    reference.setup(["w"])
    expected = reference.step_from_sites(global_state, states, weights, 2, sites=["a", "b", "c"])
    assert out[-1] == 3.0  # sites combined
    assert out[:3].tolist() == expected["w"].double().tolist() and out[3] == float(expected["n"])
    if server["class_path"].endswith("CoordinateMedian"):
        assert out[:3].tolist() == [2.0, 0.5, 2.0]  # by hand


def test_the_hub_combines_no_fewer_than_min_sites():
    from lightning_fedseg.deploy.hub_step import HubStep

    global_state = {"w": torch.zeros(3), "n": torch.tensor(0)}
    states = [{"w": torch.ones(3), "n": torch.tensor(1)}] * 2
    hub = HubStep({"class_path": "lightning_fedseg.federation.CoordinateMedian"}, ["a", "b"])
    out = hub.step(_rows(states, [1.0, 0.0], global_state), {**LAYOUT, "min_sites": 2}, round_idx=0)
    assert out.tolist() == [1.0]  # only the count: site b failed (weight 0)
    with pytest.raises(ValueError, match="does not need each site's state"):
        HubStep({"class_path": "lightning_fedseg.federation.FedAdam"}, ["a"])
