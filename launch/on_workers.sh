# Sourced by tpu_pod.sh and tpu_sample.sh: `run_on_workers REFUSAL` runs the plan command "${plan[@]}" here first
# when TOPOLOGY is set (nothing is launched if it fails: "error: REFUSAL"), then "$remote" on every worker of
# TPU_NAME in ZONE (and PROJECT) with gcloud. DRY_RUN=1 prints both commands instead of running them.

print_command() {
  printf '%q ' "$@"
  echo
}

run_on_workers() {
  if [[ -n ${TOPOLOGY:-} ]]; then
    if [[ ${DRY_RUN:-0} == 1 ]]; then
      print_command "${plan[@]}"
    elif ! "${plan[@]}"; then
      echo "error: $1; nothing launched" >&2
      exit 1
    fi
  fi
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$remote")
  if [[ -n ${PROJECT:-} ]]; then
    cmd+=(--project "$PROJECT")
  fi
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    print_command "${cmd[@]}"
  else
    exec "${cmd[@]}"
  fi
}
