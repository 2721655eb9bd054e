"""`python -m simulations.compare`: local and pooled rows on identical splits, predictions saved,
pooled = concatenation, resumable (a finished run is skipped, not retrained), clear errors.
The federated rows go through simulations.federation.run_federation (tested by the simulation
tests); here only the run config compare sends is checked against the app's declared keys.

The network is swapped for a tiny Opacus-style CNN (``training_helpers.TinyEcgNet``) so that the
test stays within its time budget on 2 shared cores; caches, loader, training loop, evaluation,
results and report are the real ones (the real models are trained in test_training/test_privacy)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from shared.report import OWN_SITE, predictions_path, read_results
from shared.report.scores import concat_predictions, macro_auroc
from shared.training import load_predictions
from simulations import compare
from training_helpers import TinyEcgNet

SITES = ["ptb", "cinc"]
OVERRIDES = ["seeds=[0]", "rounds=1", "local_epochs=1", "methods=[local,pooled]", "sites=[ptb,cinc]",
             "data.synthetic_records=40", "batch_size=32", "bootstrap=10", "device=cpu"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    cfg = compare.load_config(None, [*OVERRIDES, f"out_dir={out}"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compare, "build_model", lambda name, preset, *, n_leads, input_samples, n_classes, dp=False:
                   TinyEcgNet(n_leads=n_leads, n_classes=n_classes))
        report = compare.run_compare(cfg)
    return cfg, out, report


def _chash(cfg, out):
    return compare.run_hash(cfg, compare.prepare_caches(cfg, out))


def _plain(rows):
    return [{**r, "value": repr(r["value"])} for r in rows]  # NaN-safe comparison


def test_local_and_pooled_rows_cover_every_site(compared):
    cfg, out, report = compared
    rows = read_results(out / "results.csv")
    assert {r["method"] for r in rows} == {"local", "pooled"}
    assert all(r["synthetic"] for r in rows)
    macro = [r for r in rows if r["metric"] == "auroc_macro"]
    local_pairs = {(r["train_sites"], r["test_site"]) for r in macro if r["method"] == "local"}
    for train in SITES:  # the cross-site matrix: every site's model on every site's test split
        for test in SITES:
            assert (train, test) in local_pairs
            path = predictions_path(out / "predictions", "local", 0, train, test, _chash(cfg, out))
            assert path.is_file()
            saved = load_predictions(path)  # the config hash and the bootstrap's unit travel with them
            assert str(saved["config_hash"]) == _chash(cfg, out)
            assert len(saved["patient_ids"]) == len(saved["record_ids"])
    assert {(OWN_SITE, c) for c in [*SITES, "pooled", "mean-of-sites"]} <= local_pairs
    pooled_cols = {r["test_site"] for r in macro if r["method"] == "pooled"}
    assert pooled_cols == {*SITES, "pooled", "mean-of-sites"}
    assert {r["train_sites"] for r in macro if r["method"] == "pooled"} == {"ptb+cinc"}
    assert "(synthetic data)" in report.read_text().splitlines()[0]


def test_pooled_column_is_the_concatenation_of_saved_predictions(compared):
    cfg, out, _ = compared
    chash = _chash(cfg, out)
    rows = read_results(out / "results.csv")
    preds = [load_predictions(predictions_path(out / "predictions", "pooled", 0, "ptb+cinc", s, chash)) for s in SITES]
    expected = macro_auroc(concat_predictions(preds))
    got = next(r["value"] for r in rows if r["method"] == "pooled" and r["test_site"] == "pooled"
               and r["metric"] == "auroc_macro")
    assert not np.isnan(expected)
    assert got == pytest.approx(expected)
    own = [load_predictions(predictions_path(out / "predictions", "local", 0, s, s, chash)) for s in SITES]
    got_own = next(r["value"] for r in rows if r["method"] == "local" and r["train_sites"] == OWN_SITE
                   and r["test_site"] == "pooled" and r["metric"] == "auroc_macro")
    assert got_own == pytest.approx(macro_auroc(concat_predictions(own)), nan_ok=True)


def test_rerun_skips_finished_rows_without_training(compared, monkeypatch, capsys):
    cfg, out, _ = compared
    before = read_results(out / "results.csv")

    def must_not_train(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare, "train_local", must_not_train)
    compare.run_compare(cfg)
    assert _plain(read_results(out / "results.csv")) == _plain(before)
    assert capsys.readouterr().out.count("skip ") == 2
    # A changed hyper-parameter is a different configuration: its rows would be new.
    caches = compare.prepare_caches(cfg, out)
    changed = compare.load_config(None, [*OVERRIDES, f"out_dir={out}", "lr=0.01"])
    assert compare.run_hash(changed, caches) != compare.run_hash(cfg, caches)
    reseeded = compare.load_config(None, [*OVERRIDES, f"out_dir={out}", "seeds=[5]"])
    assert compare.run_hash(reseeded, caches) == compare.run_hash(cfg, caches)
    # federated+dp trains with the federation's DP defaults: a change of them is a new configuration
    with_dp = compare.load_config(None, [*OVERRIDES, f"out_dir={out}", "methods=[local,federated+dp]"])
    before_change = compare.run_hash(with_dp, caches)
    monkeypatch.setitem(compare.DEFAULTS, "dp-local-epochs", compare.DEFAULTS["dp-local-epochs"] + 1)
    assert compare.run_hash(with_dp, caches) != before_change
    assert compare.run_hash(cfg, caches) == compare.run_hash(reseeded, caches)  # no DP method: unchanged


def test_federated_run_config_uses_only_keys_the_app_declares(compared, tmp_path):
    cfg, out, _ = compared
    app = tomllib.loads((Path(compare.__file__).parent / "four_sites" / "pyproject.toml").read_text())
    declared = set(app["tool"]["flwr"]["app"]["config"])
    caches = {s: out / "caches" / s for s in SITES}
    for dp in (False, True):
        rc = compare.federation_run_config(cfg, caches, "fedprox", 0, dp, tmp_path)
        assert set(rc) <= declared, set(rc) - declared
    assert compare.planned_runs(compare.load_config(None, ["methods=[federated,federated+dp]",
                                                          "strategies=[fedavg,krum]"])) == [
        ("federated-fedavg", "fedavg", False), ("federated-krum", "krum", False),
        ("federated-fedavg+dp", "fedavg", True), ("federated-krum+dp", "krum", True)]


def test_thresholds_and_per_round_numbers_come_from_the_validation_split(compared, tmp_path):
    from shared.data.cache import open_cache
    from shared.federation.run_config import load_run_config
    from shared.federation.site_training import evaluate_site, new_model

    cfg, out, _ = compared
    caches = compare.prepare_caches(cfg, out)
    chash = compare.run_hash(cfg, caches)
    cache = open_cache(caches["ptb"])
    ids = {split: {cache.records[i]["record_id"] for i in cache.split_records(split)} for split in ("val", "test")}
    # the final model's validation predictions (for F1 thresholds) are saved beside its test ones
    val = load_predictions(predictions_path(out / "predictions", "pooled", 0, "ptb+cinc", "ptb", chash, "val"))
    test = load_predictions(predictions_path(out / "predictions", "pooled", 0, "ptb+cinc", "ptb", chash))
    assert set(val["record_ids"]) == ids["val"] and set(test["record_ids"]) == ids["test"]
    # per-round evaluation (client evaluate and the server's pooled curve call evaluate_site): validation
    fcfg = load_run_config(compare.federation_run_config(cfg, caches, "fedavg", 0, False, tmp_path))
    result = evaluate_site(fcfg, caches["ptb"], new_model(fcfg).state_dict())
    assert set(result.record_ids) == ids["val"]
    assert "F1 at thresholds chosen on the validation split" in (out / "report" / "report.md").read_text()


def test_dp_accountant_is_refused_not_ignored(tmp_path, capsys):
    assert compare.main(["--set", "dp.accountant=prv", f"out_dir={tmp_path}"]) == 2
    assert "dp.accountant" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert compare.main(["--set", "methods=[centralised]", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "centralised" in err and "\n" not in err
    assert compare.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_dp_rows_carry_each_sites_privacy_figures_from_rounds_csv(tmp_path):
    rounds = tmp_path / "rounds.csv"
    rounds.write_text(
        "round,site,metric,value\n"
        "1,ptb,steps,10\n1,ptb,epsilon,1.5\n1,ptb,delta,0.001\n1,ptb,dp_units_record,90\n"
        "1,ptb,dp_sample_rate,0.1\n1,ptb,dp_noise_multiplier,1.1\n1,ptb,dp_max_grad_norm,1.0\n"
        "2,ptb,steps,10\n2,ptb,epsilon,2.5\n2,ptb,delta,0.001\n2,pooled,auroc_macro,0.7\n")
    kw = dict(train_sites="ptb", seed=0, chash="abc", synthetic=True, sites=["ptb"])
    final = {r["metric"]: r["value"] for r in compare.rounds_rows(rounds, method="federated-fedavg+dp", **kw)
             if not r["metric"].startswith("round_")}
    assert final == {"epsilon": 2.5, "delta": 0.001, "dp_units_record": 90.0, "dp_sample_rate": 0.1,
                     "dp_noise_multiplier": 1.1, "dp_max_grad_norm": 1.0, "dp_steps": 20.0}
    plain = compare.rounds_rows(rounds, method="federated-fedavg", **kw)
    assert all(r["metric"].startswith("round_") for r in plain)
