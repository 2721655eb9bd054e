"""The site's FAB guard (review finding 1): the coordinator's app bundle may carry only the run
config for the site's own code; ``python -m client`` puts the guard's ``flwr-clientapp`` first on
the SuperNode's PATH; the Flower attribute it wraps still exists."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from client.fab_guard import EXPECTED_CLIENTAPP, UntrustedFab, install_guard, validate_fab, write_shim

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec, inside flwr build

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "simulations" / "four_sites"


def _real_fab() -> bytes:
    return build_fab_from_disk(APP)  # what `flwr run simulations/four_sites` submits


def _rezip(fab: bytes, *, add: dict[str, bytes] | None = None, replace: dict[str, bytes] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, (replace or {}).get(info.filename, src.read(info.filename)))
        for name, data in (add or {}).items():
            dst.writestr(name, data)
    return out.getvalue()


def test_the_real_fab_is_accepted():
    fab = _real_fab()
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "pyproject.toml" in names
    validate_fab(fab)


@pytest.mark.parametrize("name", ["client/app.py", "shared/privacy/ledger.py", "evil.py", ".info/hook.py",
                                  "client/__init__.pyc"])
def test_a_fab_carrying_code_is_refused_naming_the_file(name):
    with pytest.raises(UntrustedFab, match=f"holds '{name}'"):
        validate_fab(_rezip(_real_fab(), add={name: b"print('coordinator code')\n"}))


def test_a_fab_naming_another_clientapp_or_dependencies_is_refused():
    fab = _real_fab()
    pyproject = zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml").decode()
    assert f'clientapp = "{EXPECTED_CLIENTAPP}"' in pyproject
    other = pyproject.replace(f'clientapp = "{EXPECTED_CLIENTAPP}"', 'clientapp = "evil:app"')
    with pytest.raises(UntrustedFab, match="clientapp = 'evil:app'"):
        validate_fab(_rezip(fab, replace={"pyproject.toml": other.encode()}))
    deps = pyproject.replace("[project]\n", '[project]\ndependencies = ["evil-package"]\n', 1)
    with pytest.raises(UntrustedFab, match="dependencies"):
        validate_fab(_rezip(fab, replace={"pyproject.toml": deps.encode()}))
    with pytest.raises(UntrustedFab, match="not a zip"):
        validate_fab(b"not a zip")


def test_the_guard_wraps_flowers_install_from_fab_and_refuses_before_installing(monkeypatch):
    """The wrapped attribute is non-public Flower API (flwr pinned < 1.43): fail loudly if it moves."""
    from flwr.supernode.runtime import run_clientapp as runtime

    assert callable(getattr(runtime, "install_from_fab", None)), \
        "flwr.supernode.runtime.run_clientapp.install_from_fab is gone: update client/fab_guard.py"
    installed = []
    monkeypatch.setattr(runtime, "install_from_fab", lambda fab, **kw: installed.append(fab) or Path("."))
    install_guard()
    with pytest.raises(UntrustedFab, match="client/app.py"):
        runtime.install_from_fab(_rezip(_real_fab(), add={"client/app.py": b""}), skip_prompt=True)
    assert installed == []
    runtime.install_from_fab(_real_fab(), skip_prompt=True)
    assert len(installed) == 1
    # flwr-clientapp's task body calls the module attribute at run time (what the guard relies on)
    import inspect

    assert "install_from_fab(fab.content" in inspect.getsource(runtime.run_clientapp)


def test_runtime_path_puts_the_guard_first_and_the_shim_runs_it(tmp_path):
    import client.cli as client_cli

    from client.fab_guard import interpreter_of

    real = shutil.which("flwr-clientapp", path=client_cli.runtime_path())
    python = interpreter_of(real)  # the interpreter that has Flower (python -m client may run another)
    assert python is not None, real
    shim = write_shim(tmp_path / "shim", python=python)
    path = client_cli.runtime_path(tmp_path / "shim")
    assert shutil.which("flwr-clientapp", path=path) == str(shim)
    assert shutil.which("flwr-clientapp", path=client_cli.runtime_path()) != str(shim)
    # the shim starts this interpreter on the guard module (its --help is Flower's own parser)
    out = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PATH=path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--clientappio-api-address" in out.stdout or "runtime" in out.stdout.lower()
    assert python in shim.read_text()
    # the node's working directory is not on the guard's sys.path: a package there (or another
    # distribution's metadata) does not shadow the installed code
    workdir = tmp_path / "workdir"
    (workdir / "client").mkdir(parents=True)
    (workdir / "client" / "__init__.py").write_text("raise SystemExit('the working directory was imported')\n")
    out = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PATH=path), cwd=workdir)
    assert out.returncode == 0, out.stderr
