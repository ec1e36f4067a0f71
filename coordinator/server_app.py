"""Flower ServerApp of the coordinator (thin: the work is in :mod:`coordinator.federation`)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.federation import run_federation
from shared_model.config import config_from_run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(context.run_config)
    run_federation(cfg, grid)
