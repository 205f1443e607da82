# Shared by the resumable benchmark drivers (sourced, not run):
#
#   select_runs     keep the entries of the array RUNS ("name|...") whose name the
#                   space-separated ONLY lists; all of them when ONLY is empty
#   train_once NAME WHAT DIR LOG COMMAND...
#                   skip a run whose DIR/final_metrics.json exists; otherwise print
#                   "== NAME: training (WHAT)", run COMMAND (a train_net.py command with
#                   --resume, so a run cut off continues from its last checkpoint) with its
#                   output appended to LOG, and print its seconds; a failure ends the driver
#                   naming LOG

select_runs() {
  [[ -n ${ONLY:-} ]] || return 0
  local kept=() run
  for run in "${RUNS[@]}"; do
    [[ " $ONLY " == *" ${run%%|*} "* ]] && kept+=("$run")
  done
  RUNS=("${kept[@]}")
}

train_once() {
  local name=$1 what=$2 dir=$3 log=$4 start
  shift 4
  if [[ -f $dir/final_metrics.json ]]; then
    echo "== $name: done before, kept ($dir)"
    return 0
  fi
  mkdir -p "$dir"
  echo "== $name: training ($what)"
  start=$(date +%s)
  "$@" >>"$log" 2>&1 || { echo "$name failed, see $log"; exit 1; }
  echo "   $(( $(date +%s) - start )) s"
}
