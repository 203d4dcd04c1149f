"""What importing the light modules loads: reading a configuration needs no stage, no Beam and no model library.

Each check runs its statement in a fresh interpreter (this process has long loaded everything) and lists the
modules it brought in.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "apache_beam", "open_clip", "diffusers", "transformers", "pyarrow")


def modules_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)), file=sys.__stdout__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_the_configuration_loads_no_stage_and_no_heavy_library() -> None:
    loaded = modules_after("import pipeline.config")
    assert not {name for name in loaded if name.split(".")[0] in HEAVY}
    # Of ours: the settings module and the config of the synthesis library, nothing that runs.
    assert {name for name in loaded if name.startswith("transforms")} == {"transforms", "transforms.settings"}
    assert {name for name in loaded if name.startswith("pipeline")} == {"pipeline", "pipeline.config"}


@pytest.mark.parametrize("statement", [
    "import pipeline.cli",
    "import transforms.models",
    # The config command prints every key without loading what runs (the run command does).
    "from pipeline.cli import main; import contextlib, io; contextlib.redirect_stdout(io.StringIO()).__enter__(); "
    "main(['config', '--list'])",
])
def test_entry_points_load_nothing_heavy(statement: str) -> None:
    loaded = modules_after(statement)
    assert not {name for name in loaded if name.split(".")[0] in HEAVY}
