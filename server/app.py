"""The Flower ServerApp: validates the run config, then runs ``server.loop.run_server``.

Run config keys: ``simulations/four_sites/pyproject.toml`` (``[tool.flwr.app.config]``) and
``shared/federation/run_config.py``. A bad value stops the run here, before any node trains, and the run ends
as failed (``flwr ls`` shows ``finished:failed``; ``python -m simulations.run`` exits non-zero).
"""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from shared.federation.run_config import load_run_config
from server.loop import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_run_config(context.run_config)
    run_server(grid, cfg, echo=lambda line: print(line, flush=True))
