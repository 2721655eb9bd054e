"""The Flower apps in a real four-node simulation (SuperLink, Ray, ServerApp, ClientApps), each
in an isolated FLWR_HOME on a free port, the SuperLink stopped by PID; success is read from the
run's status (``flwr ls``), never from ``flwr run``'s exit code."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.federation import DEFAULT_APP_DIR, run_federation
from shared.training import load_checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SITES = ["ptb", "ptbxl", "mimic", "cinc"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("model, strategy, nodes", [
    ("hierarchical", "fedavg", None),  # Flower's default node count (2): two sites per node
    ("cardioformer", "fedprox", 4),    # one node per site
])
def test_four_site_simulation_runs_two_rounds(model, strategy, nodes, synthetic_cache_root, tmp_path):
    out = tmp_path / "out"
    result = run_federation(
        DEFAULT_APP_DIR,
        {"model": model, "strategy": strategy, "num-server-rounds": 2, "synthetic-records": 12,
         "batch-size": 16, "local-epochs": 1, "dp-local-epochs": 1, "device": "cpu", "out-dir": str(out)},
        num_supernodes=nodes, flwr_home=tmp_path / "flwr-home", timeout=400,
    )
    assert result.ok, f"status {result.status}: {result.details}\n{result.log[-4000:]}"
    rows = _rows(out / "rounds.csv")
    for rnd in ("1", "2"):
        trained = {r["site"] for r in rows if r["round"] == rnd and r["metric"] == "num_examples"
                   and float(r["value"]) > 0}
        assert trained == set(SITES), (rnd, trained)
        assert any(r["round"] == rnd and r["site"] == "pooled" for r in rows)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["round"] == 2 and ckpt["run_config"]["strategy"] == strategy
    assert ckpt["model_config"]  # rebuildable
    assert "round 2/2" in result.log and "mean of sites" in result.log and "SYNTHETIC" in result.log
    assert "SYNTHETIC" in (out / "summary.md").read_text()
    assert result.log.count("sites by node: node ") == 1
    # what a person reads: our lines, not Flower's per-round MetricRecord dumps or library warnings
    for noise in ("Aggregated ClientApp-side", "configure_train", "Warning", "deprecat"):
        assert noise not in result.log, (noise, result.log[-4000:])


def test_failed_run_exits_non_zero_from_the_wrapper(synthetic_cache_root, tmp_path):
    """A site whose cache path holds no cache: its node's error is reported, the run ends
    finished:failed, and ``python -m simulations.run`` exits 1 although flwr run exits 0."""
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"))
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", "--timeout", "240",
         "-c", f'sites="ptb" cache-ptb="{tmp_path / "no-cache"}" num-server-rounds=1 out-dir="{tmp_path / "out"}"'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finished:failed" in proc.stderr
    assert "is not a prepared cache (no manifest.json)" in proc.stdout


def test_bad_config_exits_2_before_starting_anything():
    proc = subprocess.run([sys.executable, "-m", "simulations.run", "-c", "lr=-1"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "lr" in proc.stderr and "Traceback" not in proc.stderr
