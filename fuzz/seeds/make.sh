#!/usr/bin/env bash
# Writes the hand-made seeds of every fuzz target into corpus/<target>/seed-*: real shapes of
# what each parser reads (a CSR from openssl, a ClientHello from a TLS client, an
# AdmissionReview, a mesh file, a watch line). Run once; the fuzzer grows the corpus from here.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
seed() { mkdir -p "corpus/$1"; cat > "corpus/$1/seed-$2"; }

# csr: an ECDSA P-256 CSR with the caller's SPIFFE ID, DER and PEM, and one with a DNS SAN.
for san in URI:spiffe://cluster.local/ns/shop/sa/web DNS:evil.example; do
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/k" \
    -subj / -addext "subjectAltName=$san" -out "$work/csr.pem" 2>/dev/null
  name=${san%%:*}
  seed csr "$name.pem" < "$work/csr.pem"
  openssl req -in "$work/csr.pem" -outform DER | seed csr "$name.der"
done

# token_precheck: JWS-shaped tokens with our audience, another audience, and no signature.
b64() { printf '%s' "$1" | base64 -w0 | tr '+/' '-_' | tr -d '='; }
hdr=$(b64 '{"alg":"RS256","kid":"k1"}')
printf '%s.%s.%s' "$hdr" "$(b64 '{"aud":["palisade-ca"],"exp":1800000000,"iss":"https://kubernetes.default.svc","sub":"system:serviceaccount:shop:web"}')" c2ln | seed token_precheck ours
printf '%s.%s.%s' "$hdr" "$(b64 '{"aud":"other","exp":1800000000}')" c2ln | seed token_precheck other
printf '%s.%s.' "$(b64 '{"alg":"none"}')" "$(b64 '{"aud":"palisade-ca","exp":1}')" | seed token_precheck none

# admission_review: a Pod CREATE in an opted-in namespace, and one of another kind.
review='{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"705ab4f5-6393-11e8-b7cc-42010a800002","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"namespace":"shop","operation":"CREATE","userInfo":{"username":"system:serviceaccount:kube-system:replicaset-controller"},"object":{"apiVersion":"v1","kind":"Pod","metadata":{"generateName":"web-","namespace":"shop","annotations":{"palisade.dev/inbound-loopback-ports":"9090"}},"spec":{"containers":[{"name":"app","image":"nginx","ports":[{"containerPort":8080}],"readinessProbe":{"httpGet":{"path":"/ready","port":8080}}}]}},"oldObject":null,"dryRun":false}}'
printf '%s' "$review" | seed admission_review pod
printf '%s' "${review//\"Pod\"/\"Deployment\"}" | seed admission_review other-kind

# mesh_file: workloads of both families, a Service with a named targetPort, one without a
# selector, and policies in both modes.
seed mesh_file full <<'YAML'
trustDomain: cluster.local
defaultPolicy: all-authenticated
workloads:
  - {name: web-0, namespace: shop, serviceAccount: web, ips: [10.77.0.2], labels: {app: web}}
  - {name: api-0, namespace: shop, serviceAccount: api, ips: [10.77.0.3, "fd00:77::3"], labels: {app: api}, ports: {http: 8080}}
services:
  - {name: api, namespace: shop, clusterIPs: [10.96.0.10], selector: {app: api}, ports: [{name: http, port: 80, targetPort: http}]}
  - {name: db, namespace: shop, clusterIPs: [10.96.0.11], ports: [{port: 5432}], endpoints: [{ip: 10.77.0.9}]}
policies:
  - metadata: {name: api-from-web, namespace: shop}
    spec: {targetSelector: {matchLabels: {app: api}}, ports: [8080], allow: [{serviceAccounts: [shop/web]}, {namespaces: [monitoring]}]}
  - metadata: {name: audit, namespace: shop}
    spec: {mode: audit, targetSelector: {matchLabels: {app: api}}, allow: [{authenticated: true}]}
YAML

# inbound_policy: [port u16][caller length u8][caller][policy JSON]
policy='{"trust_domain":"cluster.local","workload":"shop/api","namespace":"shop","default_policy":"all-authenticated","policies":[{"name":"shop/api-from-web","ports":[8080],"mode":"enforce","allow":[{"serviceAccounts":["shop/web"]},{"namespaces":["monitoring"]}]},{"name":"shop/audit","ports":[],"mode":"audit","allow":[{"unauthenticated":true}]}]}'
for caller in spiffe://cluster.local/ns/shop/sa/web spiffe://other.org/ns/shop/sa/web ""; do
  { printf '\x1f\x90'; printf "\\x$(printf %02x ${#caller})"; printf '%s%s' "$caller" "$policy"; } \
    | seed inbound_policy "caller-${#caller}"
done

# first_bytes: real ClientHellos (Python's ssl) offering palisade/1 and h2, and plaintext HTTP.
for alpn in palisade/1 h2; do
  /usr/bin/python3 - "$alpn" <<'PY' | seed first_bytes "hello-${alpn%%/*}"
import ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
ctx.set_alpn_protocols([sys.argv[1]])
out = ssl.MemoryBIO()
tls = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname="api.shop")
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
sys.stdout.buffer.write(out.read())
PY
done
printf 'GET / HTTP/1.1\r\nhost: api\r\n\r\n' | seed first_bytes http
printf 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' | seed first_bytes h2c

# watch_lines: a split point byte, then a snapshot and a Service answer (docs/ca-api.md).
{ printf '\x40'; printf '%s\n\n' '{"type":"snapshot","version":3,"inbound":'"$policy"',"destinations":[{"address":"10.77.0.2","meshed":true,"spiffe_id":"spiffe://cluster.local/ns/shop/sa/web","workload":"shop/web"},{"address":"192.0.2.9","meshed":false}]}'
  printf '%s\n' '{"type":"update","version":4,"destinations":[{"address":"10.96.0.10","meshed":false,"service":{"name":"shop/api","ports":[80],"total_endpoints":1,"endpoints":[{"address":"fd00:77::3","ports":[{"port":80,"target_port":8080}],"meshed":true,"spiffe_id":"spiffe://cluster.local/ns/shop/sa/api"}]}}]}'
} | seed watch_lines messages
