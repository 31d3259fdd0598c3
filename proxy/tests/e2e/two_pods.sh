#!/usr/bin/env bash
# Two pods in network namespaces, each with `palisade-proxy init` + `palisade-proxy run` (uid
# 1337), a CA (`palisade-ca serve`, file source, local tokens) in a third namespace holding the
# bridge. Checks: an unmodified curl -> python3 -m http.server exchange crosses the mesh over mTLS
# (a capture on the link shows no plaintext); a plaintext caller is denied by policy; requests
# keep succeeding across certificate rotations.
# Usage: two_pods.sh PROXY_BIN CA_BIN   (root; uses 10.77.50.0/24 only; removes what it creates)
set -euo pipefail
PROXY=$1; CA=$2
PY=/usr/bin/python3
id=$$; br=palisade-t-br$id; a=palisade-t-a$id; b=palisade-t-b$id
work=$(mktemp -d); chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for n in $a $b $br; do ip netns del "$n" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; for f in "$work"/*.log; do echo "--- $f" >&2; tail -20 "$f" >&2; done; exit 1; }

ip netns add $br; ip netns add $a; ip netns add $b
ip -n $br link add br0 type bridge; ip -n $br addr add 10.77.50.1/24 dev br0; ip -n $br link set br0 up
ip -n $br link set lo up
n=0
for ns in $a $b; do
  n=$((n+1))
  ip link add pa$id-$n type veth peer name pb$id-$n
  ip link set pa$id-$n netns $ns; ip link set pb$id-$n netns $br
  ip -n $ns link set pa$id-$n name eth0
  ip -n $ns addr add 10.77.50.$((n+1))/24 dev eth0
  ip -n $ns link set eth0 up; ip -n $ns link set lo up
  ip -n $br link set pb$id-$n master br0; ip -n $br link set pb$id-$n up
done

cat > "$work/mesh.yaml" <<YAML
trustDomain: cluster.local
defaultPolicy: all-authenticated
workloads:
  - {name: web, namespace: shop, serviceAccount: web, ips: [10.77.50.2], labels: {app: web}}
  - {name: api, namespace: shop, serviceAccount: api, ips: [10.77.50.3], labels: {app: api}}
policies:
  - metadata: {name: api-from-web, namespace: shop}
    spec: {targetSelector: {matchLabels: {app: api}}, ports: [8080], allow: [{serviceAccounts: ["shop/web"]}]}
YAML
mkdir -p "$work/state"
ip netns exec $br "$CA" serve --state-dir "$work/state" --source file --mesh-file "$work/mesh.yaml" \
  --auth local --listen 10.77.50.1:15012 --admin-listen 10.77.50.1:15014 --cert-ttl 2m \
  --allow-short-ttl-for-testing > "$work/ca.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do ip netns exec $br curl -sf http://10.77.50.1:15014/ready >/dev/null 2>&1 && break; sleep 0.1; done
ip netns exec $br curl -sf http://10.77.50.1:15014/ready >/dev/null || fail "CA not ready"
"$CA" bundle --state-dir "$work/state" > "$work/ca.pem"
for who in web api; do
  "$CA" token --state-dir "$work/state" --namespace shop --service-account $who --ttl 1h > "$work/$who.token"
done
chmod 644 "$work"/*.pem "$work"/*.token

start_pod() { # ns sa ip
  local ns=$1 sa=$2 ip=$3
  ip netns exec $ns "$PROXY" init --skip-inbound-ports 15021 > "$work/$sa-init.log" 2>&1 || fail "init $sa"
  ip netns exec $ns setpriv --reuid 1337 --regid 1337 --clear-groups env \
    PALISADE_CA_ADDR=10.77.50.1:15012 PALISADE_CA_NAME=palisade-ca.palisade-system.svc \
    PALISADE_TRUST_ANCHORS="$work/ca.pem" PALISADE_TOKEN_FILE="$work/$sa.token" \
    PALISADE_NAMESPACE=shop PALISADE_SERVICE_ACCOUNT=$sa PALISADE_POD_NAME=$sa-0 PALISADE_POD_IP=$ip \
    PALISADE_LOG=info PALISADE_LOG_FORMAT=json \
    "$PROXY" run > "$work/$sa-proxy.log" 2>&1 &
  pids+=($!)
}
start_pod $a web 10.77.50.2
start_pod $b api 10.77.50.3
ip netns exec $b $PY -m http.server 8080 --bind 0.0.0.0 --directory "$work" > "$work/app.log" 2>&1 &
pids+=($!)
echo "the mesh says hello" > "$work/hello.txt"; chmod 644 "$work/hello.txt"
for ns in $a $b; do
  ip netns exec $ns "$PROXY" wait-ready --timeout 30s || fail "proxy in $ns not ready"
done

# 1. curl -> python http.server across the mesh, with a capture on the link.
cap="$work/link.pcap"
if command -v tcpdump >/dev/null; then
  ip netns exec $b tcpdump -i eth0 -w "$cap" -U tcp port 8080 > "$work/tcpdump.log" 2>&1 &
  tcpdump_pid=$!; pids+=($tcpdump_pid); sleep 1
fi
body=$(ip netns exec $a curl -sf --max-time 5 http://10.77.50.3:8080/hello.txt) || fail "curl through the mesh"
[ "$body" = "the mesh says hello" ] || fail "unexpected body: $body"
echo "ok: curl -> http.server across the mesh"
if [ -n "${tcpdump_pid:-}" ]; then
  sleep 1; kill $tcpdump_pid; wait $tcpdump_pid 2>/dev/null || true
  [ -s "$cap" ] || fail "empty capture"
  if grep -a -q -e "the mesh says hello" -e "GET /hello.txt" "$cap"; then fail "plaintext seen on the link"; fi
  grep -a -q "palisade/1" "$cap" || fail "no mesh ClientHello in the capture"
  echo "ok: the capture on the link shows TLS (ALPN palisade/1) and no plaintext"
else
  echo "note: tcpdump not installed, capture check skipped"
fi

# 2. A caller that policy does not allow: plaintext from the bridge namespace.
if ip netns exec $br curl -sf --max-time 3 http://10.77.50.3:8080/hello.txt >/dev/null 2>&1; then
  fail "a plaintext caller got through"
fi
grep '"result":"deny"' "$work/api-proxy.log" | grep '"caller":"unauthenticated"' | grep -q '"target_workload":"shop/api"' \
  || fail "no structured denial event logged"
echo "ok: plaintext caller denied and logged"

# 3. Continuous traffic across certificate rotations (2m certificates renew every 12-48 s).
serial() { ip netns exec $1 curl -sf http://127.0.0.1:15021/identity | $PY -c 'import json,sys; print(json.load(sys.stdin)["serial"])'; }
s_web=$(serial $a); s_api=$(serial $b)
ok=0; failed=0; deadline=$((SECONDS + 75))
while [ $SECONDS -lt $deadline ]; do
  if ip netns exec $a curl -sf --max-time 3 http://10.77.50.3:8080/hello.txt >/dev/null; then ok=$((ok+1)); else failed=$((failed+1)); fi
  if [ "$(serial $a)" != "$s_web" ] && [ "$(serial $b)" != "$s_api" ] && [ $ok -gt 50 ]; then break; fi
  sleep 0.1
done
[ "$(serial $a)" != "$s_web" ] || fail "web's certificate did not rotate"
[ "$(serial $b)" != "$s_api" ] || fail "api's certificate did not rotate"
[ $failed -eq 0 ] || fail "$failed of $((ok+failed)) requests failed during rotation"
echo "ok: $ok requests, none failed, across a rotation of both certificates"
ip netns exec $b curl -sf http://127.0.0.1:15021/metrics | grep -E '^palisade_(policy_decisions|certificate_rotations)_total' || true
echo PASS
