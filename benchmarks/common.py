"""What every benchmark records next to its figures: when, on what machine, and where it was written."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """The machine the figures come from (CPU count, Python, platform, CUDA device if any)."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def header(name: str) -> dict[str, Any]:
    """The first keys of a results file: the benchmark's name, the time, the machine."""
    return {"benchmark": name, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine()}


def write_results(path: str | os.PathLike, results: dict[str, Any]) -> None:
    """Write ``results`` as indented JSON (creating the folder) and say where."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {target}")
