"""The comparison report: its numbers are recomputed here from the saved predictions (pooled =
concatenation, never an average), the CSV is atomic and resumable, synthetic results say so."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

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
from shared.training.evaluate import EvalResult, save_predictions

SITES = ["ptb", "ptbxl", "mimic", "cinc"]
CLASSES = ["NORM", "MI", "STTC"]


def _fake_predictions(rng, n: int, skill: float, offset: float, unknown_class: int | None = None):
    """Record-level predictions with a site-specific calibration offset (so that the pooled AUROC
    differs from the mean of the sites' AUROCs)."""
    targets = (rng.random((n, len(CLASSES))) < 0.4).astype(np.float32)
    mask = np.ones_like(targets)
    if unknown_class is not None:
        mask[:, unknown_class] = 0
    logits = skill * (2 * targets - 1) + rng.normal(size=targets.shape) + offset
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    return EvalResult(loss=0.0, auroc_per_class=np.zeros(3), auroc_macro=0.0, num_examples=n,
                      record_ids=np.array([f"r{i}" for i in range(n)]), probs=probs, targets=targets, mask=mask)


def _write_run(tmp_path, rng, method, train_sites, skill, seed, csv, preds_dir, synthetic=True, extra=()):
    preds = {}
    for i, test in enumerate(SITES):
        res = _fake_predictions(rng, 40, skill, offset=1.5 * i, unknown_class=2 if test == "ptb" else None)
        path = save_predictions(predictions_path(preds_dir, method, seed, train_sites, test), res, CLASSES)
        preds[test] = {**res.to_arrays(), "classes": np.array(CLASSES)}
        assert path.is_file()
    rows = score_rows(preds, method=method, train_sites=train_sites, seed=seed, config_hash="abc",
                      round=3, synthetic=synthetic)
    append_results(csv, [*rows, *extra])
    return preds


def _recomputed_macro(pred_list):
    probs = np.concatenate([p["probs"] for p in pred_list])
    targets = np.concatenate([p["targets"] for p in pred_list])
    mask = np.concatenate([p["mask"] for p in pred_list])
    aucs = []
    for k in range(probs.shape[1]):
        known = mask[:, k] > 0
        y = targets[known, k]
        if 0 < y.sum() < y.size:
            aucs.append(roc_auc_score(y, probs[known, k]))
    return float(np.mean(aucs))


@pytest.fixture(scope="module")
def one_seed_report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    csv, preds_dir = tmp_path / "results.csv", tmp_path / "predictions"
    preds = {}
    own = {}
    for s in SITES:  # local: each site's model on every site's test split
        p = _write_run(tmp_path, rng, "local", s, 1.0, 0, csv, preds_dir)
        own[s] = p[s]
    append_results(csv, score_rows(own, method="local", train_sites=OWN_SITE, seed=0, config_hash="abc",
                                   round=3, synthetic=True))
    preds["local"] = own
    preds["pooled"] = _write_run(tmp_path, rng, "pooled", "+".join(SITES), 1.5, 0, csv, preds_dir)
    preds["federated-fedavg"] = _write_run(tmp_path, rng, "federated-fedavg", "+".join(SITES), 1.2, 0, csv, preds_dir)
    eps = [make_row(method="federated-fedavg+dp", train_sites="+".join(SITES), test_site=s, metric="epsilon",
                    value=2.0 + i, seed=0, config_hash="abc", round=3, synthetic=True) for i, s in enumerate(SITES)]
    eps.append(make_row(method="federated-fedavg+dp", train_sites="+".join(SITES), test_site="ptb",
                        metric="delta", value=1e-5, seed=0, config_hash="abc", round=3, synthetic=True))
    per_round = [make_row(method="federated-fedavg", train_sites="+".join(SITES), test_site=s,
                          metric="round_auroc_macro", value=0.5 + 0.1 * r, seed=0, config_hash="abc", round=r,
                          synthetic=True) for r in range(4) for s in [*SITES, "pooled"]]
    preds["federated-fedavg+dp"] = _write_run(tmp_path, rng, "federated-fedavg+dp", "+".join(SITES), 0.8, 0,
                                              csv, preds_dir, extra=[*eps, *per_round])
    out = tmp_path / "report"
    report = build_report(csv, preds_dir, out, n_boot=40)
    return report, preds, csv


def _table(text: str, heading: str) -> dict[str, list[str]]:
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


def test_report_numbers_are_recomputed_from_saved_predictions(one_seed_report):
    report, preds, _ = one_seed_report
    text = report.read_text()
    table = _table(text, "Macro AUROC per test site")
    for method, by_site in preds.items():
        site_aucs = {s: _recomputed_macro([by_site[s]]) for s in SITES}
        for s in SITES:
            assert _num(table[method][s]) == pytest.approx(site_aucs[s], abs=6e-4)
        pooled = _recomputed_macro([by_site[s] for s in SITES])
        mean_of_sites = float(np.mean(list(site_aucs.values())))
        assert _num(table[method]["pooled"]) == pytest.approx(pooled, abs=6e-4)
        assert _num(table[method]["mean-of-sites"]) == pytest.approx(mean_of_sites, abs=6e-4)
        assert abs(pooled - mean_of_sites) > 0.01  # the two really are different numbers
        lo, hi = map(float, re.search(r"\[(\d\.\d+), (\d\.\d+)\]", table[method]["pooled"]).groups())
        assert lo <= pooled + 1e-3 and hi >= pooled - 1e-3 and lo < hi  # bootstrap interval, one seed

    diff = _table(text, "Federated minus pooled")
    fed = _recomputed_macro([preds["federated-fedavg"][s] for s in SITES])
    pool = _recomputed_macro([preds["pooled"][s] for s in SITES])
    assert _num(diff["federated-fedavg"]["pooled"]) == pytest.approx(fed - pool, abs=1.1e-3)


def test_cross_site_matrix_and_epsilon_and_plots(one_seed_report):
    report, _, csv = one_seed_report
    text = report.read_text()
    matrix = _table(text, "Cross-site matrix")
    rows = read_results(csv)
    for train in SITES:
        for test in SITES:
            v = [r["value"] for r in rows if r["method"] == "local" and r["train_sites"] == train
                 and r["test_site"] == test and r["metric"] == "auroc_macro"]
            assert _num(matrix[train][test]) == pytest.approx(v[0], abs=6e-4)
    eps = _table(text, "Privacy spent per site")
    assert [_num(eps["federated-fedavg+dp"][s]) for s in SITES] == [2.0, 3.0, 4.0, 5.0]
    for png in ("cross_site_heatmap.png", "auroc_per_round.png", "roc_curves.png"):
        assert (report.parent / png).read_bytes()[:4] == b"\x89PNG"


def test_synthetic_results_are_labelled_everywhere(one_seed_report):
    text = one_seed_report[0].read_text()
    headings = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert headings and all("synthetic" in h.lower() for h in headings)
    images = re.findall(r"!\[([^\]]*)\]", text)
    assert len(images) == 3 and all("synthetic" in alt.lower() for alt in images)


def test_several_seeds_give_mean_and_spread(tmp_path):
    rng = np.random.default_rng(1)
    csv, preds_dir = tmp_path / "r.csv", tmp_path / "p"
    values = []
    for seed in (0, 1, 2):
        p = _write_run(tmp_path, rng, "pooled", "+".join(SITES), 1.0, seed, csv, preds_dir, synthetic=False)
        values.append(_recomputed_macro([p[s] for s in SITES]))
    text = build_report(csv, preds_dir, tmp_path / "out").read_text()
    assert "synthetic" not in text.lower()
    cell = _table(text, "Macro AUROC per test site")["pooled"]["pooled"]
    assert cell == f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} (n=3)"


def test_results_csv_is_appended_atomically_and_resumable(tmp_path):
    csv = tmp_path / "results.csv"
    row = make_row(method="pooled", train_sites="a+b", test_site="pooled", metric="auroc_macro", value=0.7,
                   seed=1, config_hash="h1", round=5, synthetic=True)
    append_results(csv, [row])
    append_results(csv, [{**row, "seed": 2, "value": float("nan")}])
    rows = read_results(csv)
    assert len(rows) == 2 and np.isnan(rows[1]["value"]) and rows[0]["synthetic"] is True
    assert finished_runs(csv) == {("pooled", 1, "h1"), ("pooled", 2, "h1")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
    with pytest.raises(ValueError, match="lacks"):
        append_results(csv, [{"method": "x"}])
    assert len(read_results(csv)) == 2  # a failed append leaves the file as it was
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv"):
        read_results(bad)


def test_cli_reports_a_missing_file_in_one_line(tmp_path, capsys):
    from shared.report.__main__ import main

    assert main([str(tmp_path / "none.csv"), str(tmp_path), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "none.csv" in err and len(err.strip().splitlines()) == 1


def test_bootstrap_auroc_equals_the_project_metric():
    from shared.metrics import masked_macro_auroc
    from shared.report.scores import fast_macro_auroc

    rng = np.random.default_rng(5)
    probs = np.round(rng.random((50, 3)), 1)  # many ties
    targets = (rng.random((50, 3)) < 0.3).astype(float)
    mask = (rng.random((50, 3)) < 0.8).astype(float)
    assert fast_macro_auroc(probs, targets, mask) == pytest.approx(masked_macro_auroc(probs, targets, mask)[1])
