#!/usr/bin/env bash
# System (non-Python) dependencies of the tests: check each one named on the command line; install what is
# missing when running as root on Debian/Ubuntu (apt-get), otherwise stop with one line saying what to install.
# `make test` calls it before the tests, so that no test fails or is skipped for want of a system program.
#
#   scripts/system_deps.sh chromium slurm [...]      exit 0: all present (or just installed); 1: missing
#
# Adding a dependency: a `have_<name>` function (exit 0 when present), its Debian packages in `apt_packages`
# and what it is for in `purpose`.
# Test hooks (tests/test_system_deps.py): SYSDEPS_EUID stands for the effective user id and SYSDEPS_OS_RELEASE
# for /etc/os-release; apt-get is whatever `apt-get` is on PATH.
set -euo pipefail

have_chromium() {  # the names proxygap_helpers.report.chromium_path() looks for, or $PROXYGAP_CHROMIUM
  [[ -n "${PROXYGAP_CHROMIUM:-}" && -x "${PROXYGAP_CHROMIUM}" ]] && return 0
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || command -v google-chrome >/dev/null 2>&1
}

have_slurm() {  # what tests/slurm_cluster.py starts (munged, slurmctld, slurmd) and the clients it and submitit call
  local p
  for p in munged mungekey slurmctld slurmd sbatch squeue scancel scontrol sinfo srun; do
    command -v "$p" >/dev/null 2>&1 || return 1
  done
}

apt_packages() {
  case "$1" in
    chromium) echo chromium ;;
    slurm) echo slurmctld slurmd slurm-client munge ;;
    *) return 1 ;;
  esac
}

purpose() {
  case "$1" in
    chromium)
      echo "headless Chromium (renders the HTML report in tests/test_report.py; or set PROXYGAP_CHROMIUM to its path)"
      ;;
    slurm)
      echo "Slurm and munge (tests/test_slurm.py runs the grid on a one-node cluster it starts as root)"
      ;;
  esac
}

is_debian() {  # Debian, Ubuntu or a derivative, from os-release's ID / ID_LIKE
  local file="${SYSDEPS_OS_RELEASE:-/etc/os-release}" key value
  [[ -r "$file" ]] || return 1
  while IFS='=' read -r key value; do
    value="${value//\"/}"
    if [[ ( "$key" == ID || "$key" == ID_LIKE ) && " $value " =~ \ (debian|ubuntu)\  ]]; then
      return 0
    fi
  done <"$file"
  return 1
}

say() { echo "system_deps: $*" >&2; }

[[ $# -ge 1 ]] || { say "usage: $0 DEPENDENCY ..."; exit 2; }
missing=()
for dep in "$@"; do
  declare -F "have_$dep" >/dev/null || { say "unknown dependency '$dep'"; exit 2; }
  "have_$dep" || missing+=("$dep")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

packages=() what=()
for dep in "${missing[@]}"; do
  read -r -a pk <<<"$(apt_packages "$dep")"
  packages+=("${pk[@]}")
  what+=("$(purpose "$dep")")
done
hint="missing: $(IFS=';'; echo "${what[*]}"). Install it and rerun: sudo apt-get install -y ${packages[*]}"
hint+=" (Debian/Ubuntu), or your system's package of the same name."

if [[ "${SYSDEPS_EUID:-$EUID}" != 0 ]] || ! is_debian || ! command -v apt-get >/dev/null 2>&1; then
  say "$hint"
  exit 1
fi
say "installing ${packages[*]} with apt-get (root on Debian/Ubuntu) ..."
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"; } >/dev/null; then
  say "apt-get could not install ${packages[*]}; $hint"
  exit 1
fi
for dep in "${missing[@]}"; do
  "have_$dep" || { say "apt-get installed ${packages[*]} but $dep is still not found; $hint"; exit 1; }
done
