"""docs/tutorial.md runs as written.

Its ```python blocks are taken in order and run as one script in a subprocess, in
an empty temporary directory (the tutorial writes checkpoints and the exported
model there). A block whose first line is ``# requires CUDA`` runs only where a
CUDA device is visible; on the CPU it is left out, so no later block may depend on
it (the tutorial keeps those blocks self-contained).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.md"
CUDA_MARK = "# requires CUDA"
# The tutorial promises well under a minute on 2 CPU cores; this leaves headroom.
TIMEOUT_S = 300

_FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python blocks of a Markdown text, in order."""
    return [body for lang, body in _FENCE.findall(text) if lang == "python"]


def needs_cuda(block: str) -> bool:
    first = block.lstrip("\n").splitlines()[0].strip() if block.strip() else ""
    return first == CUDA_MARK


def script(cuda: bool) -> tuple[str, int, int]:
    """(the script, blocks kept, blocks left out) for a machine with(out) CUDA."""
    blocks = python_blocks(TUTORIAL.read_text())
    kept = [b for b in blocks if cuda or not needs_cuda(b)]
    parts = [f"# --- block {i + 1} ---\n{b}" for i, b in enumerate(kept)]
    return "\n".join(parts), len(kept), len(blocks) - len(kept)


def test_tutorial_blocks_are_found():
    blocks = python_blocks(TUTORIAL.read_text())
    assert len(blocks) >= 10, f"found only {len(blocks)} python blocks in {TUTORIAL}"
    cuda = [b for b in blocks if needs_cuda(b)]
    assert cuda, f"the mixed-precision block should be marked {CUDA_MARK!r}"
    assert all("cuda" in b for b in cuda)


def test_tutorial_runs(tmp_path):
    cuda = torch.cuda.is_available()
    code, kept, skipped = script(cuda)
    path = tmp_path / "tutorial.py"
    path.write_text(code)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # modelbatch comes from the installed package
    env["MPLBACKEND"] = "Agg"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, (
        f"docs/tutorial.md failed ({kept} blocks run, {skipped} CUDA-only left out):\n"
        f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    )
    out = proc.stdout
    assert "best model: #" in out and "reloaded plain MLP: val accuracy" in out, out[-3000:]
    assert (tmp_path / "best_mlp.pt").is_file()
    assert (tmp_path / "checkpoints" / "best.json").is_file()
    assert (tmp_path / "run.ckpt").is_file()
    if cuda:
        assert "per-model loss scales:" in out
    print(f"tutorial: {kept} blocks in {elapsed:.1f} s ({skipped} CUDA-only left out)")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("```python\na = 1\n```\n", ["a = 1\n"]),
        ("```bash\nls\n```\n```python\nb = 2\n```\n", ["b = 2\n"]),
        ("```python\n# requires CUDA\nc = 3\n```\n", ["# requires CUDA\nc = 3\n"]),
    ],
)
def test_python_blocks(text, expected):
    assert python_blocks(text) == expected
    assert needs_cuda(expected[-1]) == ("requires CUDA" in text)
