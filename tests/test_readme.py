"""The README quickstart runs as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_runs_and_moves_weights() -> None:
    (quickstart,) = _python_blocks()
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", quickstart],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    weights_line = result.stdout.strip().splitlines()[-1]
    assert weights_line.startswith("task weights [")
    weights = [float(w) for w in weights_line.split("[")[1].rstrip("]").split(",")]
    assert len(weights) == 4
    assert any(abs(w - 1.0) > 1e-4 for w in weights)
