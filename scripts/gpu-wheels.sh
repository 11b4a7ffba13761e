#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels scripts/gpu-check.sh installs on a GPU machine
# that has CUDA, torch and Triton but no internet: open_clip and what it imports, the CLI's
# typer and rich, pytest and pytest-benchmark, each pinned, without their dependencies (the
# list below is the closure of what fastprompt, open_clip, pytest and pytest-benchmark import,
# read from each wheel's METADATA; torch brings filelock, fsspec, jinja2, networkx, sympy and
# typing_extensions). Run it here (PyPI reachable), then carry .whl/ with the checkout.
#
#   scripts/gpu-wheels.sh                 # cp312 manylinux x86_64 wheels (the GPU machine)
#   PYVER=3.11 scripts/gpu-wheels.sh      # another Python (e.g. to try the install here)
#   TORCHVISION=0.26.0 scripts/gpu-wheels.sh   # also torchvision, when the GPU machine lacks
#                                         # it: the release built for its torch (2.11 -> 0.26)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
OUT=${OUT:-.whl}

WHEELS=(
    # open_clip and its imports (regex, PyYAML, safetensors: binary wheels)
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 regex==2026.11.19 timm==1.0.31
    huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 anyio==4.16.0 h11==0.16.0 idna==3.20
    truststore==0.10.5 hf-xet==1.8.0 safetensors==0.8.0 tqdm==4.70.1 PyYAML==6.0.4 packaging==26.4 pillow==13.0.0
    # fastprompt's CLI and tables (pydantic-core: binary)
    typer==0.29.2 click==8.5.1 shellingham==1.5.4 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2
    Pygments==2.21.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.5 annotated-doc==0.0.7 numpy==2.4.6 psutil==7.2.2
    # the tests and microbenchmarks
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-benchmark==5.3.1 py-cpuinfo2==10.1.1
)
if [ -n "${TORCHVISION:-}" ]; then
    WHEELS+=("torchvision==$TORCHVISION")
fi

mkdir -p "$OUT"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT" "${WHEELS[@]}"
echo "[gpu-wheels] $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT (Python $PYVER)"
