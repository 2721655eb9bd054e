"""A real federation on 127.0.0.1: `python -m server` (TLS + SuperNode authentication), four
registered `python -m client` sites on small SYNTHETIC caches, and `flwr run
simulations/four_sites <connection>` for one round of the tiny model with evaluation (rounds that
chain, a node killed mid-round and a resumed run are tests/test_deploy_faults.py's). Then the run
is checked through Flower's own record (`flwr ls`: finished:completed) and the server's outputs
(rounds.csv rows from every site, each site played by its own node, the checkpoint)."""

from __future__ import annotations

import csv
import re

import pytest

from deploy_harness import (
    REPO_ROOT,
    Federation,
    Processes,
    flwr_env,
    make_caches,
    make_certs,
    run_log,
    submit_run,
    wait_run,
)

pytestmark = pytest.mark.slow

SITES = ("ptb", "ptbxl", "mimic", "cinc")
APP = REPO_ROOT / "simulations" / "four_sites"


def tiny_run_config(out_dir, rounds: int = 1, extra: str = "") -> str:
    return (
        f'num-server-rounds={rounds} preset="tiny" model="hierarchical" batch-size=16 '
        f'server-eval="off" node-wait-timeout=60.0 round-timeout=120.0 device="cpu" '
        f'out-dir="{out_dir}" {extra}'
    ).strip()


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    caches = make_caches(base / "deploy-caches", SITES, records=12)
    certs = make_certs(base / "deploy-certs", SITES)
    return caches, certs


def read_rounds(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_four_registered_sites_complete_a_round_over_tls(material, tmp_path):
    caches, certs = material
    processes = Processes(log_dir=tmp_path, env=flwr_env(tmp_path / "flwr-home"))
    fed = Federation(processes, state_dir=tmp_path / "state", certs=certs)
    try:
        fed.start_server(tls=True, node_auth=True)
        fed.register_all([certs / "sites" / f"{site}.key.pub" for site in SITES], list(SITES))
        sites = {s: fed.start_site(s, caches[s], key=certs / "sites" / f"{s}.key") for s in SITES}
        fed.wait_online(4, timeout=90)

        out_dir = tmp_path / "run"
        run_id = submit_run(processes.env, APP, fed.connection, tiny_run_config(out_dir))
        status = wait_run(processes.env, fed.connection, run_id, timeout=480)
        log = run_log(processes.env, fed.connection, run_id)
        assert status["status"] == "finished:completed", (status, log)

        rows = read_rounds(out_dir / "rounds.csv")
        trained = {r["site"] for r in rows if r["round"] == "1" and r["metric"] == "num_examples"}
        evaluated = {r["site"] for r in rows if r["round"] == "1" and r["metric"] == "loss"}
        assert trained == evaluated == set(SITES), rows
        # each site's messages went to the node bound to it: one site per node
        assert re.search(r"sites by node: " + "; ".join([r"node \d+: \w+"] * 4) + "$", log, re.M), log
        assert (out_dir / "checkpoint.pt").is_file()
        # no site was left out of any round
        assert (out_dir / "failures.csv").read_text().splitlines() == [
            "round,site,node_id,time_utc,reason"]
        from shared.training import load_checkpoint

        assert load_checkpoint(out_dir / "checkpoint.pt")["round"] == 1
        # every site trained in its own SuperNode, on its own node-config data
        for site, proc in sites.items():
            assert proc.alive(), proc.log()
            assert "TLS" in proc.log()
    finally:
        processes.stop_all()
