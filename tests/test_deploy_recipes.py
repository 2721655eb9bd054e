"""The deploy/ recipes without a Docker engine: the certificate script's output, the compose
files (YAML parses; every `python -m server|client|shared.data` command parses with the
project's own argument parsers; every `flwr` / `flower-*` command and flag exists in the
installed Flower's `--help`; every certificate file mounted is one make-certs.sh creates), the
Dockerfile, and the operator-facing errors of `python -m client` / `python -m server`."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from client import cli as client_cli
from deploy_harness import REPO_ROOT, VENV_BIN
from server import cli as server_cli

DEPLOY = REPO_ROOT / "deploy"
COMPOSE_FILES = ("compose.server.yaml", "compose.site.yaml", "compose.demo.yaml")
SITES = ("ptb", "ptbxl", "mimic", "cinc")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "certs"
    done = subprocess.run(["bash", str(DEPLOY / "make-certs.sh"), "--out", str(out), "--host",
                           "coordinator.example.org", "--host", "10.1.2.3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (out / "sites").exists(), "make-certs.sh must not make site keys"
    for site in SITES:  # what each site makes on its own machine
        done = subprocess.run(["bash", str(DEPLOY / "make-site-key.sh"), site, "--out", str(out / "sites")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"--name {site}" in done.stdout
    return out


@functools.cache
def help_flags(*command: str) -> frozenset[str]:
    """Flags listed by ``command --help`` of the installed version."""
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", TERM="dumb",
               PATH=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env,
                          timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, f"{command} --help failed: {done.stderr}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)
    return frozenset(FLAG.findall(text))


def openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=True).stdout


# ---------------------------------------------------------------- make-certs.sh


def test_make_certs_creates_ca_and_superlink_cert_and_sites_their_own_p384_keys(certs):
    for name in ("ca.crt", "ca.key", "superlink.crt", "superlink.key"):
        assert (certs / name).is_file(), name
    assert oct((certs / "ca.key").stat().st_mode)[-3:] == "600"
    assert oct((certs / "superlink.key").stat().st_mode)[-3:] == "600"
    text = openssl("x509", "-in", str(certs / "superlink.crt"), "-noout", "-text")
    for san in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:coordinator.example.org",
                "IP Address:10.1.2.3"):
        assert san in text, san
    assert "TLS Web Server Authentication" in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"),
                             str(certs / "superlink.crt")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for site in SITES:
        fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(certs / "sites" / f"{site}.key.pub")],
                                     capture_output=True, text=True, check=True).stdout
        assert fingerprint.startswith("384 ") and "(ECDSA)" in fingerprint, fingerprint
        assert oct((certs / "sites" / f"{site}.key").stat().st_mode)[-3:] == "600"


def test_make_certs_never_overwrites(certs):
    before = {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()}
    done = subprocess.run(["bash", str(DEPLOY / "make-certs.sh"), "--out", str(certs)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(["bash", str(DEPLOY / "make-site-key.sh"), "ptb", "--out", str(certs / "sites")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()} == before
    assert "flwr supernode register" in done.stdout


# ---------------------------------------------------------------- compose files and Dockerfile


def compose(name: str) -> dict:
    data = yaml.safe_load((DEPLOY / name).read_text())
    assert isinstance(data, dict) and data.get("services"), name
    return data


def split_mount(mount: str) -> tuple[str, str]:
    """(source, target) of a short-syntax mount; the source may hold ``${VAR:?msg}``."""
    spec = mount[:-3] if mount.endswith((":ro", ":rw")) else mount
    source, target = spec.rsplit(":", 1)
    return source, target


def service_commands(service: dict) -> list[list[str]]:
    """Every command line a service runs: its entrypoint + command, and the lines inside
    ``bash -c`` scripts (``$$`` is compose's escape for ``$``)."""
    entry = service.get("entrypoint") or ["python", "-m"]
    command = service.get("command") or []
    if entry[:2] == ["bash", "-c"]:
        script = " ".join(command).replace("$$s", "ptb")
        lines = []
        for part in re.split(r"&&|;|\|\|", script):
            words = shlex.split(part.strip())
            while words and words[0] in ("for", "do", "done", "exit", "sleep"):
                words = [] if words[0] in ("for", "exit", "sleep") else words[1:]
            if words:
                lines.append(words)
        return lines
    if entry[0] == "bash":
        return [[*entry, *command]]
    return [[*entry, *command]]


def check_command(words: list[str], certs: Path) -> None:
    words = [re.sub(r"\$\{(\w+)(:[^}]*)?\}", lambda m: {"SITE": "ptb"}.get(m.group(1), "x:1"), w)
             for w in words]
    if words[:3] == ["python", "-m", "server"] and words[3:4] == ["connection"]:
        server_cli.build_connection_parser().parse_args(words[4:])
    elif words[:3] == ["python", "-m", "server"]:
        server_cli.build_start_parser().parse_args(words[3:])
    elif words[:3] == ["python", "-m", "client"]:
        client_cli.build_parser().parse_args(words[3:])
    elif words[:4] == ["python", "-m", "shared.data", "prepare"]:
        flags = {w.split("=")[0] for w in words if w.startswith("--")}
        assert flags <= help_flags(sys.executable, "-m", "shared.data", "prepare"), words
    elif words[0] == "flwr":
        sub = [w for w in words[1:3] if not w.startswith("-")][:2]
        if sub[0] == "run":
            sub = ["run"]
        flags = {w.split("=")[0] for w in words if w.startswith("--")}
        assert flags <= help_flags(str(VENV_BIN / "flwr"), *sub), (words, sub)
    elif words[:2] == ["bash", "deploy/make-certs.sh"]:
        assert (REPO_ROOT / "deploy" / "make-certs.sh").is_file()
        flags = {w for w in words if w.startswith("--")}
        assert flags <= {"--out", "--host", "--days"}, words
    elif words[:2] == ["bash", "deploy/make-site-key.sh"]:
        assert (REPO_ROOT / "deploy" / "make-site-key.sh").is_file()
        assert {w for w in words if w.startswith("--")} <= {"--out"}, words
    else:
        raise AssertionError(f"unchecked command in a compose file: {words}")


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_commands_exist_in_the_installed_clis(name, certs):
    data = compose(name)
    checked = 0
    for svc_name, service in data["services"].items():
        if svc_name.startswith("x-"):
            continue
        command = service.get("command")
        if not command and not service.get("entrypoint"):
            continue
        for words in service_commands(service):
            if words[:2] == ["python", "-m"] or words[0] in ("flwr", "bash"):
                full = words
            else:
                full = ["python", "-m", *words]
            check_command(full, certs)
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_mounts_point_at_files_the_recipe_creates(name, certs):
    data = compose(name)
    named = set((data.get("volumes") or {}).keys())
    for service in data["services"].values():
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"]).resolve() == REPO_ROOT
            assert (REPO_ROOT / build["dockerfile"]).is_file()
        for mount in service.get("volumes", []):
            source = split_mount(mount)[0]
            if source.startswith("./certs/"):
                relative = source[len("./certs/"):]
                for site in SITES:
                    path = certs / relative.replace("${SITE}", site)
                    assert path.is_file(), f"{name}: {source} is not created by make-certs.sh"
            elif source.startswith("./keys/"):  # the site's own key, made at the site
                for site in SITES:
                    path = certs / "sites" / source[len("./keys/"):].replace("${SITE}", site)
                    assert path.is_file(), f"{name}: {source} is not created by make-site-key.sh"
            elif source.startswith("${"):
                assert source == "${DATA_DIR:?set DATA_DIR}", source
                assert mount.endswith(":ro"), f"{name}: site data must be mounted read-only"
            else:
                assert source in named, f"{name}: volume {source} not declared"


def test_site_compose_mounts_data_read_only_and_offers_a_gpu_profile():
    services = compose("compose.site.yaml")["services"]
    assert services["site"]["profiles"] == ["cpu"]
    gpu = services["site-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    for service in services.values():
        data_mounts = [m for m in service["volumes"] if split_mount(m)[1] == "/data"]
        assert data_mounts and all(m.endswith(":ro") for m in data_mounts)


def test_dockerfile_bakes_dependencies_and_turns_runtime_installation_off():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1", text)
    assert "ARG TORCH_INDEX" in text and "pip install . " in text.replace("\n", " ") + " "
    for source in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (REPO_ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    assert re.search(r"^USER (?!root)", text, flags=re.M)


# ---------------------------------------------------------------- the generated Flower commands


def test_server_command_flags_exist_in_flower_superlink(certs, tmp_path):
    args = server_cli.build_start_parser().parse_args(
        ["--certs", str(certs), "--state-dir", str(tmp_path), "--log-file", str(tmp_path / "l")])
    command = server_cli.superlink_command(args)
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    assert {w for w in command if w.startswith("--")} <= help_flags(str(VENV_BIN / "flower-superlink"))
    insecure = server_cli.superlink_command(server_cli.build_start_parser().parse_args(
        ["--insecure", "--state-dir", str(tmp_path)]))
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure


def test_client_command_flags_exist_in_flower_supernode(certs, small_cache):
    args = client_cli.build_parser().parse_args([
        "--site", "ptb", "--superlink", "127.0.0.1:9092", "--data", str(small_cache),
        "--root-certificates", str(certs / "ca.crt"), "--auth-key", str(certs / "sites" / "ptb.key"),
        "--max-retries", "3",
    ])
    command = client_cli.supernode_command(args, client_cli.validate(args))
    assert {w for w in command if w.startswith("--")} <= help_flags(str(VENV_BIN / "flower-supernode"))
    assert command[command.index("--node-config") + 1].startswith(f"site='ptb' data='{small_cache.resolve()}' state-dir='")
    assert "--insecure" not in command


# ---------------------------------------------------------------- operator errors


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    from deploy_harness import make_caches

    return make_caches(tmp_path_factory.getbasetemp() / "deploy-caches", ("ptb",), records=12)["ptb"]


def run_client(capsys, *argv: str) -> tuple[int, str, str]:
    rc = client_cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_client_dry_run_prints_counts_labels_and_node_config(capsys, small_cache, certs):
    rc, out, err = run_client(capsys, "--site", "ptb", "--data", str(small_cache), "--dry-run",
                              "--root-certificates", str(certs / "ca.crt"))
    assert rc == 0, err
    import json

    manifest = json.loads((small_cache / "manifest.json").read_text())
    assert "SYNTHETIC" in out
    for split, counts in manifest["counts"].items():
        assert re.search(rf"^  {split}\s+{counts['records']}\s+{counts['windows']}\s", out, re.M), out
    for cls, available in zip(manifest["classes"], manifest["label_available"]):
        assert f"{cls}={'yes' if available else 'unknown here'}" in out
    assert f"node config: site='ptb' data='{small_cache.resolve()}'" in out
    assert "transport: TLS" in out


@pytest.mark.parametrize("argv, message", [
    (["--site", "bogus"], "unknown site 'bogus'"),
    (["--site", "mimic"], "holds site 'ptb', not 'mimic'"),
    (["--site", "ptb", "--superlink", "https://x:1"], "is not HOST:PORT"),
    (["--site", "ptb", "--root-certificates", "/nonexistent/ca.crt"], "no such file"),
    (["--site", "ptb", "--auth-key", "/nonexistent/ptb.key", "--root-certificates", "CA"], "no such file"),
    (["--site", "ptb", "--insecure", "--auth-key", "KEY"], "--auth-key needs TLS"),
])
def test_client_refuses_bad_input_with_one_line(capsys, small_cache, certs, argv, message):
    argv = [a.replace("CA", str(certs / "ca.crt")).replace("KEY", str(certs / "sites" / "ptb.key"))
            for a in argv]
    rc, _, err = run_client(capsys, *argv, "--data", str(small_cache), "--superlink",
                            "127.0.0.1:9092", "--dry-run") if "--superlink" not in argv else \
        run_client(capsys, *argv, "--data", str(small_cache), "--dry-run")
    assert rc == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_client_explains_unprepared_and_missing_data(capsys, tmp_path):
    root = tmp_path / "ptbdb"
    (root / "patient001").mkdir(parents=True)
    (root / "patient001" / "s0010_re.hea").write_text("s0010_re 15 1000 38400\n")
    rc, _, err = run_client(capsys, "--site", "ptb", "--data", str(root), "--dry-run")
    assert rc == 2 and "raw dataset root, not a prepared cache" in err
    assert f"python -m shared.data prepare --site ptb --source {root}" in err
    rc, _, err = run_client(capsys, "--site", "ptb", "--data", str(tmp_path / "absent"), "--dry-run")
    assert rc == 2 and "no such directory" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run_client(capsys, "--site", "ptb", "--data", str(tmp_path / "empty"), "--dry-run")
    assert rc == 2 and "not a prepared cache" in err


def test_client_refuses_an_ed25519_key(capsys, small_cache, certs, tmp_path):
    key = tmp_path / "ed"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    rc, _, err = run_client(capsys, "--site", "ptb", "--data", str(small_cache), "--dry-run",
                            "--root-certificates", str(certs / "ca.crt"), "--auth-key", str(key))
    assert rc == 2 and "use an ECDSA key" in err


@pytest.mark.slow
def test_client_starts_again_when_its_runtime_port_is_taken_meanwhile(capsys, small_cache, monkeypatch):
    """A free port chosen by ``python -m client`` can be taken before flower-supernode binds it
    (seen once in CI, five nodes starting together). The wrapper then starts the SuperNode again
    on another free port; a port the operator chose is never changed. Real flower-supernode
    processes; nothing listens at the SuperLink address, so each ends on the retry limit."""
    import socket

    from shared import processes

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        picks = iter([port])
        real_free_port = processes.free_port
        monkeypatch.setattr(processes, "free_port", lambda *a: next(picks, None) or real_free_port(*a))
        argv = ["--site", "ptb", "--data", str(small_cache), "--insecure", "--max-wait", "1",
                "--superlink", f"127.0.0.1:{real_free_port()}"]
        rc, _, err = run_client(capsys, *argv)
        assert "starting again on another free port" in err, err
        assert rc == client_cli.EXIT_CONNECT and "could not reach SuperLink" in err, err
        # the operator's own port: no second start, and the message names the flag
        rc, _, err = run_client(capsys, *argv, "--runtime-port", str(port))
        assert rc == client_cli.EXIT_SUPERNODE, err
        assert "starting again" not in err and "already in use: pass a free one with --runtime-port" in err, err


def test_client_reads_flowers_exit_code_behind_a_long_traceback(capsys, small_cache):
    """flower-superexec shares the SuperNode's output and dies after it, printing long chained
    tracebacks; the SuperNode's "Exit Code: 305" must still be recognised (CI once saw exit 4)."""
    args = client_cli.build_parser().parse_args(["--site", "ptb", "--data", str(small_cache), "--insecure",
                                                 "--superlink", "127.0.0.1:1"])
    fake_supernode = ("import sys; print('Exit Code: 305'); print('Failed to initialize the connection'); "
                      "[print(f'  File \"superexec.py\", line {i}, in run') for i in range(300)]; sys.exit(1)")
    code, port_taken = client_cli.run_supernode([sys.executable, "-c", fake_supernode], args)
    _, err = capsys.readouterr()
    assert code == client_cli.EXIT_CONNECT and not port_taken, err
    assert "could not reach SuperLink" in err


def test_server_connection_writes_flwr_config(tmp_path, monkeypatch, certs, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    assert server_cli.main(["connection", "fed", "--address", "coord.example.org:9092",
                            "--root-certificates", str(certs / "ca.crt")]) == 0
    import tomli

    config = tomli.loads((tmp_path / "home" / "config.toml").read_text())
    assert config["superlink"]["fed"] == {"address": "coord.example.org:9092",
                                          "root-certificates": str((certs / "ca.crt").resolve())}
    assert server_cli.main(["connection", "fed", "--address", "x:1"]) == 2
    assert "exactly one of" in capsys.readouterr().err


def test_client_asks_the_superlink_port_whether_it_speaks_tls(certs):
    """A plain-text node that failed to connect learns "it speaks TLS" from a TLS handshake with
    the port, not from Flower's last error line (which depends on timing)."""
    import socket
    import ssl
    import threading

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "superlink.crt", certs / "superlink.key")

    def serve(listener: socket.socket, tls: bool) -> None:
        conn, _ = listener.accept()
        with conn:
            if tls:
                with context.wrap_socket(conn, server_side=True):
                    pass
            else:
                conn.recv(1)

    for tls in (True, False):
        listener = socket.create_server(("127.0.0.1", 0))
        worker = threading.Thread(target=serve, args=(listener, tls), daemon=True)
        worker.start()
        port = listener.getsockname()[1]
        assert client_cli.speaks_tls(f"127.0.0.1:{port}") is tls
        worker.join(timeout=10)
        listener.close()
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    assert client_cli.speaks_tls(f"127.0.0.1:{port}") is False  # nothing listens
