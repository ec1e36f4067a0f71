"""Run the Flower app (ServerApp + ClientApps) under Flower's simulation engine (Ray).

Why not the public ``flwr.simulation.run_simulation``: it gives both apps an empty run
config, so the preset and overrides could not reach the nodes. ``flwr run . <federation>``
passes them but starts a detached SuperLink and installs dependencies with ``uv sync``,
which this offline machine cannot do. So this module calls the same in-process engine with
a ``Run`` that carries the run config, fused with pyproject's ``[tool.flwr.app.config]``
exactly as ``flwr run --run-config`` would (unknown keys are refused the same way).
The apps are loaded from their ``[tool.flwr.app.components]`` references, so the
coordinator package never imports the member node package.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no outbound calls; read at flwr import

import logging  # noqa: E402
import secrets  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.common.config import get_fused_config_from_dir, get_project_config  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.simulation.run_simulation import _run_simulation  # noqa: E402
from flwr.supercore.constant import NOOP_FEDERATION_ID  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from flwr.supercore.telemetry import EventType  # noqa: E402

APP_DIR = Path(__file__).resolve().parent.parent


def run_local_simulation(
    run_config: Mapping[str, str],
    num_supernodes: int,
    *,
    cpus: int | None = None,
    cpus_per_node: float = 1.0,
    verbose: bool = False,
) -> None:
    """Run the app with ``num_supernodes`` virtual nodes; raises if the ServerApp fails."""
    # Opacus calls logging.basicConfig at import, which gives the root logger a handler;
    # flwr's logger (which has its own) would then print every DEBUG line twice.
    logging.getLogger("flwr").propagate = False
    project = get_project_config(APP_DIR)
    components = project["tool"]["flwr"]["app"]["components"]
    fused = get_fused_config_from_dir(APP_DIR, dict(run_config))

    run = Run.create_empty(run_id=secrets.randbits(63))
    run.primary_task_id = secrets.randbits(63)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=fused)
    cpus = cpus or os.cpu_count() or 1
    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        server_app_attr=components["serverapp"],
        client_app_attr=components["clientapp"],
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": cpus_per_node, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False},
        },
        app_dir=str(APP_DIR),
        run=run,
        server_app_context=context,
        is_app=True,
        verbose_logging=verbose,
    )
