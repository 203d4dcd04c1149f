"""What importing the light modules loads: reading a configuration needs no stage, no Beam and no model library.

Each check imports the module in a fresh interpreter (this process has long loaded everything) and lists the
modules it brought in.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "apache_beam", "open_clip", "diffusers", "transformers", "pyarrow")


def modules_after_import(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_the_configuration_loads_no_stage_and_no_heavy_library() -> None:
    loaded = modules_after_import("pipeline.config")
    assert not {name for name in loaded if name.split(".")[0] in HEAVY}
    # Of ours: the settings module and the config of the synthesis library, nothing that runs.
    assert {name for name in loaded if name.startswith("transforms")} == {"transforms", "transforms.settings"}
    assert {name for name in loaded if name.startswith("pipeline")} == {"pipeline", "pipeline.config"}


@pytest.mark.parametrize("module", ["pipeline.cli", "transforms.models"])
def test_entry_points_load_nothing_heavy(module: str) -> None:
    loaded = modules_after_import(module)
    assert not {name for name in loaded if name.split(".")[0] in HEAVY}
