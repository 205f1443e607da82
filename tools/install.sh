#!/usr/bin/env bash
# Idempotent set-up of eql_d2's Python environment (a project venv by default).
#   tools/install.sh            create/refresh .venv and install everything
#   PYTHON=/path/to/python tools/install.sh   install into an existing interpreter instead
# detectron2 comes from, in order: an importable one, upstream source (when GitHub answers
# within a few seconds), or the PyPI wheel of upstream main installed as pure Python.
#
# Machines without a package index (see README, "Offline install"):
#   tools/install.sh --download DIR [--python-version 3.12] [--platform manylinux_2_28_x86_64]
#                    [--no-torch]
#       on a connected machine: collect every wheel eql_d2 needs, for that Python version and
#       platform, into DIR (wheels only; sdist-only pure-Python packages are built into wheels)
#   [PYTHON=/path/to/python] tools/install.sh --wheelhouse DIR
#       install from DIR with no index at all (into .venv, or the interpreter PYTHON names)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
constraints="$root/requirements/constraints.txt"
# Everything except torch, torchvision and detectron2, which are handled on their own.
reqs=("setuptools<81" wheel numpy fvcore iopath lvis pycocotools faster-coco-eval omegaconf ensemble-boxes ijson matplotlib pytest pytest-xdist submitit scikit-learn scipy)
# detectron2 when neither an importable one nor GitHub is available: see the install step.
d2_fallback="sal-detectron2==0.7.2"
d2_wheel="sal_detectron2-0.7.2-py3-none-any.whl"

die() { echo "tools/install.sh: $*" >&2; exit 1; }

mode=install download_dir="" wheelhouse="" pyver="" with_torch=1 platforms=()
while [ $# -gt 0 ]; do
  case "$1" in
    --download) [ $# -ge 2 ] || die "--download needs a folder"; mode=download; download_dir="$2"; shift 2 ;;
    --wheelhouse) [ $# -ge 2 ] || die "--wheelhouse needs a folder"; mode=wheelhouse; wheelhouse="$2"; shift 2 ;;
    --python-version) [ $# -ge 2 ] || die "--python-version needs a version such as 3.12"; pyver="$2"; shift 2 ;;
    --platform) [ $# -ge 2 ] || die "--platform needs a tag such as manylinux_2_28_x86_64"; platforms+=("$2"); shift 2 ;;
    --no-torch) with_torch=0; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see tools/install.sh --help)" ;;
  esac
done
if [ "$mode" != download ] && { [ -n "$pyver" ] || [ ${#platforms[@]} -gt 0 ] || [ $with_torch = 0 ]; }; then
  die "--python-version, --platform and --no-torch go with --download"
fi
if [ -n "$download_dir" ] && [ -n "$wheelhouse" ]; then
  die "--download and --wheelhouse are two steps on two machines; give one of them"
fi

# Some pip set-ups list local index folders that may be absent; their warnings are noise.
pip() {
  "$py" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

# ------------------------------------------------------------------------ --download DIR
if [ "$mode" = download ]; then
  py="${PYTHON:-python3}"
  [ -n "$pyver" ] || pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [[ "$pyver" =~ ^3\.[0-9]+$ ]] || die "--python-version must look like 3.12, got '$pyver'"
  [ ${#platforms[@]} -gt 0 ] || platforms=(manylinux_2_28_x86_64)
  # pip matches --platform tags literally: a glibc 2.28 machine also runs wheels built for
  # 2.17 .. 2.27 and the legacy manylinux1/2010/2014 names, so all of them are asked for.
  plat_args=()
  for p in "${platforms[@]}"; do
    if [[ "$p" =~ ^manylinux_2_([0-9]+)_(.+)$ ]] || [[ "$p" =~ ^manylinux(2014)_(.+)$ ]]; then
      glibc="${BASH_REMATCH[1]}" arch="${BASH_REMATCH[2]}"
      [ "$glibc" = 2014 ] && glibc=17
      for ((v = glibc; v >= 5; v--)); do plat_args+=(--platform "manylinux_2_${v}_$arch"); done
      plat_args+=(--platform "manylinux2014_$arch" --platform "manylinux2010_$arch" --platform "manylinux1_$arch")
    else
      plat_args+=(--platform "$p")
    fi
  done
  mkdir -p "$download_dir"
  dir="$(cd "$download_dir" && pwd)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT

  echo "eql_d2: collecting wheels for CPython $pyver (${platforms[*]}) into $dir"
  # detectron2: the wheel of upstream main is tagged cp310 but is used as pure Python.
  pip download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$work" "$d2_fallback"
  cp "$work"/sal_detectron2-0.7.2-*.whl "$dir/$d2_wheel"

  # Packages published as sdists only (fvcore, iopath, antlr4-python3-runtime): resolve the
  # set here, then build a wheel of each; they are pure Python, so one wheel fits any target.
  pip install -q --dry-run --ignore-installed --report "$work/report.json" -c "$constraints" \
    "${reqs[@]}" "$dir/$d2_wheel"
  "$py" - "$work/report.json" > "$work/sdists.txt" <<'EOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    if not item["download_info"]["url"].endswith(".whl"):
        print(f'{item["metadata"]["name"]}=={item["metadata"]["version"]}')
EOF
  while read -r req; do
    [ -n "$req" ] || continue
    echo "eql_d2: $req is published as an sdist only; building its wheel"
    pip wheel -q --no-deps -w "$work/built" "$req"
  done < "$work/sdists.txt"
  if [ -d "$work/built" ]; then
    for whl in "$work"/built/*.whl; do
      case "$(basename "$whl")" in
        *-none-any.whl) mv "$whl" "$dir/" ;;
        *) die "$(basename "$whl") is not pure Python: it cannot serve Python $pyver on ${platforms[*]}" ;;
      esac
    done
  fi

  targets=("${reqs[@]}" "$dir/$d2_wheel")
  [ $with_torch = 1 ] && targets+=(torch torchvision)
  pip download -q --only-binary=:all: --implementation cp --python-version "$pyver" "${plat_args[@]}" \
    --find-links "$dir" -c "$constraints" -d "$dir" "${targets[@]}"
  others="$(find "$dir" -maxdepth 1 -type f ! -name '*.whl' ! -name 'eql_d2-wheelhouse.txt' -printf '%f ')"
  [ -z "$others" ] || die "$dir holds files that are not wheels: $others"
  printf 'python %s\nplatforms %s\ntorch %s\n' "$pyver" "${platforms[*]}" \
    "$([ $with_torch = 1 ] && echo included || echo 'not included (--no-torch)')" > "$dir/eql_d2-wheelhouse.txt"
  echo "eql_d2: $(find "$dir" -maxdepth 1 -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir"
  echo "eql_d2: on the offline machine: [PYTHON=/path/to/python] tools/install.sh --wheelhouse $download_dir"
  exit 0
fi

# --------------------------------------------------------- install (online or --wheelhouse)
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

if [ "$mode" = wheelhouse ]; then
  [ -d "$wheelhouse" ] || die "--wheelhouse $wheelhouse: no such folder"
  wheelhouse="$(cd "$wheelhouse" && pwd)"
  [ -f "$wheelhouse/$d2_wheel" ] || die "$wheelhouse has no $d2_wheel: make it with tools/install.sh --download"
  if [ -f "$wheelhouse/eql_d2-wheelhouse.txt" ]; then
    have="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    made="$(sed -n 's/^python //p' "$wheelhouse/eql_d2-wheelhouse.txt")"
    [ "$have" = "$made" ] || die "$wheelhouse holds wheels for Python $made, but $py is Python $have"
  fi
  # in the environment too, so that pip's own nested calls (build dependencies) see them
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$wheelhouse"
  pipi() { pip install -q --no-index --find-links "$wheelhouse" "$@"; }
  cons="$(mktemp)"
  trap 'rm -f "$cons"' EXIT
  if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "eql_d2: installing torch and torchvision from $wheelhouse"
    pipi -c "$constraints" torch torchvision \
      || die "no torch/torchvision for this Python in $wheelhouse (made with --no-torch?): install them first"
  fi
  # What the environment already has stays as it is: torch and torchvision always, numpy
  # when it is 2.x (torch was built against it; detectron2's metadata asks for numpy<2,
  # so detectron2 goes in without its dependencies, which are installed one by one below).
  keep_numpy="$("$py" -c 'import numpy; print(numpy.__version__ if int(numpy.__version__.split(".")[0]) >= 2 else "")' 2>/dev/null || true)"
  grep -v -E '^(torch|torchvision)==' "$constraints" | { if [ -n "$keep_numpy" ]; then grep -v -E '^numpy=='; else cat; fi; } > "$cons"
  "$py" -c 'import torch, torchvision; print(f"torch=={torch.__version__}\ntorchvision=={torchvision.__version__}")' >> "$cons"
  [ -z "$keep_numpy" ] || { echo "numpy==$keep_numpy" >> "$cons"; echo "eql_d2: keeping the installed numpy $keep_numpy"; }
  pipi -c "$cons" "${reqs[@]}"
  if "$py" -c "import detectron2" >/dev/null 2>&1; then
    d2_source="already importable ($("$py" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))'))"
  elif [ -n "$keep_numpy" ]; then
    deps="$("$py" - "$wheelhouse/$d2_wheel" <<'EOF'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:") and ";" not in line:
            req = line.split(":", 1)[1].strip()
            if re.split(r"[<>=!~ \[]", req)[0].lower() != "numpy":
                print(req)
EOF
)"
    mapfile -t deps <<< "$deps"
    pipi -c "$cons" "${deps[@]}"
    pipi -c "$cons" --no-deps "$wheelhouse/$d2_wheel"
    d2_source="wheelhouse $wheelhouse: sal-detectron2==0.7.2 as pure Python, --no-deps beside numpy $keep_numpy"
  else
    pipi -c "$cons" "$wheelhouse/$d2_wheel"
    d2_source="wheelhouse $wheelhouse: sal-detectron2==0.7.2 as pure Python"
  fi
  # PEP 660 editable install with the setuptools just installed: nothing to fetch
  pipi -c "$cons" --no-deps --no-build-isolation --use-pep517 -e "$root"
else
  if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "eql_d2: installing torch and torchvision (tested pair from requirements/constraints.txt)"
    pip install -q -c "$constraints" torch torchvision
  fi
  pip install -q -c "$constraints" "${reqs[@]}"

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
    pip download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp" "$d2_fallback"
    whl="$(ls "$tmp"/sal_detectron2-0.7.2-*.whl)"
    cp "$whl" "$tmp/$d2_wheel"
    pip install -q -c "$constraints" "$tmp/$d2_wheel"
    rm -rf "$tmp"
    d2_source="PyPI wheel sal-detectron2==0.7.2 (upstream main a59f0563) as pure Python, no _C"
  fi
  pip install -q -c "$constraints" --no-deps -e "$root"
fi
"$py" -c "import detectron2, eql_d2, lvis, torch, torchvision; print('eql_d2: torch', torch.__version__, '| torchvision', torchvision.__version__, '| detectron2', detectron2.__version__)"
echo "eql_d2: detectron2 from $d2_source"
# an importable detectron2 may be the one this script installed on an earlier run
case "$d2_source" in
  "already importable"*) [ -f "$stamp_dir/.eql_d2-detectron2-source" ] || echo "$d2_source" > "$stamp_dir/.eql_d2-detectron2-source" ;;
  *) echo "$d2_source" > "$stamp_dir/.eql_d2-detectron2-source" ;;
esac
echo "$want" > "$stamp"
