"""The comparison report: numbers recomputed from the saved predictions (pooled = concatenation),
one config per report, paired patient-level intervals on every difference, the cross-site matrix on
the classes known at both sites, n/a with a reason, synthetic results say so."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from shared.report import (
    OWN_SITE,
    append_results,
    build_report,
    finished_runs,
    make_row,
    predictions_path,
    read_results,
    score_rows,
)
from shared.report.scores import (
    Bootstrap,
    best_f1_thresholds,
    f1_scores,
    patient_weights,
    weighted_auroc,
    weighted_average_precision,
)
from shared.training.evaluate import EvalResult, save_predictions

SITES = ["ptb", "ptbxl", "mimic", "cinc"]
CLASSES = ["NORM", "MI", "STTC"]
ALL = "+".join(SITES)
N = 40  # test records per site: 20 patients of 2 records


def _truth(site: str, split: str = "test"):
    """Fixed targets and mask of a site's split (every method scores the same records)."""
    rng = np.random.default_rng([SITES.index(site), split == "val"])
    targets = (rng.random((N, len(CLASSES))) < 0.4).astype(np.float32)
    mask = np.ones_like(targets)
    if site == "ptb":
        mask[:, 2] = 0  # PTB cannot state STTC
    if site == "cinc" and split == "test":
        targets[:, 1] = 0  # no MI positive in cinc's test split: n/a with the reason
    return targets, mask


def _result(rng, site, skill, split="test"):
    targets, mask = _truth(site, split)
    logits = skill * (2 * targets - 1) + rng.normal(size=targets.shape) + 1.5 * SITES.index(site)
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    return EvalResult(loss=0.0, auroc_per_class=np.zeros(3), auroc_macro=0.0, num_examples=N,
                      record_ids=np.array([f"{site}{i:02d}" for i in range(N)]), probs=probs, targets=targets,
                      mask=mask)


def _save(preds_dir, method, seed, train, test, res, split="test", chash="abc"):
    return save_predictions(predictions_path(preds_dir, method, seed, train, test, chash, split), res, CLASSES,
                            patient_ids=[f"p{i // 2}" for i in range(N)], config_hash=chash)


def _write_run(rng, method, train_sites, skill, seed, csv, preds_dir, *, chash="abc", sites=SITES, extra=()):
    preds = {}
    for test in sites:
        res = _result(rng, test, skill)
        _save(preds_dir, method, seed, train_sites, test, res, chash=chash)
        preds[test] = {**res.to_arrays(), "classes": np.array(CLASSES)}
        if train_sites in (ALL, test):
            _save(preds_dir, method, seed, train_sites, test, _result(rng, test, skill, "val"), "val", chash)
    rows = score_rows(preds, method=method, train_sites=train_sites, seed=seed, config_hash=chash,
                      round=3, synthetic=True)
    append_results(csv, [*rows, *extra])
    return preds


def _write_all(tmp_path, seeds=(0,), chash="abc"):
    rng = np.random.default_rng(0)
    csv, preds_dir = tmp_path / "results.csv", tmp_path / "predictions"
    preds: dict = {"local": {}, "local_all": {}}
    for seed in seeds:
        own = {}
        for s in SITES:  # local: each site's model on every site's test split
            p = _write_run(rng, "local", s, 1.0, seed, csv, preds_dir, chash=chash)
            own[s] = p[s]
            preds["local_all"][(seed, s)] = p
        append_results(csv, score_rows(own, method="local", train_sites=OWN_SITE, seed=seed, config_hash=chash,
                                       round=3, synthetic=True))
        preds["local"][seed] = own
        preds.setdefault("pooled", {})[seed] = _write_run(rng, "pooled", ALL, 1.5, seed, csv, preds_dir, chash=chash)
        preds.setdefault("federated-fedavg", {})[seed] = _write_run(rng, "federated-fedavg", ALL, 1.2, seed, csv,
                                                                    preds_dir, chash=chash)
        dp_figures = {"epsilon": 2.0, "delta": 1e-3, "dp_units_record": 90.0, "dp_sample_rate": 1 / 45,
                      "dp_steps": 135.0, "dp_noise_multiplier": 1.1, "dp_max_grad_norm": 1.0}
        eps = [make_row(method="federated-fedavg+dp", train_sites=ALL, test_site=s, metric=metric,
                        value=value + (i if metric == "epsilon" else 0), seed=seed, config_hash=chash, round=3,
                        synthetic=True)
               for i, s in enumerate(SITES) for metric, value in dp_figures.items()]
        per_round = [make_row(method="federated-fedavg", train_sites=ALL, test_site=s,
                              metric="round_auroc_macro", value=0.5 + 0.1 * r, seed=seed, config_hash=chash,
                              round=r, synthetic=True) for r in range(4) for s in [*SITES, "pooled"]]
        preds.setdefault("federated-fedavg+dp", {})[seed] = _write_run(
            rng, "federated-fedavg+dp", ALL, 0.8, seed, csv, preds_dir, chash=chash, extra=[*eps, *per_round])
    return csv, preds_dir, preds


@pytest.fixture(scope="module")
def one_seed_report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    csv, preds_dir, preds = _write_all(tmp_path)
    report = build_report(csv, preds_dir, tmp_path / "report", n_boot=300)
    return report, preds, csv


def _table(text: str, heading: str) -> dict[str, dict[str, str]]:
    block = text.split(heading, 1)[1].split("\n### ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def _num(cell: str) -> float:
    return float(re.match(r"[+-]?\d+\.\d+", cell).group(0))


def _interval(cell: str) -> tuple[float, float]:
    lo, hi = re.search(r"\[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]", cell).groups()
    return float(lo), float(hi)


def _macro(pred_list, classes=None, metric=roc_auc_score):
    probs = np.concatenate([p["probs"] for p in pred_list])
    targets = np.concatenate([p["targets"] for p in pred_list])
    mask = np.concatenate([p["mask"] for p in pred_list])
    aucs = []
    for k in range(probs.shape[1]) if classes is None else classes:
        known = mask[:, k] > 0
        y = targets[known, k]
        if 0 < y.sum() < y.size:
            aucs.append(metric(y, probs[known, k]))
    return float(np.mean(aucs))


def test_report_numbers_are_recomputed_from_saved_predictions(one_seed_report):
    report, preds, _ = one_seed_report
    text = report.read_text()
    for heading, metric in (("### Macro AUROC per test site", roc_auc_score),
                            ("### Macro AUPRC", average_precision_score)):
        table = _table(text, heading)
        for method in ("pooled", "federated-fedavg"):
            p = preds[method][0]
            site_vals = {s: _macro([p[s]], metric=metric) for s in SITES}
            for s in SITES:
                assert _num(table[method][s]) == pytest.approx(site_vals[s], abs=6e-4)
            pooled = _macro(list(p.values()), metric=metric)
            assert _num(table[method]["pooled"]) == pytest.approx(pooled, abs=6e-4)
            assert _num(table[method]["mean-of-sites"]) == pytest.approx(np.mean(list(site_vals.values())), abs=6e-4)
            lo, hi = _interval(table[method]["pooled"])
            assert lo <= pooled <= hi and lo < hi


def test_every_difference_has_a_paired_interval_and_says_when_it_crosses_zero(one_seed_report):
    report, preds, _ = one_seed_report
    diff = _table(report.read_text(), "### Differences, macro AUROC")
    assert set(diff) == {"federated-fedavg − pooled", "federated-fedavg − local", "federated-fedavg+dp − pooled",
                         "federated-fedavg+dp − local", "federated-fedavg+dp − federated-fedavg"}
    fed, pool = _macro(list(preds["federated-fedavg"][0].values())), _macro(list(preds["pooled"][0].values()))
    cell = diff["federated-fedavg − pooled"]["pooled"]
    assert _num(cell) == pytest.approx(fed - pool, abs=1.1e-3)
    for row in diff.values():
        for col in [*SITES, "mean-of-sites", "pooled"]:
            lo, hi = _interval(row[col])
            assert lo <= _num(row[col]) + 1e-9 and _num(row[col]) <= hi + 1e-9
            assert ("(crosses 0)" in row[col]) == (lo <= 0 <= hi)


def test_bootstrap_resamples_patients_and_pairs_methods():
    groups = np.array(["a", "a", "b", "c", "c", "c", "d"])
    w = patient_weights(groups, 500, np.random.default_rng(0))
    assert w.shape == (500, 7)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 4]).all() and (w[:, 4] == w[:, 5]).all()
    assert (w[:, [0, 2, 3, 6]].sum(axis=1) == 4).all()  # four patients drawn per replicate
    assert not (w[:, 0] == w[:, 2]).all()

    rng = np.random.default_rng(1)
    targets = (rng.random((30, 2)) < 0.5).astype(float)
    mask = np.ones_like(targets)
    a = {"probs": rng.random((30, 2)), "targets": targets, "mask": mask, "record_ids": np.arange(30).astype(str)}
    b = {**a, "probs": rng.random((30, 2))}
    boot = Bootstrap({"s": np.repeat(np.arange(15), 2).astype(str)}, n_boot=200, seed=0)
    ra, rb = boot.columns({"s": a})["s"], boot.columns({"s": b})["s"]
    assert ra[0] == pytest.approx(_macro([a]))
    # paired: the same replicate weights for both methods, so a - a is exactly 0 everywhere
    assert (boot.columns({"s": a})["s"] == ra).all()
    weights = boot.weights["s"][1:]
    k = 7
    rep = np.repeat(np.arange(30), weights[k].astype(int))
    expected = np.mean([roc_auc_score(targets[rep, c], a["probs"][rep, c]) for c in range(2)])
    assert ra[1 + k] == pytest.approx(expected)


def test_weighted_metrics_equal_scikit_learn_on_repeated_records():
    rng = np.random.default_rng(3)
    for _ in range(20):
        s = np.round(rng.random(25), 1)  # ties
        y = rng.random(25) < 0.4
        w = rng.integers(0, 3, 25)
        rep = np.repeat(np.arange(25), w)
        if not 0 < y[rep].sum() < rep.size:
            continue
        assert weighted_auroc(s, y, w[None])[0] == pytest.approx(roc_auc_score(y[rep], s[rep]))
        assert weighted_average_precision(s, y, w[None])[0] == pytest.approx(average_precision_score(y[rep], s[rep]))


def test_cross_site_cells_cover_the_classes_known_at_both_sites(one_seed_report):
    report, preds, _ = one_seed_report
    text = report.read_text()
    matrix = _table(text, "### Cross-site matrix")
    local = preds["local_all"]
    for train in SITES:
        for test in SITES:
            cell = matrix[train][test]
            classes = [0, 1] if "ptb" in (train, test) else [0, 1, 2]
            assert cell.endswith("(NORM,MI)" if "ptb" in (train, test) else "(all)"), cell
            assert _num(cell) == pytest.approx(_macro([local[(0, train)][test]], classes), abs=6e-4)
    # the gap: in-site minus cross-site on each cell's own classes, with an interval
    own = local[(0, "ptb")]["ptb"]
    gap = np.mean([_macro([own], [0, 1]) - _macro([local[(0, "ptb")][t]], [0, 1]) for t in SITES[1:]])
    cell = matrix["ptb"]["gap (in-site − cross-site)"]
    assert _num(cell) == pytest.approx(gap, abs=1.5e-3)
    _interval(cell)
    out = report.parent
    sttc = (out / "cross_site_STTC.csv").read_text().splitlines()
    assert sttc[0] == "trained_on,ptb,ptbxl,mimic,cinc"
    assert sttc[1].startswith("ptb,n/a (not available at ptb)")
    assert "n/a (not available at ptb)" in sttc[2].split(",")[1]
    for name in ("cross_site_macro.csv", *(f"cross_site_{c}.csv" for c in CLASSES)):
        assert (out / name).is_file()
    for png in ("cross_site_heatmap.png", *(f"cross_site_{c}.png" for c in CLASSES), "auroc_per_round.png",
                "roc_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_undefined_auroc_is_na_with_its_reason_never_half(one_seed_report):
    report, _, _ = one_seed_report
    per_class = report.read_text().split("### Per-class AUROC", 1)[1].split("\n### ", 1)[0]
    rows = [ln for ln in per_class.splitlines() if ln.startswith("| pooled | cinc |")]
    assert rows and "n/a (no positive among 40 records)" in rows[0]
    rows = [ln for ln in per_class.splitlines() if ln.startswith("| pooled | ptb |")]
    assert "n/a (class not available at this site)" in rows[0]
    assert "0.500" not in per_class


def test_f1_uses_thresholds_chosen_on_validation(one_seed_report):
    report, preds, _ = one_seed_report
    f1 = _table(report.read_text(), "### F1 at thresholds chosen on the validation split")
    rng = np.random.default_rng(5)
    # thresholds from the validation split, applied once to the test split
    val = {"probs": rng.random((50, 1)), "targets": (rng.random((50, 1)) < 0.3).astype(float),
           "mask": np.ones((50, 1))}
    th = best_f1_thresholds(val)
    grid = [f1_scores(val, np.array([t]))[1] for t in np.unique(val["probs"])]
    assert f1_scores(val, th)[1] == pytest.approx(max(grid))
    assert set(f1) == {"local", "pooled", "federated-fedavg", "federated-fedavg+dp"}
    assert all(0 <= _num(row["macro F1"]) <= 1 for row in f1.values())


def test_a_report_covers_one_config_and_names_foreign_ones(tmp_path):
    csv, preds_dir, _ = _write_all(tmp_path)
    rng = np.random.default_rng(9)
    _write_run(rng, "pooled", ALL, 1.0, 0, csv, preds_dir, chash="zzz")
    with pytest.raises(ValueError, match=r"2 configs \(abc \(\d+ rows\), zzz \(\d+ rows\)\)"):
        build_report(csv, preds_dir, tmp_path / "r", n_boot=20)
    text = build_report(csv, preds_dir, tmp_path / "r", n_boot=20, config_hash="abc").read_text()
    assert "config hash `abc` only" in text and "zzz" in text
    with pytest.raises(ValueError, match="no rows with config hash 'nope'"):
        build_report(csv, preds_dir, tmp_path / "r", n_boot=20, config_hash="nope")
    # a prediction file of another config under this config's name: refused, named
    path = predictions_path(preds_dir, "pooled", 0, ALL, "ptb", "abc")
    _save(preds_dir, "pooled", 0, ALL, "ptb", _result(rng, "ptb", 1.0), chash="zzz")
    path.unlink()
    predictions_path(preds_dir, "pooled", 0, ALL, "ptb", "zzz").rename(path)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: predictions of config zzz"):
        build_report(csv, preds_dir, tmp_path / "r", n_boot=20, config_hash="abc")


def test_results_of_another_project_version_are_refused_by_name(tmp_path):
    old = tmp_path / "results.csv"
    old.write_text("method,train_sites,test_site,metric,value,seed,config_hash,round,synthetic\n"
                   "pooled,a,ptb,auroc_macro,0.7,0,c00cf0bc18ae,8,true\n")
    with pytest.raises(ValueError, match="results.csv: written by an earlier version"):
        read_results(old)
    row = make_row(method="pooled", train_sites="a", test_site="ptb", metric="auroc_macro", value=0.7, seed=0,
                   config_hash="h", round=1, synthetic=False)
    append_results(tmp_path / "new.csv", [row])
    text = (tmp_path / "new.csv").read_text().replace(",false,2\n", ",false,7\n")
    (tmp_path / "new.csv").write_text(text)
    with pytest.raises(ValueError, match=r"new.csv, line 2: results_version 7 .*config h"):
        read_results(tmp_path / "new.csv")


def test_synthetic_results_are_labelled_everywhere(one_seed_report):
    report, _, _ = one_seed_report
    text = report.read_text()
    headings = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert headings and all("synthetic" in h.lower() for h in headings)
    images = re.findall(r"!\[([^\]]*)\]", text)
    assert len(images) == 3 and all("synthetic" in alt.lower() for alt in images)


def test_several_seeds_are_combined_in_one_interval(tmp_path):
    csv, preds_dir, preds = _write_all(tmp_path, seeds=(0, 1, 2))
    text = build_report(csv, preds_dir, tmp_path / "out", n_boot=100).read_text()
    cell = _table(text, "### Macro AUROC per test site")["pooled"]["pooled"]
    values = [_macro(list(preds["pooled"][s].values())) for s in (0, 1, 2)]
    assert _num(cell) == pytest.approx(np.mean(values), abs=6e-4)
    diff = _table(text, "### Differences, macro AUROC")["federated-fedavg − pooled"]
    assert diff["seeds"] == "3"
    want = np.mean([_macro(list(preds["federated-fedavg"][s].values())) - values[s] for s in (0, 1, 2)])
    assert _num(diff["pooled"]) == pytest.approx(want, abs=1.1e-3)


def test_results_csv_is_appended_atomically_and_resumable(tmp_path):
    csv = tmp_path / "results.csv"
    row = dict(method="pooled", train_sites="a", test_site="ptb", metric="auroc_macro", value=0.7, seed=1,
               config_hash="h1", round=3, synthetic=True)
    append_results(csv, [make_row(**row)])
    append_results(csv, [make_row(**{**row, "seed": 2, "value": float("nan")})])
    rows = read_results(csv)
    assert len(rows) == 2 and np.isnan(rows[1]["value"]) and rows[0]["synthetic"] is True
    assert finished_runs(csv) == {("pooled", 1, "h1"), ("pooled", 2, "h1")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
    with pytest.raises(ValueError):
        append_results(csv, [{"method": "x"}])
    assert len(read_results(csv)) == 2  # a failed append leaves the file as it was


def test_cli_reports_a_missing_file_in_one_line(tmp_path, capsys):
    from shared.report.__main__ import main

    assert main([str(tmp_path / "none.csv"), str(tmp_path), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "none.csv" in err and len(err.strip().splitlines()) == 1


def test_privacy_table_states_unit_rate_steps_noise_clip_delta_and_epsilon_per_site(one_seed_report):
    report, _, _ = one_seed_report
    text = report.read_text()
    header = "| method | site | unit | N | q | steps | noise | clip | delta | epsilon |"
    assert header in text
    table = text[text.index(header):]
    row = next(line for line in table.splitlines() if line.startswith(f"| federated-fedavg+dp | {SITES[1]} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["record", "90", "0.02222", "135", "1.1", "1", "0.001", "3.000"], row
