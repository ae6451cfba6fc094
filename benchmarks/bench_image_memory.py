"""Peak memory and time of slice-mode (TokenPacker-HD) preprocessing of large photos: the default, which resizes from
the full-resolution image as the original did, against the opt-in `box_reduce_large_images=True` shortcut.

Writes a 12-megapixel (4032×3024) and a 100-megapixel (11547×8660) JPEG of fine texture (independent 8-bit noise in
every pixel and channel, quality 90), then processes each file in fresh child processes, `--repeats` times per
setting (`max_slices=9`): decoding, conversion, resize and tiling. Each child warms up torch and PIL on a tiny
image first and reports the growth of its own peak RSS (`ru_maxrss`) over that and the wall time of the call; the
report gives medians, the ratios default / shortcut, and the growth in units of one 8-bit RGB copy of the image.
With `--baseline-src DIR` a third column runs the children on the package sources in DIR with their default
settings (e.g. an older checkout, whose default was the shortcut).

The harness imports only the standard library (plus numpy and PIL in the writer child), so children start from a
small parent: on Linux a child's `ru_maxrss` counts the memory its parent held when it was spawned.

Usage:
    python benchmarks/bench_image_memory.py                    # 12 MP and 100 MP, 3 runs each (~2 min, ~2 GB)
    python benchmarks/bench_image_memory.py --smoke --output smoke.json   # one small photo, small tiles
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_convert_memory import machine_and_versions, write_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PHOTOS = {"12 MP": (4032, 3024), "100 MP": (11547, 8660)}  # (width, height)
SMOKE_PHOTOS = {"2 MP": (1600, 1200)}
SMOKE_TILE = 48  # small tiles, so that the shortcut applies to the smoke photo

WRITE = """
import sys
import numpy as np
from PIL import Image
path, width, height = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
Image.fromarray(pixels).save(path, quality=90)
"""

PROBE = """
import json, resource, sys, time, warnings
import numpy as np
from PIL import Image
from tokenpacker_hf.image_processing_tokenpacker import TokenPackerImageProcessor

path, tile_size, settings = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # 100 MP is above PIL's warning size
processor = TokenPackerImageProcessor(image_mode="slice", tile_size=tile_size, **settings)
processor(np.zeros((40, 30, 3), dtype=np.uint8))  # torch's kernels and allocator, PIL's decoders
peak_mib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
before, start = peak_mib(), time.perf_counter()
out = processor(path)
print(json.dumps({"growth_mib": peak_mib() - before, "seconds": time.perf_counter() - start,
                  "grid": out["image_grids"][0].tolist()}))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="children per photo and setting (median reported)")
    parser.add_argument("--baseline-src", type=Path, default=None, help="package sources for a third column")
    parser.add_argument("--baseline-label", default="baseline", help="what the report calls that column's sources")
    parser.add_argument("--smoke", action="store_true", help="one small photo: checks the script, not memory")
    parser.add_argument("--workdir", type=Path, default=None, help="where the photos go (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "image_memory.json")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    return args


def run_probe(path: Path, tile_size: int, settings: dict, source: Path) -> dict:
    """One child processing `path` with the package at `source`: its peak RSS growth (MiB), seconds and grid."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-c", PROBE, str(path), str(tile_size), json.dumps(settings)],
                           env=env, capture_output=True, text=True, check=False)  # fmt: skip
    if child.returncode != 0:
        raise SystemExit(f"processing {path.name} with {settings} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def measure(path: Path, tile_size: int, settings: dict, source: Path, repeats: int) -> dict:
    """Medians over `repeats` children of [`run_probe`], and every run."""
    runs = [run_probe(path, tile_size, settings, source) for _ in range(repeats)]
    return {"growth_mib": statistics.median(run["growth_mib"] for run in runs),
            "seconds": statistics.median(run["seconds"] for run in runs),
            "grid": runs[0]["grid"], "runs": runs}  # fmt: skip


def main() -> None:
    args = parse_args()
    photos, tile_size = (SMOKE_PHOTOS, SMOKE_TILE) if args.smoke else (PHOTOS, 336)
    columns = {"exact": ({}, REPO / "src"), "box_reduce": ({"box_reduce_large_images": True}, REPO / "src")}
    if args.baseline_src is not None:
        columns["baseline"] = ({}, args.baseline_src.resolve())
    workdir = Path(tempfile.mkdtemp()) if args.workdir is None else args.workdir
    load_before, rows = os.getloadavg(), []
    try:
        for name, (width, height) in photos.items():
            path = workdir / f"photo-{width}x{height}.jpg"
            subprocess.run([sys.executable, "-c", WRITE, str(path), str(width), str(height)], check=True)
            row = {"photo": name, "width": width, "height": height, "file_bytes": path.stat().st_size,
                   "rgb_copy_mib": width * height * 3 / 2**20}  # fmt: skip
            for column, (settings, source) in columns.items():
                row[column] = measure(path, tile_size, settings, source, args.repeats)
            row["exact_over_box_reduce"] = {key: row["exact"][key] / row["box_reduce"][key]
                                            for key in ("growth_mib", "seconds")}  # fmt: skip
            rows.append(row)
            path.unlink()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {"rows": rows, "repeats": args.repeats, "tile_size": tile_size, "max_slices": 9,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "smoke": args.smoke,
              "baseline": None if args.baseline_src is None else args.baseline_label,
              **machine_and_versions()}  # fmt: skip
    write_report(report, args.output)
    print(markdown(report))
    print(f"wrote {args.output}")


def markdown(report: dict) -> str:
    """The README's table: per photo, peak RSS growth and time of each column, and the default / shortcut ratios."""
    columns = [column for column in ("baseline", "box_reduce", "exact") if column in report["rows"][0]]
    titles = {"baseline": report["baseline"], "box_reduce": "box_reduce_large_images=True", "exact": "default (exact)"}
    lines = ["| photo | " + " | ".join(titles[column] for column in columns) + " | default / box-reduce |",
             "|---" * (len(columns) + 2) + "|"]  # fmt: skip
    for row in report["rows"]:
        cells = [f"{row[column]['growth_mib']:.0f} MiB ({row[column]['growth_mib'] / row['rgb_copy_mib']:.2f} × "
                 f"RGB), {row[column]['seconds']:.2f} s" for column in columns]  # fmt: skip
        ratio = row["exact_over_box_reduce"]
        lines.append(
            f"| {row['photo']} ({row['width']}×{row['height']}, grid {tuple(row['exact']['grid'])}) | "
            + " | ".join(cells)
            + f" | {ratio['growth_mib']:.2f} × RSS, {ratio['seconds']:.2f} × time |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
