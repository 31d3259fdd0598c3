#!/usr/bin/env bash
# Runs every test of Palisade on a fresh machine: installs what the tests need (guarded, so a
# second run installs nothing), builds the workspace, runs the Rust tests, then the Python checks
# (rendered chart, mutated pods against the Kubernetes schema) in a venv under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need_debs openssl:openssl curl:curl ip:iproute2 iptables:iptables tcpdump:tcpdump sysctl:procps
ensure_venv

echo "== cargo build (binaries the whole-system and Python tests start)"
cargo build --workspace --bins --locked
echo "== cargo test"
cargo test --workspace --all-targets --locked
echo "== python checks"
if ls tests/py/test_*.py >/dev/null 2>&1; then
  PALISADE_BIN_DIR="$PWD/target/debug" "$VENV/bin/python" -m pytest -q tests/py
fi
echo "== fuzz (45 s per target over the corpus in fuzz/corpus; scripts/fuzz.sh)"
bash scripts/fuzz.sh
