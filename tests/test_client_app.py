"""The ClientApp's train/evaluate functions called directly with hand-built messages, the run
config's validation, site resolution, strategy selection and checkpoint/resume of the server
loop (through an in-process grid; no Ray). The real Flower simulation is tests/test_simulation.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedTrimmedAvg, FedYogi, Krum

import client.app as client_app
from shared.federation.site_data import ANY_SITE, SiteRefused, playable_sites, resolve_site
from shared.federation.site_training import new_model
from flower_shim import InProcessGrid, make_context, make_message, server_task_identity
from shared.federation.run_config import ConfigError, load_run_config
from shared.federation.version import handshake
from server.loop import run_server
from server.strategies import build_strategy
from shared.training import load_checkpoint, load_model, predict_record

# Small, fast runs: tiny model, few synthetic records per site.
# Partitions 1-3 (ptbxl, mimic, cinc) hold one window per record; ptb's records are longer.
BASE = {"model": "hierarchical", "preset": "tiny", "synthetic-records": 12, "batch-size": 16,
        "local-epochs": 1, "dp-local-epochs": 1, "device": "cpu"}


pytestmark = pytest.mark.usefixtures("synthetic_cache_root")  # caches outside ~/.cache


def _global_arrays(run_config) -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(new_model(load_run_config(run_config)).state_dict())


def _train(run_config, *, site="cinc", context=None, config=None, arrays=None):
    context = context or make_context({"partition-id": 0, "num-partitions": 2}, run_config)
    content = RecordDict({
        "arrays": arrays or _global_arrays(run_config),
        "config": ConfigRecord({"server-round": 1, "site": site, **handshake(load_run_config(run_config)),
                                **(config or {})}),
    })
    return client_app.train(make_message(content, "train"), context), context


# ---------------------------------------------------------------------------------- run config
@pytest.mark.parametrize("override, key", [
    ({"lr": -0.1}, "lr"),
    ({"strategy": "fedfoo"}, "strategy"),
    ({"model": "resnet"}, "model"),
    ({"preset": "huge"}, "preset"),
    ({"num-server-rounds": 0}, "num-server-rounds"),
    ({"sites": "ptb,nowhere"}, "sites"),
    ({"dp-delta": 1.5}, "dp-delta"),
    ({"dp-warmup-steps": -1}, "dp-warmup-steps"),
    ({"learning-rate": 0.1}, "learning-rate"),
    ({"resume": True}, "resume"),
])
def test_bad_run_config_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_run_config({**BASE, **override})


def test_default_app_config_validates_and_names_four_sites():
    import tomllib
    from pathlib import Path

    app = Path(__file__).resolve().parents[1] / "simulations" / "four_sites" / "pyproject.toml"
    data = tomllib.loads(app.read_text())
    from shared.federation.run_config import DEFAULTS

    assert data["tool"]["flwr"]["app"]["config"] == DEFAULTS  # one set of defaults, two copies in sync
    cfg = load_run_config(data["tool"]["flwr"]["app"]["config"])
    assert cfg.site_list == ["ptb", "ptbxl", "mimic", "cinc"] and cfg.min_nodes == 4 and cfg.verbose is False
    assert data["project"]["name"] == "four-sites" and "dependencies" not in data["project"]
    assert data["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert "federations" not in data["tool"]["flwr"]


def test_deployed_node_plays_only_its_site_and_a_simulated_node_any_site_of_the_run():
    cfg = load_run_config({**BASE, "sites": "ptb,ptbxl,cinc", "cache-ptb": "/data/ptb"})
    deployed = {"site": "mimic", "data": "/srv/mimic-cache"}
    simulated = {"partition-id": 1, "num-partitions": 2}
    assert playable_sites(deployed) == "mimic" and playable_sites(simulated) == ANY_SITE
    assert resolve_site(deployed, cfg, "mimic") == ("mimic", "/srv/mimic-cache")
    with pytest.raises(SiteRefused, match="bound to site 'mimic' and refuses a message for site 'ptb'"):
        resolve_site(deployed, cfg, "ptb")
    assert resolve_site(simulated, cfg, "ptb") == ("ptb", "/data/ptb")
    assert resolve_site(simulated, cfg, "cinc") == ("cinc", "")
    with pytest.raises(SiteRefused, match="'mimic' is not in this run's sites"):
        resolve_site(simulated, cfg, "mimic")
    with pytest.raises(ConfigError, match="not one of"):
        resolve_site({"site": "boston"}, cfg, "boston")


def test_a_node_asked_to_play_another_site_refuses_and_trains_nothing():
    context = make_context({"site": "mimic", "data": "/nowhere"}, BASE)
    reply, _ = _train(BASE, site="ptb", context=context)
    assert reply.has_error()
    assert reply.error.reason == "refused: this node is bound to site 'mimic' and refuses a message for site 'ptb'"


# ---------------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("name, cls", [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam),
                                       ("fedyogi", FedYogi), ("fedtrimmedavg", FedTrimmedAvg), ("krum", Krum)])
def test_each_strategy_is_selectable_from_the_run_config(name, cls):
    strategy = build_strategy(load_run_config({**BASE, "strategy": name, "proximal-mu": 0.3, "server-lr": 0.05,
                                               "trimmed-beta": 0.4}))
    assert isinstance(strategy, cls)
    assert strategy.weighted_by_key == "num-examples"
    if name == "fedprox":
        assert strategy.proximal_mu == 0.3
    if name in ("fedadam", "fedyogi"):
        assert strategy.eta == 0.05


# ---------------------------------------------------------------------------------- train / evaluate
def test_train_reply_carries_trained_weights_and_example_count():
    reply, _ = _train(BASE, site="ptbxl")
    content = reply.content
    assert content["site"]["site"] == "ptbxl"
    metrics = content["metrics"]
    assert metrics["num-examples"] > 0 and metrics["steps"] > 0 and metrics["dp-budget-exhausted"] == 0
    assert metrics["epsilon"] == -1.0  # DP off
    sent = _global_arrays(BASE).to_torch_state_dict()
    got = content["arrays"].to_torch_state_dict()
    assert list(got) == list(sent)
    assert any(not torch.equal(got[k], sent[k]) for k in sent if sent[k].is_floating_point())


def test_proximal_mu_from_the_message_changes_the_update():
    run = {**BASE, "batch-size": 4}  # several steps: the proximal gradient is 0 at the first one
    plain, _ = _train(run, config={"proximal-mu": 0.0})
    prox, _ = _train(run, config={"proximal-mu": 5.0})
    again, _ = _train(run, config={"proximal-mu": 0.0})
    assert plain.content["metrics"]["steps"] >= 2
    a = plain.content["arrays"].to_torch_state_dict()
    b = prox.content["arrays"].to_torch_state_dict()
    c = again.content["arrays"].to_torch_state_dict()
    floats = [k for k in a if a[k].is_floating_point()]
    assert all(torch.equal(a[k], c[k]) for k in floats)  # same seed, same update
    assert any(not torch.allclose(a[k], b[k]) for k in floats)


def _ledger(run_dir, site="cinc"):
    import json

    files = sorted((run_dir / "sites" / site).glob("privacy-ledger-*.json"))
    assert len(files) == 1, files
    return files[0], json.loads(files[0].read_text())


def test_dp_epsilon_continues_from_the_site_ledger_and_no_train_loss_leaves(tmp_path):
    from opacus.accountants import RDPAccountant

    run_config = {**BASE, "dp": True, "dp-noise-multiplier": 1.1, "dp-batch-size": 16,
                  "out-dir": str(tmp_path / "run")}
    first, _ = _train(run_config)
    m1 = first.content["metrics"]
    eps1 = m1["epsilon"]
    assert eps1 > 0 and "train-loss" not in m1  # a loss on private data is not noised: it stays
    units = m1["dp-units-record"]
    assert m1["delta"] == pytest.approx(1 / (10 * units)) and m1["dp-sample-rate"] == pytest.approx(1 / math.ceil(units / 16))
    assert m1["dp-noise-multiplier"] == 1.1 and m1["dp-max-grad-norm"] == 1.0
    # a fresh context (a restarted node, a new run on the same out-dir): epsilon continues from disk
    second, _ = _train(run_config, config={"server-round": 2})
    eps2 = second.content["metrics"]["epsilon"]
    assert eps2 > eps1
    path, ledger = _ledger(tmp_path / "run")
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in ledger["history"]]
    assert eps2 == pytest.approx(accountant.get_epsilon(delta=m1["delta"]), rel=1e-6)
    assert [r["round"] for r in ledger["rounds"]] == [1, 2] and ledger["unit"] == "record"

    # the run's budget: the site skips the round; the site's own lifetime limit: it refuses
    stopped, _ = _train({**run_config, "dp-epsilon-budget": eps2 * 1.01}, config={"server-round": 3})
    m = stopped.content["metrics"]
    assert m["dp-budget-exhausted"] == 1 and m["num-examples"] == 0 and m["steps"] == 0
    assert stopped.content["site"]["skipped-reason"]
    refused, _ = _train({**run_config, "site-policy": f"cinc: dp-max-epsilon={eps2 * 1.01:.6f}"},
                        config={"server-round": 3})
    assert refused.has_error() and refused.error.reason.startswith("refused: ")
    assert "dp-max-epsilon" in refused.error.reason and path.name in refused.error.reason
    assert str(path.parent) not in refused.error.reason  # no site file paths leave (review finding 9)
    assert _ledger(tmp_path / "run")[1] == ledger  # nothing was spent by either


def test_site_policy_refusals_name_the_value(tmp_path):
    run_dir = tmp_path / "run"
    plain = {**BASE, "out-dir": str(run_dir), "site-policy": "cinc: dp-required=true"}
    reply, _ = _train(plain)
    assert reply.has_error() and "dp-required" in reply.error.reason and "dp = false" in reply.error.reason
    dp = {**plain, "dp": True, "dp-noise-multiplier": 0.8, "site-policy": "cinc: dp-min-noise-multiplier=1.0"}
    reply, _ = _train(dp)
    assert reply.has_error() and "dp-min-noise-multiplier = 1" in reply.error.reason and "0.8" in reply.error.reason
    reply, _ = _train({**dp, "dp-noise-multiplier": 1.0, "site-policy": "cinc: dp-max-delta=1e-6"})
    assert reply.has_error() and "dp-max-delta = 1e-06" in reply.error.reason
    reply, _ = _train({**dp, "dp-noise-multiplier": 1.0, "site-policy": "", "dp-delta": 0.5})
    assert reply.has_error() and "delta = 0.5" in reply.error.reason and "1/N" in reply.error.reason
    # another site's policy does not apply to cinc
    ok, _ = _train({**dp, "dp-noise-multiplier": 1.0, "site-policy": "mimic: dp-min-noise-multiplier=5"})
    assert not ok.has_error()
    assert not (run_dir / "sites" / "cinc").exists() or list((run_dir / "sites" / "cinc").glob("privacy-ledger-*"))


def test_two_dp_runs_with_the_same_public_config_train_different_models(tmp_path):
    """Noise and sampling come from the site's secret, not the coordinator's seed."""
    run = {**BASE, "dp": True, "dp-batch-size": 16, "seed": 3}
    a, _ = _train({**run, "out-dir": str(tmp_path / "a")})
    b, _ = _train({**run, "out-dir": str(tmp_path / "b")})
    ta, tb = a.content["arrays"].to_torch_state_dict(), b.content["arrays"].to_torch_state_dict()
    floats = [k for k in ta if ta[k].is_floating_point()]
    assert any(not torch.allclose(ta[k], tb[k]) for k in floats)


def test_evaluate_reply_reports_site_auroc_and_synthetic_flag():
    context = make_context({"partition-id": 0, "num-partitions": 2}, BASE)
    content = RecordDict({"arrays": _global_arrays(BASE), "config": ConfigRecord({"server-round": 1, "site": "mimic",
                                                                               **handshake(load_run_config(BASE))})})
    reply = client_app.evaluate(make_message(content, "evaluate"), context)
    m = reply.content["metrics"]
    assert reply.content["site"]["site"] == "mimic"
    assert m["num-examples"] > 0 and m["synthetic"] == 1 and math.isfinite(m["loss"])
    assert len(m["auroc-per-class"]) == 5


# ---------------------------------------------------------------------------------- server loop
def _serve(run_config, n_nodes):
    cfg = load_run_config(run_config)
    with server_task_identity():
        return run_server(InProcessGrid(run_config, n_nodes), cfg, echo=lambda line: None)


def test_resume_after_round_1_gives_the_same_round_2_weights(tmp_path, kit_data):
    """FedAdam (server optimiser state in the checkpoint) over two sites, fixed seed."""
    run = {**BASE, "sites": "mimic,cinc", "strategy": "fedadam", "site-local": False, "seed": 3,
           "server-eval": "on"}
    straight = _serve({**run, "num-server-rounds": 2, "out-dir": str(tmp_path / "straight")}, 2)
    _serve({**run, "num-server-rounds": 1, "out-dir": str(tmp_path / "resumed")}, 2)
    first = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert first["round"] == 1 and first["strategy_state"]["m_t"]
    resumed = _serve({**run, "num-server-rounds": 2, "resume": True, "out-dir": str(tmp_path / "resumed")}, 2)

    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert a["round"] == b["round"] == 2
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert not all(torch.equal(v, first["state_dict"][k]) for k, v in a["state_dict"].items())
    # rounds.csv keeps round 1 from the first run and adds round 2
    assert resumed.log.value(1, "pooled", "auroc_macro") == straight.log.value(1, "pooled", "auroc_macro")
    assert resumed.log.value(2, "pooled", "auroc_macro") == straight.log.value(2, "pooled", "auroc_macro")
    # the federation's checkpoint: the documented one-liner, then one real WFDB record
    model = load_model(tmp_path / "resumed" / "checkpoint.pt")
    probs = predict_record(model, kit_data / "ptbdb" / "patient001" / "s0010_re", "ptb")
    assert set(probs) == {"NORM", "MI", "STTC", "CD", "HYP"} and all(0 <= p <= 1 for p in probs.values())


def test_sites_out_of_epsilon_budget_send_no_update_and_the_run_goes_on(tmp_path):
    run = {**BASE, "sites": "mimic,cinc", "dp": True, "dp-epsilon-budget": 0.01, "num-server-rounds": 1,
           "server-eval": "off", "out-dir": str(tmp_path / "dp")}
    outcome = _serve(run, 2)
    assert outcome.log.value(1, "mimic", "dp_budget_exhausted") == 1.0
    assert outcome.log.value(1, "cinc", "dp_budget_exhausted") == 1.0
    torch.manual_seed(0)
    initial = new_model(load_run_config(run)).state_dict()
    final = load_checkpoint(tmp_path / "dp" / "checkpoint.pt")["state_dict"]
    assert all(torch.equal(initial[k], final[k]) for k in initial)  # nothing was aggregated


def test_client_command_passes_state_dir_and_policy_and_refuses_an_unwritable_state_dir(tmp_path):
    import client.cli as client_cli

    data = tmp_path / "cache"
    parser = client_cli.build_parser()
    args = parser.parse_args(["--site", "ptb", "--data", str(data), "--state-dir", str(tmp_path / "state"),
                              "--dp-required", "--dp-max-epsilon", "8", "--dp-max-delta", "1e-6"])
    client_cli.check_state_dir(args)
    assert (tmp_path / "state").is_dir()
    config = client_cli.node_config("ptb", data, args)
    assert config == (f"site='ptb' data='{data}' state-dir='{tmp_path / 'state'}' dp-required=true "
                      "dp-max-epsilon=8.0 dp-max-delta=1e-06")
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    args = parser.parse_args(["--site", "ptb", "--data", str(data), "--state-dir", str(blocked / "state")])
    with pytest.raises(client_cli.UsageError, match=f"--state-dir {blocked / 'state'} cannot be written"):
        client_cli.check_state_dir(args)
    args = parser.parse_args(["--site", "ptb", "--data", str(data), "--state-dir", str(tmp_path / "s2"),
                              "--dp-max-epsilon", "0"])
    with pytest.raises(client_cli.UsageError, match="--dp-max-epsilon 0 must be > 0"):
        client_cli.check_state_dir(args)


def test_a_deployed_site_takes_its_policy_and_state_dir_from_its_own_node_config(tmp_path):
    """The coordinator's run config cannot set a deployed site's policy; DP needs the site's state dir."""
    plain = {**BASE, "site-policy": ""}
    node = {"site": "cinc", "state-dir": str(tmp_path / "state"), "dp-required": True}
    reply, _ = _train(plain, context=make_context(node, plain))
    assert reply.has_error() and "dp-required = true" in reply.error.reason
    # a run-config site-policy does not loosen (or set) a deployed site's policy
    reply, _ = _train({**plain, "site-policy": "cinc: dp-required=false"},
                      context=make_context(node, {**plain, "site-policy": "cinc: dp-required=false"}))
    assert reply.has_error() and "dp-required = true" in reply.error.reason
    dp = {**BASE, "dp": True}
    reply, _ = _train(dp, context=make_context({"site": "cinc"}, dp))
    assert reply.has_error() and "--state-dir" in reply.error.reason
    # nor does the coordinator's run config pick a deployed DP site's data (review finding 11)
    reply, _ = _train(dp, context=make_context({"site": "cinc", "state-dir": str(tmp_path / "s")}, dp))
    assert reply.has_error() and "node config data" in reply.error.reason


def test_the_site_policy_pins_the_privacy_unit(tmp_path):
    """The coordinator cannot lower the unit (review finding 2): default policy unit is record;
    window only if the site opts in; patient covers record."""
    import client.cli as client_cli
    from shared.privacy import PrivacyRefused, SitePolicy

    run_dir = tmp_path / "run"
    dp = {**BASE, "dp": True, "dp-batch-size": 16, "out-dir": str(run_dir), "dp-unit": "window"}
    reply, _ = _train(dp)
    assert reply.has_error() and "dp-unit = 'record'" in reply.error.reason and "'window'" in reply.error.reason
    assert not list(run_dir.glob("sites/cinc/privacy-*"))  # nothing spent or written
    SitePolicy().check_run(dp=True, noise_multiplier=1.0, delta=1e-5, unit="patient")
    SitePolicy(unit="window").check_run(dp=True, noise_multiplier=1.0, delta=1e-5, unit="window")
    with pytest.raises(PrivacyRefused, match="dp-unit = 'patient'"):
        SitePolicy(unit="patient").check_run(dp=True, noise_multiplier=1.0, delta=1e-5, unit="record")
    # python -m client --dp-unit patient -> node config -> the deployed site's policy
    args = client_cli.build_parser().parse_args(["--site", "ptb", "--data", str(tmp_path), "--dp-unit", "patient"])
    assert " dp-unit='patient'" in client_cli.node_config("ptb", tmp_path, args)
    assert SitePolicy.from_mapping({"site": "ptb", "dp-unit": "patient"}, "node config").unit == "patient"
    with pytest.raises(ConfigError, match="dp-unit = 'visit'"):
        SitePolicy.from_mapping({"dp-unit": "visit"}, "node config")


def test_policy_keys_are_checked_refusals_carry_no_paths_and_evaluation_can_be_refused(tmp_path):
    """Review findings 8, 9, 14."""
    import client.cli as client_cli
    from client.app import public_reason
    from shared.privacy import SitePolicy

    with pytest.raises(ConfigError, match=r"unknown privacy policy key\(s\) \['dp-max-epsilion'\]"):
        SitePolicy.from_mapping({"site": "ptb", "data": "/x", "dp-max-epsilion": 8}, "node config")
    assert public_reason(f"privacy ledger {tmp_path}/privacy-ledger-ab.json is missing (ledger /a/b/c.json).") == \
        "privacy ledger privacy-ledger-ab.json is missing (ledger c.json)."
    assert public_reason("delta 0.5 is not below 1/N = 1/12") == "delta 0.5 is not below 1/N = 1/12"
    args = client_cli.build_parser().parse_args(["--site", "ptb", "--data", str(tmp_path), "--dp-no-evaluate"])
    assert " dp-evaluate=false" in client_cli.node_config("ptb", tmp_path, args)
    def evaluate(run):
        content = RecordDict({"arrays": _global_arrays(run), "config": ConfigRecord(
            {"server-round": 1, "site": "cinc", **handshake(load_run_config(run))})})
        context = make_context({"partition-id": 0, "num-partitions": 2}, run)
        return client_app.evaluate(make_message(content, "evaluate"), context)

    run = {**BASE, "dp": True, "site-policy": "cinc: dp-evaluate=false"}
    reply = evaluate(run)
    assert reply.has_error() and "dp-evaluate = false" in reply.error.reason
    assert not evaluate({**run, "dp": False}).has_error()  # without DP nothing to protect
