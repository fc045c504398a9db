"""Prefect pull steps of the ttd deployments (prefect.yaml `pull:`), run by the worker before each flow run.

`enter_project` makes the flow run's working directory the ttd project checkout, so the entrypoint
(`flows/pipeline.py`) and a relative `config_path` (`configs/local.yaml`) resolve the same on every machine:
`TTD_PROJECT_DIR` when the worker's environment sets it (the Docker image sets /opt/ttd), else the checkout this
`flows` package is installed from (`pip install -e .`), whatever folder the worker was started in.
"""

from __future__ import annotations

import os
from pathlib import Path

MARKERS = ("prefect.yaml", "flows/pipeline.py")


def project_dir(directory: str | None = None) -> Path:
    """The folder to run flows in: `directory` if given, else the checkout holding this package; checked for the
    project's files so a wrong path fails here with one clear line, not later inside the flow."""
    chosen = Path(directory).expanduser() if directory else Path(__file__).resolve().parents[1]
    source = "TTD_PROJECT_DIR" if directory else "the installed ttd checkout"
    missing = [m for m in MARKERS if not (chosen / m).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{source} {str(chosen)!r} is not a ttd project checkout (no {', '.join(missing)}): set TTD_PROJECT_DIR "
            "in the worker's environment to the folder holding prefect.yaml, or install ttd there with "
            "`pip install -e .`")
    return chosen.resolve()


def enter_project(directory: str = "") -> dict[str, str]:
    """Change into the project folder (see module docstring); returns it as the step's output `directory`."""
    path = project_dir(directory.strip() or None)
    os.chdir(path)
    return {"directory": str(path)}
