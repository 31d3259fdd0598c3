#!/usr/bin/env bash
# The CA by hand: starts palisade-ca on loopback with a mesh file and local tokens, has a
# workload get a certificate the way a proxy does (openssl CSR + token, sent by curl), verifies
# it with openssl, shows a refusal and the mesh watch's view, and stops everything.
# (The whole mesh, proxies included, is `cargo run --release -p palisade -- demo`.)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs openssl:openssl curl:curl

echo "== building palisade-ca"
cargo build -q --release -p palisade-ca --locked
bin=target/release/palisade-ca
work=$(mktemp -d)
ca_pid=
cleanup() { [ -n "$ca_pid" ] && kill "$ca_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

cat > "$work/mesh.yaml" <<'YAML'
trustDomain: cluster.local
defaultPolicy: all-authenticated
workloads:
  - {name: web, namespace: shop, serviceAccount: web, ips: [10.77.0.2], labels: {app: web}}
  - {name: api, namespace: shop, serviceAccount: api, ips: [10.77.0.3], labels: {app: api}}
policies:
  - metadata: {name: api-from-web, namespace: shop}
    spec: {targetSelector: {matchLabels: {app: api}}, ports: [8080], allow: [{serviceAccounts: ["shop/web"]}]}
YAML

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api=$(port); admin=$(port)
echo "== palisade-ca serve (embedded: file source, local tokens) on 127.0.0.1:$api"
"$bin" serve --state-dir "$work/state" --mesh-file "$work/mesh.yaml" \
  --listen "127.0.0.1:$api" --admin-listen "127.0.0.1:$admin" >"$work/audit.log" 2>"$work/ca.log" &
ca_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/ready" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$admin/ready" >/dev/null || { cat "$work/ca.log"; exit 1; }

"$bin" bundle --state-dir "$work/state" > "$work/bundle.pem"
ca="https://palisade-ca.palisade-system.svc:$api"
resolve=(--resolve "palisade-ca.palisade-system.svc:$api:127.0.0.1" --cacert "$work/bundle.pem")

echo "== shop/web asks for a certificate: fresh P-256 key, CSR, service-account token"
token=$("$bin" token --state-dir "$work/state" --namespace shop --service-account web)
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/web.key" -subj /O=shop -out "$work/web.csr" 2>/dev/null
python3 -c 'import json,sys; print(json.dumps({"csr": open(sys.argv[1]).read()}))' "$work/web.csr" > "$work/req.json"
curl -sS --fail-with-body "${resolve[@]}" -H "Authorization: Bearer $token" -H 'content-type: application/json' \
  --data @"$work/req.json" "$ca/v1/certificates" > "$work/resp.json"
python3 - "$work" <<'PY'
import json, sys
d = sys.argv[1]
r = json.load(open(f"{d}/resp.json"))
open(f"{d}/leaf.pem", "w").write(r["certificate_chain"][0])
open(f"{d}/chain.pem", "w").write("".join(r["certificate_chain"]))
open(f"{d}/inter.pem", "w").write(r["certificate_chain"][1])
print(f"   identity   {r['spiffe_id']}\n   expires    {r['expires_at']}\n   chain      leaf + intermediate, {len(r['trust_bundle'])} root(s) in the bundle")
PY
echo "== openssl verifies the chain for client and server use"
openssl verify -purpose sslclient -CAfile "$work/bundle.pem" -untrusted "$work/inter.pem" "$work/leaf.pem" | sed 's/^/   /'
openssl verify -purpose sslserver -CAfile "$work/bundle.pem" -untrusted "$work/inter.pem" "$work/leaf.pem" | sed 's/^/   /'
openssl x509 -in "$work/leaf.pem" -noout -ext subjectAltName,extendedKeyUsage 2>/dev/null | sed 's/^/   /'

echo "== shop/web asks for shop/api's identity: refused"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout /dev/null -subj /O=x \
  -addext "subjectAltName=URI:spiffe://cluster.local/ns/shop/sa/api" -out "$work/evil.csr" 2>/dev/null
python3 -c 'import json,sys; print(json.dumps({"csr": open(sys.argv[1]).read()}))' "$work/evil.csr" > "$work/evil.json"
curl -sS "${resolve[@]}" -H "Authorization: Bearer $token" --data @"$work/evil.json" -w '\n   HTTP %{http_code}\n' "$ca/v1/certificates" | sed 's/^{/   {/'

echo "== the mesh watch, seen by shop/web's proxy (mTLS with the new certificate)"
# The watch is a stream; take its first message (the snapshot) and stop after a second.
curl -sS -N --max-time 1 "${resolve[@]}" --cert "$work/chain.pem" --key "$work/web.key" \
  "$ca/v1/mesh/watch?pod_ip=10.77.0.2&destination=10.77.0.3&destination=192.0.2.7" > "$work/watch.ndjson" 2>/dev/null || true
head -1 "$work/watch.ndjson" | python3 -c 'import json,sys; m=json.loads(sys.stdin.readline()); print("   own policy:", m["inbound"]["workload"], "default", m["inbound"]["default_policy"]); [print("   destination", d["address"], "meshed as "+d["spiffe_id"] if d["meshed"] else "not meshed (plain TCP)") for d in m["destinations"]]'

echo "== audit trail (stdout of palisade-ca)"
sed 's/^/   /' "$work/audit.log"
kill -TERM "$ca_pid"; wait "$ca_pid" 2>/dev/null || true; ca_pid=
echo "== palisade-ca stopped on SIGTERM; nothing left running"
