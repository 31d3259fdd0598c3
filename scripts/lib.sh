# Shared by scripts/*.sh: install what a command needs, only when it is missing.

# need_debs CMD:PACKAGE... — apt-get install the packages whose command is not on PATH.
need_debs() {
  local missing=()
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing commands for packages: ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root" >&2
    return 1
  fi
  echo "== installing ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_venv — a Python venv at target/venv with scripts/requirements-test.txt installed.
VENV="$PWD/target/venv"
ensure_venv() {
  local req=scripts/requirements-test.txt stamp="$VENV/.requirements"
  [ -s "$req" ] || return 0
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
  fi
  if ! cmp -s "$req" "$stamp"; then
    echo "== pip install -r $req"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
    cp "$req" "$stamp"
  fi
}
