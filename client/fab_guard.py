"""The site's guard against the coordinator's app bundle (FAB): only the site's own code runs here.

In deployment the SuperNode fetches the FAB the coordinator submitted with ``flwr run``, and
Flower 1.42's ``flwr-clientapp`` installs it (``install_from_fab``) and loads the ClientApp named
by *the FAB's* ``pyproject.toml`` with the FAB directory first on ``sys.path``
(``flwr/supernode/runtime/run_clientapp.py``). A FAB carrying its own ``client/app.py`` (or
``shared/privacy/ledger.py``), or naming another ``clientapp``, would therefore replace the
site's code - its ledger, its policy, its secret seeds - with the coordinator's.

``python -m client`` puts a directory first on the SuperNode's PATH whose ``flwr-clientapp``
(:func:`write_shim`) runs this module: it validates every FAB (:func:`validate_fab`) *before*
Flower installs it, then hands over to Flower's own ``flwr-clientapp``. A FAB may hold only
``pyproject.toml`` (plus Flower's ``.info/`` metadata), name ``clientapp = "client.app:app"``
and declare no ``[project] dependencies`` (Flower may install those per run). Anything else: the
ClientApp task fails with an error naming the offending file or key, the node logs it, nothing
of the FAB is installed or run. What runs is then the project installed at the site.
"""

from __future__ import annotations

import io
import shlex
import sys
import tomllib
import zipfile
from pathlib import Path

EXPECTED_CLIENTAPP = "client.app:app"
SHIM_NAME = "flwr-clientapp"
INFO_DIR = ".info/"
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".pth", ".dylib", ".dll", ".exe", ".sh")


class UntrustedFab(RuntimeError):
    """The coordinator's FAB holds more than this site accepts; the message names what."""


def validate_fab(content: bytes) -> None:
    """Raise :class:`UntrustedFab` unless the FAB is only a run config for the site's own code."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except zipfile.BadZipFile:
        raise UntrustedFab("the coordinator's FAB is not a zip archive; refusing it") from None
    with archive:
        for info in archive.infolist():
            name = info.filename
            if name == "pyproject.toml":
                continue
            rest = name[len(INFO_DIR):] if name.startswith(INFO_DIR) else None
            if rest and "/" not in rest and not info.is_dir() and not rest.lower().endswith(CODE_SUFFIXES):
                continue  # Flower's own metadata (.info/CONTENT, signatures)
            raise UntrustedFab(
                f"the coordinator's FAB holds {name!r}: this site runs only its own installed code, so a FAB "
                "may hold only pyproject.toml (and Flower's .info/ metadata); refusing it")
        try:
            project = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
        except KeyError:
            raise UntrustedFab("the coordinator's FAB has no pyproject.toml; refusing it") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UntrustedFab(f"the coordinator's FAB: pyproject.toml is unreadable ({exc}); refusing it") from None
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    ref = components.get("clientapp") if isinstance(components, dict) else None
    if ref != EXPECTED_CLIENTAPP:
        raise UntrustedFab(
            f"the coordinator's FAB: pyproject.toml [tool.flwr.app.components] clientapp = {ref!r}; this site "
            f"runs only {EXPECTED_CLIENTAPP!r} (its own installed code); refusing it")
    deps = project.get("project", {}).get("dependencies")
    if deps:
        raise UntrustedFab(
            f"the coordinator's FAB: pyproject.toml [project] dependencies = {deps!r}; this site installs "
            "nothing a coordinator names; refusing it")


def install_guard() -> None:
    """Wrap Flower's ``install_from_fab`` as ``flwr-clientapp`` calls it with :func:`validate_fab`.

    ``flwr.supernode.runtime.run_clientapp.install_from_fab`` is not a public Flower API. It is
    patched on purpose (security: the coordinator's FAB must be checked before it is installed
    and imported, and Flower 1.42 has no hook for that); the project pins flwr < 1.43 and
    tests/test_fab_guard.py fails if the attribute moves or disappears.
    """
    from flwr.supernode.runtime import run_clientapp as runtime

    original = getattr(runtime, "install_from_fab", None)
    if original is None or not callable(original):
        raise RuntimeError("flwr.supernode.runtime.run_clientapp.install_from_fab is missing: this Flower "
                           "version is not supported by the site's FAB guard (client/fab_guard.py)")
    if getattr(original, "_fed_ecg_guarded", False):
        return

    def guarded_install_from_fab(fab_file, *args, **kwargs):
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            validate_fab(content)
        except UntrustedFab as exc:
            print(f"fed-ecg FAB guard: {exc}", file=sys.stderr, flush=True)
            raise
        return original(fab_file, *args, **kwargs)

    guarded_install_from_fab._fed_ecg_guarded = True  # type: ignore[attr-defined]
    runtime.install_from_fab = guarded_install_from_fab


def interpreter_of(script: str | Path | None) -> str | None:
    """The Python interpreter named by a console script's ``#!`` line (None if there is none)."""
    if not script:
        return None
    try:
        with open(script, "rb") as fh:
            first = fh.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    parts = first[2:].split()
    return parts[0] if parts and "python" in Path(parts[0]).name and Path(parts[0]).is_file() else None


def write_shim(directory: Path, python: str | None = None) -> Path:
    """Write ``directory/flwr-clientapp``: runs this guard with ``python``: the interpreter of the
    real ``flwr-clientapp`` it stands in for (the one that has Flower), else this interpreter."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / SHIM_NAME
    shim.write_text(
        "#!/bin/sh\n"
        "# fed-ecg: the site's guard on the coordinator's FAB (client/fab_guard.py), then Flower's flwr-clientapp.\n"
        # -P: no working directory on sys.path, as for Flower's own console script (else a
        # module or a package's metadata in the node's working directory would come first)
        f"exec {shlex.quote(python or sys.executable)} -P -m client.fab_guard \"$@\"\n"
    )
    shim.chmod(0o755)
    return shim


def main() -> None:
    install_guard()
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv[0] = SHIM_NAME  # what Flower's exit handler expects of its own entry point
    flwr_clientapp()


if __name__ == "__main__":
    main()
