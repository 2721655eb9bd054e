"""The Flower ServerApp: validates the run config, then runs ``server.loop.run_server``.

Run config keys: ``simulations/four_sites/pyproject.toml`` (``[tool.flwr.app.config]``) and
``shared/federation/run_config.py``. A bad value stops the run here, before any node trains, and
the run ends as failed (``flwr ls`` shows ``finished:failed``; ``python -m simulations.run``
exits non-zero). Flower's own INFO log is off unless ``verbose = true``.
"""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.loop import run_server
from shared.federation.quiet import quiet_flower_log, quiet_third_party_warnings
from shared.federation.run_config import load_run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_run_config(context.run_config)
    quiet_flower_log(bool(cfg.verbose))
    quiet_third_party_warnings(bool(cfg.verbose))
    run_server(grid, cfg, echo=lambda line: print(line, flush=True))
