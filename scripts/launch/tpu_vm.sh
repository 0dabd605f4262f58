#!/usr/bin/env bash
# llm-jax on a Cloud TPU VM slice: create it (or reuse it), put this repository on every worker,
# install, and run the same command on all of them; each worker's output is kept in its own log.
#
#   scripts/launch/tpu_vm.sh --name NAME --zone ZONE [--type v5litepod-16] [--version tpu-ubuntu2204-base]
#       [--project P] [--spot] [--repo GIT_URL [--ref REF]] [--logs DIR] [--dry-run]
#       -- llm-jax train --config configs/gpt2_124m.py --workdir /mnt/shared/runs/gpt2 [overrides...]
#
# The code: by default the files git tracks in this checkout (uncommitted edits included) are
# copied to every worker; --repo clones (or updates) GIT_URL at REF there instead. The workers
# join through jax's detection of the slice (LLM_JAX_CLUSTER=1, llm_jax/distributed.py). The workdir must be a path
# every worker sees (a Filestore or gcsfuse mount). Logs: each worker tees its output into
# ~/llm-jax/logs/RUN/<its hostname>.log, copied back into DIR (default logs/tpu_<time>/) at the end.
# --dry-run prints every gcloud command (and the shell each worker runs) without running any.
set -euo pipefail

usage() { sed -n '5,7p' "$0" | sed 's/^# //' >&2; exit 2; }
name="" zone="" type="v5litepod-16" version="tpu-ubuntu2204-base" project="" spot=0 repo="" ref="main" dry=0
run="tpu_$(date +%Y%m%d_%H%M%S)"
logs="logs/$run"
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --repo) repo=$2; shift 2 ;;
    --ref) ref=$2; shift 2 ;;
    --logs) logs=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) usage ;;
  esac
done
[ "${1:-}" = "--" ] && [ $# -ge 2 ] && [ -n "$name" ] && [ -n "$zone" ] || usage
shift

tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[ -n "$project" ] && where+=(--project "$project")

q() {  # one word for a shell, readable: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
say() { local sep=""; for word in "$@"; do printf '%s%s' "$sep" "$(q "$word")"; sep=" "; done; echo; }
command=$(say "$@")
do_() {  # run a command, or only print it with --dry-run
  if [ "$dry" = 1 ]; then say "$@"; else "$@"; fi
}
on_all() {  # one shell command on every worker of the slice
  do_ "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$1"
}

# 1. The slice: reused when it exists.
if [ "$dry" = 1 ]; then
  echo "# reuse the slice when this succeeds, else create it:"
  say "${tpu[@]}" describe "$name" "${where[@]}"
  create=1
elif "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  echo "tpu_vm.sh: reusing $name" >&2
  create=0
else
  create=1
fi
if [ "$create" = 1 ]; then
  extra=()
  [ "$spot" = 1 ] && extra+=(--spot)
  do_ "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$type" --version "$version" "${extra[@]}"
fi

# 2. The code on every worker.
if [ -n "$repo" ]; then
  q_repo=$(q "$repo") q_ref=$(q "$ref")
  on_all "if [ -d llm-jax/.git ]; then git -C llm-jax fetch -q origin; else git clone -q $q_repo llm-jax; fi && git -C llm-jax checkout -q $q_ref && git -C llm-jax pull -q --ff-only || true"
else
  archive=/tmp/llm-jax-$run.tgz
  repo_root=$(cd "$(dirname "$0")/../.." && pwd)
  if [ "$dry" = 1 ]; then
    echo "# the files git tracks in $repo_root:"
    echo "git -C $(q "$repo_root") ls-files -z | tar -C $(q "$repo_root") --null -T - -czf $archive"
  else
    git -C "$repo_root" ls-files -z | tar -C "$repo_root" --null -T - -czf "$archive"
  fi
  do_ "${tpu[@]}" scp "$archive" "$name:llm-jax.tgz" "${where[@]}" --worker=all
  on_all "mkdir -p llm-jax && tar -xzf llm-jax.tgz -C llm-jax && rm llm-jax.tgz"
  [ "$dry" = 1 ] || rm -f "$archive"
fi

# 3. Install (once per worker; again whenever the code changed, which pip makes quick).
on_all "cd llm-jax && { [ -x .venv/bin/python ] || python3 -m venv .venv; } && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . \"jax[tpu]\""

# 4. The command on every worker, each teeing into its own log; then the logs come back.
set +e
on_all "cd llm-jax && . .venv/bin/activate && export LLM_JAX_CLUSTER=1 && mkdir -p logs/$run && { $command; } 2>&1 | tee logs/$run/\$(hostname).log; exit \${PIPESTATUS[0]}"
code=$?
set -e
[ "$dry" = 1 ] || mkdir -p "$logs"
do_ "${tpu[@]}" scp "$name:llm-jax/logs/$run/*" "$logs/" "${where[@]}" --worker=all
[ "$dry" = 1 ] || echo "tpu_vm.sh: logs of every worker in $logs" >&2
exit "$code"
