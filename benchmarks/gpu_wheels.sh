#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that benchmarks/gpu_suite.sh installs on the GPU machine, which
# starts with python 3.12, torch 2.11 (CUDA) and transformers 5.17 (below this package's floor) and cannot reach
# any index. Run it here, on a machine with PyPI, then send .whl/ along with the repository tree.
#
#   bash benchmarks/gpu_wheels.sh
#
# The set is this package's runtime requirements above torch, pinned to versions tested together, plus
# everything they require that a bare python 3.12 + torch might lack. numpy is left out (16 MB): transformers
# 5.17 already needs it there, and every numpy release for python 3.12 (>= 1.26) meets our floor. The last step
# checks that every requirement of every wheel, for CPython 3.12 on Linux x86_64, is met inside the folder or
# by what the machine has (torch, its requirements, numpy).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

WHEELS=(
  # the package's own requirements (pyproject.toml)
  transformers==5.24.0 huggingface_hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 accelerate==1.15.0
  peft==0.21.2 pillow==13.0.0 tqdm==4.70.1
  # what those require
  packaging==26.4 pyyaml==6.0.4 regex==2026.11.19 psutil==7.2.2 hf-xet==1.8.0 click==8.5.1 typer==0.29.2
  httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 idna==3.20 truststore==0.10.5
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7
  shellingham==1.5.4 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
  # torch requires these too, but anyio needs a newer typing_extensions than an older torch may have brought
  typing_extensions==4.16.0 filelock==4.3.1 fsspec==2026.9.0
)

mkdir -p .whl
for wheel in "${WHEELS[@]}"; do
  # One at a time with --no-deps: the folder holds exactly the pins above, one version each.
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$wheel"
done

"$PYTHON" - .whl <<'EOF'
"""Every requirement of every wheel in the folder, evaluated for CPython 3.12 on Linux x86_64, must be met by a
wheel in the folder (name and version) or be on the GPU machine already: torch, its own requirements and numpy."""
import sys
import zipfile
from pathlib import Path

from pip._vendor.packaging.requirements import Requirement  # pip's own copy: present wherever pip is
from pip._vendor.packaging.utils import canonicalize_name

ON_THE_MACHINE = {"torch", "sympy", "networkx", "jinja2", "setuptools", "numpy"}
ENVIRONMENT = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}

folder = Path(sys.argv[1])
wheels = {}
for path in sorted(folder.glob("*.whl")):
    with zipfile.ZipFile(path) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    fields = [line.split(": ", 1) for line in metadata.splitlines() if ": " in line]
    name = canonicalize_name(next(value for key, value in fields if key == "Name"))
    if name in wheels:
        sys.exit(f"two versions of {name} in {folder}: remove the older wheel")
    wheels[name] = (next(value for key, value in fields if key == "Version"),
                    [Requirement(value) for key, value in fields if key == "Requires-Dist"])
missing = []
for name, (_, requirements) in wheels.items():
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate(ENVIRONMENT):
            continue
        wanted = canonicalize_name(requirement.name)
        if wanted in ON_THE_MACHINE:
            continue
        if wanted not in wheels or not requirement.specifier.contains(wheels[wanted][0], prereleases=True):
            missing.append(f"{name} needs {requirement}")
if missing:
    sys.exit("unmet requirements:\n  " + "\n  ".join(missing))
print(f"{len(wheels)} wheels in {folder}, {sum(p.stat().st_size for p in folder.glob('*.whl')) / 2**20:.1f} MiB, "
      "every requirement met (torch and numpy aside)")
EOF
