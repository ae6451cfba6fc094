"""Run Python code in a fresh interpreter that cannot import `tokenpacker_hf`, to test what a user without the
package gets from a saved folder (`trust_remote_code=True`). The venv installs the package in editable mode
(a `.pth` path entry or a meta-path finder), so the child removes both before running the code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_HIDE_PACKAGE = """
import importlib, importlib.util, os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                    and "tokenpacker" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "tokenpacker_hf"))]
importlib.invalidate_caches()
assert importlib.util.find_spec("tokenpacker_hf") is None, "tokenpacker_hf is still importable"
"""


def run_without_package(
    code: str,
    cwd: str | os.PathLike,
    env_extra: dict[str, str] | None = None,
    timeout: float = 120,
    python: str = sys.executable,
    args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Runs `code` (with `sys.argv[1:] = args`) with `python` (default: this venv's) in `cwd`, offline, with a
    private `HF_HOME` under `cwd` and `tokenpacker_hf` made unimportable. Returns the finished process (text
    stdout/stderr); check `returncode`."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        HF_HOME=str(Path(cwd) / "hf_home"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(env_extra or {})
    return subprocess.run(
        [python, "-c", _HIDE_PACKAGE + code, *args],
        cwd=str(cwd),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
