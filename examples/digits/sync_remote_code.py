"""Keep a shipped model folder's remote code identical to the package's modules.

A folder saved with `save_pretrained` carries copies of the five modules that `trust_remote_code=True` loads. When
the package changes, the shipped copies must follow, or users of the folder would run different code from users
of the package. This script rewrites the copies; `--check` only compares them and exits 1 listing the drifted
files, which is what the test suite runs.

    python examples/digits/sync_remote_code.py                   # rewrite examples/models/tokenpacker-digits
    python examples/digits/sync_remote_code.py --check [FOLDER]  # exit 1 if any copy differs
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import tokenpacker_hf

REMOTE_CODE_MODULES = (
    "configuration_tokenpacker.py",
    "projector_tokenpacker.py",
    "modeling_tokenpacker.py",
    "image_processing_tokenpacker.py",
    "processing_tokenpacker.py",
)
PACKAGE_DIR = Path(tokenpacker_hf.__file__).resolve().parent
DEFAULT_FOLDER = Path(__file__).resolve().parents[1] / "models" / "tokenpacker-digits"


def drifted(folder: Path) -> list[str]:
    """Names of the remote-code files in `folder` that are missing or differ from the package's modules."""
    return [
        name
        for name in REMOTE_CODE_MODULES
        if not (folder / name).is_file() or (folder / name).read_bytes() != (PACKAGE_DIR / name).read_bytes()
    ]


def sync(folder: Path) -> list[str]:
    """Copies the drifted modules into `folder`; returns their names."""
    changed = drifted(folder)
    for name in changed:
        shutil.copyfile(PACKAGE_DIR / name, folder / name)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folder", nargs="?", type=Path, default=DEFAULT_FOLDER, help="model folder (default: %(default)s)"
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if any file differs")
    args = parser.parse_args(argv)
    if not (args.folder / "config.json").is_file():
        print(f"error: {args.folder} is not a model folder (no config.json)", file=sys.stderr)
        return 2
    if args.check:
        stale = drifted(args.folder)
        for name in stale:
            print(f"drifted: {args.folder / name} differs from {PACKAGE_DIR / name}")
        if stale:
            print(f"run: python {Path(__file__).name} {args.folder}", file=sys.stderr)
        return 1 if stale else 0
    changed = sync(args.folder)
    print(f"updated {len(changed)} file(s) in {args.folder}: {', '.join(changed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
