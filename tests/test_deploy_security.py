"""Security cases with real processes on 127.0.0.1: a TLS SuperLink with SuperNode
authentication (started by `python -m server`) admits a registered site and refuses an
unregistered key, a plain-text node, a node without a key and a node that does not trust the CA;
an unreachable SuperLink ends with a message saying what to check."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deploy_harness import REPO_ROOT, Federation, Processes, flwr_env, free_port, make_caches, make_certs


pytestmark = pytest.mark.slow

SITES = ("ptb", "ptbxl")


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    caches = make_caches(base / "deploy-caches", SITES, records=12)
    certs = make_certs(base / "deploy-certs", ("ptb", "ptbxl", "mimic", "cinc"))
    return caches, certs


@pytest.fixture(scope="module")
def tls_federation(material, tmp_path_factory):
    """One TLS + node-auth SuperLink shared by the cases of this module (honest: each case
    only connects a node and looks at how the SuperLink answers)."""
    caches, certs = material
    root = tmp_path_factory.mktemp("tls-fed")
    processes = Processes(log_dir=root, env=flwr_env(root / "flwr-home"))
    fed = Federation(processes, state_dir=root / "state", certs=certs)
    try:
        fed.start_server(tls=True, node_auth=True)
        yield fed, caches, certs
    finally:
        processes.stop_all()


def test_server_refuses_missing_certificates(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "server", "--certs", str(tmp_path / "none"), "--dry-run"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "TLS files missing" in done.stderr and "make-certs.sh" in done.stderr
    assert "Traceback" not in done.stderr


def test_registered_site_joins_over_tls(tls_federation):
    fed, caches, certs = tls_federation
    fed.register(certs / "sites" / "ptb.key.pub")
    site = fed.start_site("ptb", caches["ptb"], key=certs / "sites" / "ptb.key")
    fed.processes.wait_for(site, r"SuperNode ID: \d+", timeout=60)
    fed.wait_online(1)
    assert "TLS" in site.log() and "PLAIN TEXT" not in site.log()


def test_tls_superlink_refuses_nodes_it_must_not_admit(tls_federation, tmp_path):
    """Five refused nodes, started together (each case waits on Flower's retry limit)."""
    fed, caches, certs = tls_federation
    other = make_certs(tmp_path / "other-ca", ("ptbxl",))
    data = caches["ptbxl"]
    cases = {
        "unregistered": fed.start_site("ptbxl", data, key=certs / "sites" / "mimic.key",
                                       extra=("--max-wait", "5"), name="unregistered"),
        "no-key": fed.start_site("ptbxl", data, extra=("--max-wait", "5"), name="no-key"),
        "plaintext": fed.start_site("ptbxl", data, tls=False, extra=("--max-wait", "5"),
                                    name="plaintext"),
        "wrong-ca": fed.start_site("ptbxl", data, ca=other / "ca.crt",
                                   key=certs / "sites" / "ptbxl.key", extra=("--max-wait", "5"),
                                   name="wrong-ca"),
        # nothing listens there: the node retries with backoff, then says what to check
        "unreachable": fed.start_site("ptbxl", data, extra=(
            "--max-wait", "3", "--superlink", f"127.0.0.1:{free_port()}"), name="unreachable"),
    }
    codes = {name: fed.processes.wait_exit(proc, timeout=90) for name, proc in cases.items()}
    logs = {name: proc.log() for name, proc in cases.items()}
    for name, log in logs.items():
        assert "SuperNode ID" not in log, f"{name} was admitted:\n{log}"
        assert "Traceback" not in log.split("python -m client: error:")[-1], log
    assert set(codes.values()) == {3}, "\n\n".join(
        f"--- {name}: exit {code}\n{logs[name][-2500:]}" for name, code in codes.items() if code != 3
    )
    assert "not registered" in logs["unregistered"]
    assert "flwr supernode register" in logs["unregistered"]
    assert "speaks TLS" in logs["plaintext"] and "--root-certificates" in logs["plaintext"]
    assert "TLS verification" in logs["wrong-ca"]
    assert "could not reach SuperLink" in logs["unreachable"]
    assert "firewall" in logs["unreachable"]
    # the SuperLink kept only the registered, admitted site
    assert fed.online_nodes() == 1


def test_secagg_plus_is_still_legacy_only_in_the_installed_flower():
    """docs/architecture.md ("Secure aggregation"): flwr 1.42 offers SecAgg+ only on its legacy
    path (``SecAggPlusWorkflow`` needs a ``LegacyContext``; ``secaggplus_mod`` wraps a legacy
    client). This fails when Flower's Message API (``flwr.serverapp``, ``flwr.clientapp``,
    ``flwr.app``) exposes anything named SecAgg, so the project's choice gets revisited."""
    import importlib
    import inspect
    import pkgutil

    import flwr
    from flwr.server.workflow import SecAggPlusWorkflow

    found = []
    for root in ("flwr.serverapp", "flwr.clientapp", "flwr.app"):
        package = importlib.import_module(root)
        modules = [package] + [importlib.import_module(m.name) for m in
                               pkgutil.walk_packages(package.__path__, root + ".")]
        for module in modules:
            if "secagg" in module.__name__.lower():
                found.append(module.__name__)
            found += [f"{module.__name__}.{name}" for name in dir(module) if "secagg" in name.lower()]
    assert not found, (f"flwr {flwr.__version__} exposes SecAgg on the Message API: {sorted(set(found))}; "
                       "revisit docs/architecture.md 'Secure aggregation' and deploy/README.md")
    assert "LegacyContext" in inspect.getsource(SecAggPlusWorkflow.__call__)
