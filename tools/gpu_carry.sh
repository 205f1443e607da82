#!/usr/bin/env bash
# The GPU check on a CUDA machine without a package index whose Python already has torch,
# torchvision and numpy (and the common scientific packages), from a small folder of wheels
# that travels with the working tree.
#
#   bash tools/gpu_carry.sh build [DIR]   on a connected machine: the wheels the GPU image
#                                          lacks, for CPython 3.12 x86_64 (default DIR:
#                                          wheelhouse/gpu, git-ignored); prints the total size
#   bash tools/gpu_carry.sh run [DIR]     on the CUDA machine, from the repository root:
#                                          installs DIR into a private folder (pip --target,
#                                          no index, no dependencies: the image's torch and
#                                          numpy stay) and runs benchmarks/gpu_check.py into
#                                          $OUT (default output/gpu_check) within 8 minutes;
#                                          further arguments go to gpu_check.py
#
# Environment: PYTHON (default python3), CARRY_PYTHON_VERSION (build; default 3.12),
# GPU_CHECK_LIMIT_S (run; wall-clock limit of the check, default 450) and
# GPU_CHECK_BUDGET_S (run; no new measurement starts after it, default 330).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
constraints="$root/requirements/constraints.txt"
py="${PYTHON:-python3}"
die() { echo "tools/gpu_carry.sh: $*" >&2; exit 1; }

# What the GPU image lacks for eql_d2 and the check (it has torch, torchvision, numpy,
# opencv-python-headless, scipy, matplotlib, pandas, numba, tabulate, portalocker,
# cloudpickle, pyyaml, pillow, tqdm, pytest, psutil). Installed with no dependencies, so
# lvis's opencv-python requirement and detectron2's numpy<2 pin do not apply.
binary=(yacs "omegaconf>=2.1,<2.4" termcolor "pycocotools==2.0.11" "lvis==0.5.3" "ensemble-boxes==1.0.9")
# published as sdists only; pure Python, built into wheels here
sdist=("fvcore==0.1.5.post20221221" "iopath==0.1.10" "antlr4-python3-runtime==4.9.3")
d2="sal-detectron2==0.7.2"
d2_wheel="sal_detectron2-0.7.2-py3-none-any.whl"
max_mib=60

pipq() { "$py" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
build)
  dir="${1:-$root/wheelhouse/gpu}"
  pyver="${CARRY_PYTHON_VERSION:-3.12}"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  rm -f "$dir"/*.whl "$dir/eql_d2-gpu-carry.txt"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "eql_d2: building the GPU carry for CPython $pyver x86_64 in $dir"
  # detectron2: upstream main as a cp310 wheel whose _C is never loaded; used as pure Python
  pipq download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$work" "$d2"
  cp "$work"/sal_detectron2-0.7.2-*.whl "$dir/$d2_wheel"
  pipq wheel -q --no-deps -w "$work/built" "${sdist[@]}"
  for whl in "$work"/built/*.whl; do
    case "$(basename "$whl")" in
      *-none-any.whl) mv "$whl" "$dir/" ;;
      *) die "$(basename "$whl") is not pure Python" ;;
    esac
  done
  plats=()
  for v in 28 27 26 25 24 23 22 21 20 19 18 17; do plats+=(--platform "manylinux_2_${v}_x86_64"); done
  plats+=(--platform manylinux2014_x86_64)
  pipq download -q --no-deps --only-binary=:all: --implementation cp --python-version "$pyver" \
    "${plats[@]}" -c "$constraints" -d "$dir" "${binary[@]}"
  # every wheel installs on the target's tags (a dry run against CPython $pyver)
  pipq install -q --dry-run --no-index --no-deps --only-binary=:all: --implementation cp \
    --python-version "$pyver" "${plats[@]}" --target "$work/dry" "$dir"/*.whl >/dev/null \
    || die "the wheels in $dir do not all install on CPython $pyver"
  total=$(find "$dir" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s}')
  mib=$(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1048576}')
  { echo "python $pyver"; echo "total_bytes $total"; (cd "$dir" && ls -1 ./*.whl | sed 's|^\./|wheel |'); } \
    > "$dir/eql_d2-gpu-carry.txt"
  (cd "$dir" && for f in *.whl; do printf '  %8.1f KiB  %s\n' "$(awk -v b="$(stat -c %s "$f")" 'BEGIN {print b / 1024}')" "$f"; done)
  echo "eql_d2: $(find "$dir" -maxdepth 1 -name '*.whl' | wc -l) wheels, $mib MiB in $dir"
  awk -v b="$total" -v m="$max_mib" 'BEGIN {exit !(b <= m * 1048576)}' \
    || die "the carry is $mib MiB, over the $max_mib MiB it may take"
  ;;
run)
  # an optional DIR, then arguments for gpu_check.py (e.g. --parts losses)
  dir="$root/wheelhouse/gpu"
  if [ $# -gt 0 ] && [[ "$1" != -* ]]; then dir="$1"; shift; fi
  [ -d "$dir" ] && ls "$dir"/*.whl >/dev/null 2>&1 || die "no wheels in $dir: make them with 'bash tools/gpu_carry.sh build'"
  out="${OUT:-$root/output/gpu_check}"
  mkdir -p "$out"
  limit="${GPU_CHECK_LIMIT_S:-450}"
  budget="${GPU_CHECK_BUDGET_S:-330}"
  site="$(mktemp -d)/site"
  t0=$(date +%s)
  if "$py" -m pip --version >/dev/null 2>&1; then
    pipq install -q --root-user-action=ignore --no-index --no-deps --no-compile --find-links "$dir" \
      --target "$site" "$dir"/*.whl
  else
    # no pip: a wheel is a zip of the files an installation puts in site-packages
    "$py" - "$site" "$dir"/*.whl <<'EOF'
import sys, zipfile
for whl in sys.argv[2:]:
    zipfile.ZipFile(whl).extractall(sys.argv[1])
EOF
  fi
  # the repository first: detectron2's wheel also ships a top-level "tools" package
  export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -c "import detectron2, fvcore, iopath, omegaconf, pycocotools, lvis, eql_d2.modeling, torch
print('eql_d2: torch', torch.__version__, '| CUDA', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none', '| detectron2', detectron2.__version__)" \
    | tee "$out/gpu_carry_install.txt"
  echo "installed from $dir into $site in $(( $(date +%s) - t0 )) s" | tee -a "$out/gpu_carry_install.txt"
  cd "$root"
  rc=0
  timeout -k 15 "$limit" "$py" benchmarks/gpu_check.py --out "$out" --budget-s "$budget" "$@" || rc=$?
  [ $rc -eq 124 ] && echo "eql_d2: the check ran past ${limit} s and was stopped; $out holds the rows finished before"
  echo "eql_d2: results in $out (gpu_check.json, gpu_check.md); $(( $(date +%s) - t0 )) s in all"
  exit $rc
  ;;
*)
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  [ -z "$cmd" ] || [ "$cmd" = -h ] || [ "$cmd" = --help ] || exit 2
  ;;
esac
