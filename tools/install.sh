#!/usr/bin/env bash
# Idempotent set-up of eql_d2's Python environment (a project venv by default).
#   tools/install.sh            create/refresh .venv and install everything
#   PYTHON=/path/to/python tools/install.sh   install into an existing interpreter instead
# detectron2 comes from, in order: an importable one, upstream source (when GitHub answers
# within a few seconds), or the PyPI wheel of upstream main installed as pure Python.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
constraints="$root/requirements/constraints.txt"

if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
  stamp_dir="$root/.eql_d2_install"
else
  venv="${EQL_D2_VENV:-$root/.venv}"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  py="$venv/bin/python"
  stamp_dir="$venv"
fi
mkdir -p "$stamp_dir"
stamp="$stamp_dir/.eql_d2-install-stamp"
want="$(cat "$constraints" "$root/setup.py" "$0" | sha256sum | cut -d' ' -f1) $py"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$py" -c "import detectron2, eql_d2, lvis, torchvision" >/dev/null 2>&1; then
  echo "eql_d2: environment up to date ($py); detectron2 from $(cat "$stamp_dir/.eql_d2-detectron2-source" 2>/dev/null || echo 'unknown')"
  exit 0
fi

# Some pip set-ups list local index folders that may be absent; their warnings are noise.
pip() {
  "$py" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "eql_d2: installing torch and torchvision (tested pair from requirements/constraints.txt)"
  pip install -q -c "$constraints" torch torchvision
fi
pip install -q -c "$constraints" "setuptools<81" wheel numpy fvcore iopath lvis pycocotools \
  omegaconf ensemble-boxes matplotlib pytest

if "$py" -c "import detectron2" >/dev/null 2>&1; then
  d2_source="already importable ($("$py" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))'))"
elif GIT_TERMINAL_PROMPT=0 timeout 15 git ls-remote https://github.com/facebookresearch/detectron2.git HEAD >/dev/null 2>&1; then
  echo "eql_d2: building detectron2 from upstream source (takes several minutes)"
  pip install -q -c "$constraints" --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'
  d2_source="upstream source (github.com/facebookresearch/detectron2, main)"
else
  # sal-detectron2 0.7.2 is a wheel of upstream main (2024-04-17) tagged cp310 with a _C
  # built for one CUDA torch; its Python code runs on any 3.x, and eql_d2 never loads _C.
  tmp="$(mktemp -d)"
  pip download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp" sal-detectron2==0.7.2
  whl="$(ls "$tmp"/sal_detectron2-0.7.2-*.whl)"
  cp "$whl" "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  pip install -q -c "$constraints" "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  rm -rf "$tmp"
  d2_source="PyPI wheel sal-detectron2==0.7.2 (upstream main a59f0563) as pure Python, no _C"
fi
pip install -q -c "$constraints" --no-deps -e "$root"
"$py" -c "import detectron2, eql_d2, lvis, torch, torchvision; print('eql_d2: torch', torch.__version__, '| torchvision', torchvision.__version__, '| detectron2', detectron2.__version__)"
echo "eql_d2: detectron2 from $d2_source"
# an importable detectron2 may be the one this script installed on an earlier run
case "$d2_source" in
  "already importable"*) [ -f "$stamp_dir/.eql_d2-detectron2-source" ] || echo "$d2_source" > "$stamp_dir/.eql_d2-detectron2-source" ;;
  *) echo "$d2_source" > "$stamp_dir/.eql_d2-detectron2-source" ;;
esac
echo "$want" > "$stamp"
