"""Fault cases with real processes on 127.0.0.1: one TLS SuperLink with SuperNode
authentication (`python -m server`), each site's key registered under its site name, and run
configs at their defaults (evaluation on, min-replies = a majority, server-eval = auto) apart
from the size of the model and data and the rounds.

One deployment for every case (each deployment costs its start-up, and each kill ~30-60 s of
Flower's heartbeat timeout):

* run A, 3 rounds over ptbxl, mimic, cinc, while two more nodes try to join: a second key
  registered as ``ptbxl`` (duplicate site: refused) and a node whose installed fed-ecg version
  differs (refused, naming both versions). mimic's node is killed (SIGKILL) when round 1's
  training message reaches it: round 1 aggregates the survivors once Flower reports the dead
  node, the drop is reported (log, failures.csv, rounds.csv), and mimic, restarted with its key
  (same node id), rejoins by round 3;
* run B, submitted right after mimic's node is killed again, needs all three sites
  (min-replies = 3; min-nodes = 2 and node-wait-timeout = 30 s so that it starts): after 30 s
  without a node for mimic (counted from the run's start) round 1 cannot start, and the run ends
  with a clear error naming the round and the sites that have a node, not a hang.

Every process is stopped by the module fixture, also when a case fails.
"""

from __future__ import annotations

import csv
import re
import time

import pytest

from deploy_harness import (
    REPO_ROOT,
    Federation,
    Processes,
    flwr_env,
    installed_version_env,
    make_caches,
    make_certs,
    run_log,
    submit_run,
    wait_run,
)

pytestmark = pytest.mark.slow

SITES = ("ptbxl", "mimic", "cinc")
# (site, seed) of each small SYNTHETIC cache: seeds whose validation split (where sites evaluate
# each round) is not empty at 16 records
CACHE_SEEDS = {"ptbxl": 1, "mimic": 102, "cinc": 103, "ptb": 100}
APP = REPO_ROOT / "simulations" / "four_sites"
OTHER_VERSION = "0.0.1"


def run_config(out_dir, rounds, extra=""):
    """Defaults, apart from a tiny model on tiny data, on the CPU, and the rounds."""
    values = {
        "num-server-rounds": str(rounds), "preset": '"tiny"', "model": '"hierarchical"',
        "batch-size": "16", "device": '"cpu"', "sites": f'"{",".join(SITES)}"', "out-dir": f'"{out_dir}"',
    }
    for pair in extra.split():
        key, value = pair.split("=", 1)
        values[key] = value
    return " ".join(f"{k}={v}" for k, v in values.items())


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def wait_file_row(path, match, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            rows = [r for r in read_csv(path) if match(r)]
            if rows:
                return rows[0]
        time.sleep(0.5)
    raise AssertionError(f"no {what} in {path} after {timeout} s")


def train_messages(run_id: int, count: int) -> str:
    """A node log pattern: the ``count``-th training message of run ``run_id`` arrived."""
    return r"[\s\S]*".join([rf"\[RUN {run_id}\][\s\S]*Receiving: train message"] * count)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    caches = {site: make_caches(base / f"fault-caches-{seed}", (site,), records=16, seed=seed)[site]
              for site, seed in CACHE_SEEDS.items()}
    certs = make_certs(base / "deploy-certs", ("ptb", "ptbxl", "mimic", "cinc", "ptbxl-second"))
    root = tmp_path_factory.mktemp("faults")
    processes = Processes(log_dir=root, env=flwr_env(root / "flwr-home"))
    fed = Federation(processes, state_dir=root / "state", certs=certs)
    key = {k: certs / "sites" / f"{k}.key" for k in ("ptb", "ptbxl", "mimic", "cinc", "ptbxl-second")}
    try:
        fed.start_server(tls=True, node_auth=True)
        # each public key under the site it may play; a second key for ptbxl; ptb is not in the runs
        fed.register_all([key[k].with_suffix(".key.pub") for k in key], ["ptb", "ptbxl", "mimic", "cinc", "ptbxl"])
        nodes = {s: fed.start_site(s, caches[s], key=key[s]) for s in SITES}
        nodes["ptbxl-second"] = fed.start_site("ptbxl", caches["ptbxl"], key=key["ptbxl-second"],
                                               name="site-ptbxl-second")
        nodes["old-release"] = fed.start_site("ptb", caches["ptb"], key=key["ptb"], name="site-old-release",
                                              env=installed_version_env(root / "old-release", OTHER_VERSION))
        fed.wait_online(len(nodes), timeout=120)
        yield fed, nodes, caches, key
    finally:
        processes.stop_all()


def test_drop_rejoin_refusals_and_an_unreachable_minimum_in_one_deployment(federation, tmp_path):
    fed, nodes, caches, key = federation
    env = fed.processes.env
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    run_a = submit_run(env, APP, fed.connection, run_config(out_a, 3))
    # round 1's training message reaches mimic: kill its node (SuperNode, SuperExec, ClientApp)
    fed.processes.wait_for(nodes["mimic"], train_messages(run_a, 1), timeout=300)
    killed_at = time.time()
    fed.processes.kill(nodes["mimic"])

    # run A: the SuperLink answers for the dead node once its heartbeats stop (<= 60 s): the guard
    # files it, the round aggregates the survivors; then the site restarts its node (same key)
    dropped = wait_file_row(out_a / "failures.csv", lambda r: r["round"] == "1" and r["site"] == "mimic",
                            timeout=150, what="round-1 failure of mimic")
    restarted = fed.start_site("mimic", caches["mimic"], key=key["mimic"], name="site-mimic-restarted")
    status = wait_run(env, fed.connection, run_a, timeout=400)
    log = run_log(env, fed.connection, run_a)
    (tmp_path / "run-a.log").write_text(log)
    assert status["status"] == "finished:completed", (status, log)
    rows = read_csv(out_a / "rounds.csv")

    def sites_with(rnd: int, metric: str) -> set[str]:
        return {r["site"] for r in rows if r["round"] == str(rnd) and r["metric"] == metric}

    # survivors aggregated in round 1; mimic back by round 3 (trained and evaluated)
    assert sites_with(1, "num_examples") == {"ptbxl", "cinc"} and sites_with(3, "num_examples") == set(SITES), rows
    assert sites_with(1, "missed_round") == {"mimic"} and not sites_with(3, "missed_round"), rows
    missed = sorted(int(r["round"]) for r in rows if r["metric"] == "missed_round")
    assert missed in ([1], [1, 2]), rows  # round 2 too if the restarted node was not back in time
    assert sites_with(3, "auroc_macro") >= set(SITES), rows
    # when and why it dropped
    stamp = time.mktime(time.strptime(dropped["time_utc"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert stamp >= killed_at - 1, (dropped, killed_at)
    assert dropped["reason"].startswith("error reply"), dropped
    assert {(int(f["round"]), f["site"]) for f in read_csv(out_a / "failures.csv")} == {(r, "mimic") for r in missed}
    assert re.search(r"round 1: site mimic \(node \d+\) left out of the aggregate", log), log
    assert f"site mimic missed round(s) {missed}" in log, log
    assert "Receiving: train message" in restarted.log().split(f"[RUN {run_a}]", 1)[-1]
    # the second ptbxl key: refused (one node plays the site), never sent a training message
    assert re.search(r"node \d+ also claims site 'ptbxl' \(node \d+ plays it\): it is left out", log), log
    playing = [n for n in ("ptbxl", "ptbxl-second") if "Receiving: train message" in nodes[n].log()]
    assert len(playing) == 1, playing
    # the node with another installed version refused the server's question, naming both versions
    assert (f"refused: version mismatch: the coordinator runs fed-ecg 0.1.0, this site runs fed-ecg "
            f"{OTHER_VERSION}") in log, log
    assert "Receiving: train message" not in nodes["old-release"].log()
    # deployment default: the coordinator holds no site data, so no pooled evaluation
    assert "pooled validation AUROC off" in log and "pooled" not in {r["site"] for r in rows}
    from shared.training import load_checkpoint

    assert load_checkpoint(out_a / "checkpoint.pt")["round"] == 3

    # run B, mimic's node killed again just before: needing all three sites, it must end at its
    # deadline with a clear error, not hang (the dead node still counts as connected for <= 60 s)
    fed.processes.kill(restarted)
    submitted_b = time.monotonic()
    run_b = submit_run(env, APP, fed.connection,
                       run_config(out_b, 3, "min-replies=3 min-nodes=2 node-wait-timeout=30.0"))
    status_b = wait_run(env, fed.connection, run_b, timeout=240)
    took_b = time.monotonic() - submitted_b
    log_b = run_log(env, fed.connection, run_b)
    (tmp_path / "run-b.log").write_text(log_b)
    assert status_b["status"] == "finished:failed", (status_b, log_b)
    assert "after 30 s no node plays site(s) ['mimic']; going on with ['ptbxl', 'cinc'] (min-nodes = 2)" in log_b, log_b
    assert ("round 1: no node for ['mimic'] within node-wait-timeout = 30 s; only ['ptbxl', 'cinc'] of "
            "['ptbxl', 'mimic', 'cinc'] have a node, the round needs min-replies = 3. The run ends here") in log_b, log_b
    assert not any(re.search(rf"\[RUN {run_b}\][\s\S]*Receiving: train", n.log()) for n in fed.processes.procs), \
        "run B sent a training message"
    print(f"run B failed {took_b:.0f} s after it was submitted")
