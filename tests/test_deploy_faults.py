"""Fault cases with real processes on 127.0.0.1 (plain-text SuperLink: these cases are about
the federation, TLS is covered in test_deploy_security.py / test_deploy_federation.py).

One SuperLink and three sites are shared by the module: each case submits its own run.
* a nonsensical run config is refused by the ServerApp before any node is sent a message;
* a site that no node plays ends the run at the configured deadline with a clear error, before
  any node trains;
* a node killed mid-round: the round aggregates the survivors, and the run's log and
  failures.csv say which site dropped and when;
* the SuperLink killed mid-run and restarted on the same state: a resumed run continues from
  the last checkpoint, completed rounds kept as they were.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import time

import pytest

from deploy_harness import (
    REPO_ROOT,
    VENV_BIN,
    Federation,
    Processes,
    flwr_env,
    make_caches,
    run_log,
    submit_run,
    wait_port,
    wait_run,
)

pytestmark = pytest.mark.slow

SITES = ("ptb", "ptbxl", "mimic")
APP = REPO_ROOT / "simulations" / "four_sites"


def run_config(out_dir, sites, rounds, extra=""):
    """A tiny run; ``extra`` ('key=value ...') replaces any default key it names."""
    values = {
        "num-server-rounds": str(rounds), "preset": '"tiny"', "model": '"hierarchical"',
        "batch-size": "16", "server-eval": '"off"', "fraction-evaluate": "0.0",
        "device": '"cpu"', "sites": f'"{",".join(sites)}"', "out-dir": f'"{out_dir}"',
    }
    for pair in extra.split():
        key, value = pair.split("=", 1)
        values[key] = value
    return " ".join(f"{k}={v}" for k, v in values.items())


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    caches = make_caches(base / "deploy-caches", SITES, records=12)
    root = tmp_path_factory.mktemp("faults")
    processes = Processes(log_dir=root, env=flwr_env(root / "flwr-home"))
    fed = Federation(processes, state_dir=root / "state", certs=None)
    try:
        fed.start_server(tls=False)
        sites = {s: fed.start_site(s, caches[s], tls=False) for s in SITES}
        fed.wait_online(len(SITES), timeout=120)
        yield fed, sites, caches, root
    finally:
        processes.stop_all()


def submit_many(env, connection, configs: dict[str, str]) -> dict[str, int]:
    """Several `flwr run` at once (each CLI call costs seconds of start-up)."""
    procs = {
        name: subprocess.Popen(
            [str(VENV_BIN / "flwr"), "run", str(APP), connection, "--format", "json",
             "--run-config", cfg],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cfg in configs.items()
    }
    ids = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        match = re.search(r'"run-id": "?(\d+)', out)
        assert match, f"{name}: flwr run gave no run id:\n{out}\n{err}"
        ids[name] = int(match.group(1))
    return ids


def test_bad_run_config_and_unmet_minimum_fail_before_any_node_trains(federation, tmp_path):
    fed, sites, _, _ = federation
    env = fed.processes.env
    # one bad value through a real SuperLink (every other key's validation: test_client_app.py)
    bad = {"negative lr": ("lr=-0.1", "lr")}
    configs = {name: run_config(tmp_path / name.replace(" ", "-"), SITES, 1, override)
               for name, (override, _) in bad.items()}
    # four sites wanted, three connected: a 20 s deadline (each answer to the server's query is a
    # fresh ClientApp process on the node)
    configs["unmet minimum"] = run_config(tmp_path / "unmet", ("ptb", "ptbxl", "mimic", "cinc"), 1,
                                          "node-wait-timeout=20.0")
    ids = submit_many(env, fed.connection, configs)
    for name, run_id in ids.items():
        status = wait_run(env, fed.connection, run_id, timeout=240)
        log = run_log(env, fed.connection, run_id)
        assert status["status"] == "finished:failed", (name, status, log)
        if name in bad:
            key = bad[name][1]
            assert f"run config: {key} = " in log and "is invalid" in log, (name, log)
        else:
            assert "after 20 s, no node plays site(s) ['cinc'] (3 node(s) connected" in log, log
    # the bad config reached no node; the unmet run only asked the nodes which site they play
    for site, proc in sites.items():
        log = proc.log()
        assert f"[RUN {ids['negative lr']}]" not in log, (site, log[-2000:])
        after = log.split(f"[RUN {ids['unmet minimum']}]", 1)[-1]
        assert not re.search(r"Receiving: (train|evaluate) message", after), (site, log[-2000:])


def test_node_killed_mid_round_survivors_are_aggregated_and_the_drop_reported(federation, tmp_path):
    fed, sites, _, _ = federation
    env = fed.processes.env
    out_dir = tmp_path / "run"
    run_id = submit_run(env, APP, fed.connection, run_config(out_dir, SITES, 2, "round-timeout=300.0"))
    victim = sites["mimic"]
    # round 2's train message reaches mimic: kill its node (SuperNode, SuperExec, ClientApp)
    fed.processes.wait_for(victim, rf"\[RUN {run_id}\][\s\S]*Receiving: train message"
                                   rf"[\s\S]*\[RUN {run_id}\][\s\S]*Receiving: train message",
                           timeout=400)
    killed_at = time.time()
    fed.processes.kill(victim)

    status = wait_run(env, fed.connection, run_id, timeout=400)
    log = run_log(env, fed.connection, run_id)
    assert status["status"] == "finished:completed", (status, log)
    rows = read_csv(out_dir / "rounds.csv")
    trained = {r["round"]: set() for r in rows}
    for r in rows:
        if r["metric"] == "num_examples":
            trained[r["round"]].add(r["site"])
    assert trained["1"] == set(SITES)
    assert trained["2"] == {"ptb", "ptbxl"}, rows
    failures = read_csv(out_dir / "failures.csv")
    assert [(f["round"], f["site"]) for f in failures] == [("2", "mimic")], failures
    stamp = time.mktime(time.strptime(failures[0]["time_utc"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert stamp >= killed_at - 1
    assert re.search(r"round 2: site mimic \(node \d+\) left out of the aggregate", log), log
    from shared.training import load_checkpoint

    assert load_checkpoint(out_dir / "checkpoint.pt")["round"] == 2


def test_superlink_killed_mid_run_resumes_from_last_checkpoint(federation, tmp_path):
    fed, sites, _, _ = federation
    env = fed.processes.env
    survivors = ("ptb", "ptbxl")
    out_dir = tmp_path / "run"
    cfg = run_config(out_dir, survivors, 2, "round-timeout=300.0")
    run_id = submit_run(env, APP, fed.connection, cfg)
    rounds_csv = out_dir / "rounds.csv"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if rounds_csv.is_file() and any(r["round"] == "1" for r in read_csv(rounds_csv)):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("round 1 never completed:\n" + fed.server.log()[-3000:])
    round1 = [r for r in read_csv(rounds_csv) if r["round"] == "1"]
    fed.processes.kill(fed.server)  # SuperLink, its SuperExec and the ServerApp: a crash

    from shared.training import load_checkpoint

    assert load_checkpoint(out_dir / "checkpoint.pt")["round"] == 1  # killed during round 2
    fed.start_server(tls=False)  # same port, same state directory
    wait_port(fed.port)
    fed.wait_online(len(survivors), timeout=120)
    resumed = submit_run(env, APP, fed.connection, cfg + " resume=true")
    status = wait_run(env, fed.connection, resumed, timeout=400)
    log = run_log(env, fed.connection, resumed)
    assert status["status"] == "finished:completed", (status, log)
    assert re.search(r"resuming .* after round 1 of 2", log), log
    after = read_csv(rounds_csv)
    assert [r for r in after if r["round"] == "1"] == round1  # completed round kept as it was
    assert {r["site"] for r in after if r["round"] == "2" and r["metric"] == "num_examples"} == set(survivors)
    assert load_checkpoint(out_dir / "checkpoint.pt")["round"] == 2
    assert run_id != resumed
