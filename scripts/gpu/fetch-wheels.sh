#!/usr/bin/env bash
# Downloads the pinned wheels of LIST (one wheel file name per line) for the GPU hosts (CPython
# 3.12, manylinux x86-64) into DIR, skipping those already there. No dependencies are resolved:
# the lists name every wheel a host lacks.
# Usage: scripts/gpu/fetch-wheels.sh DIR LIST
set -euo pipefail
dir=${1:?usage: fetch-wheels.sh DIR LIST}
list=${2:?usage: fetch-wheels.sh DIR LIST}
# shellcheck source=platforms.sh
source "$(dirname "$0")/platforms.sh"
mkdir -p "$dir"
# A wheel's name is NAME-VERSION-TAGS.whl: download each pinned NAME==VERSION that is missing.
specs=()
while read -r whl; do
  [ -n "$whl" ] || continue
  [ -f "$dir/$whl" ] && continue
  IFS=- read -r name version _ <<<"$whl"
  specs+=("$name==$version")
done <"$list"
if [ ${#specs[@]} -gt 0 ]; then
  "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$dir" "${specs[@]}" 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
