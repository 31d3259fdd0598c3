//! `palisade policy check`, `palisade policy explain` and `palisade inspect`, as a user runs
//! them; `explain` as an operator runs it after a denial: what decided, and a fix that, applied
//! to the mesh file, really admits the caller.

use std::path::Path;
use std::process::Command;

use palisade_testkit::mesh_file::MeshFile;
use palisade_testkit::pki::self_signed_leaf;

const BIN: &str = env!("CARGO_BIN_EXE_palisade");

/// Runs `palisade args…`: the exit code, and stdout then stderr.
fn palisade(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn check(args: &[&str]) -> (i32, String) {
    palisade(&[&["policy", "check"], args].concat())
}

#[test]
fn policy_check_with_a_mesh_file() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, MeshFile::web_and_api().to_yaml()).unwrap();
    let m = mesh.to_str().unwrap();
    let (code, out) = check(&[
        "--mesh-file",
        m,
        "--from",
        "shop/web",
        "--to",
        "shop/api",
        "--port",
        "8080",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("ALLOW") && out.contains("shop/api-from-web (rule_matched)"),
        "{out}"
    );
    let (code, out) = check(&[
        "--mesh-file",
        m,
        "--from",
        "spiffe://cluster.local/ns/shop/sa/evil",
        "--to",
        "shop/api",
        "--port",
        "8080",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("DENY") && out.contains("no_rule_matched"),
        "{out}"
    );
    let (code, out) = check(&[
        "--mesh-file",
        m,
        "--from",
        "plaintext",
        "--to",
        "shop/web",
        "--port",
        "80",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("default:all-authenticated (plaintext_not_allowed)"),
        "{out}"
    );
    let (code, out) = check(&[
        "--mesh-file",
        m,
        "--from",
        "shop/web",
        "--to",
        "shop/nope",
        "--port",
        "80",
    ]);
    assert_eq!(code, 2);
    assert!(out.contains("no workload shop/nope"), "{out}");
}

#[test]
fn policy_check_with_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("policies.yaml");
    std::fs::write(
        &p,
        "apiVersion: palisade.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: trial, namespace: shop}\nspec: {mode: audit, allow: [{namespaces: [monitoring]}]}\n",
    )
    .unwrap();
    let p = p.to_str().unwrap();
    let (code, out) = check(&[
        "--policies",
        p,
        "--from",
        "shop/web",
        "--to",
        "shop",
        "--labels",
        "app=api",
        "--port",
        "9090",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("audit: would be denied") && out.contains("shop/trial"),
        "{out}"
    );
    let (code, out) = check(&[
        "--policies",
        p,
        "--from",
        "shop/web",
        "--to",
        "shop",
        "--port",
        "9090",
        "--default-policy",
        "open",
    ]);
    assert_eq!(code, 2);
    assert!(out.contains("deny, all-authenticated or all"), "{out}");
}

#[test]
fn inspect_explains_a_leaf_and_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = self_signed_leaf("spiffe://cluster.local/ns/shop/sa/web").cert_pem;
    let path = dir.path().join("leaf.pem");
    std::fs::write(&path, &leaf).unwrap();
    let out = Command::new(BIN)
        .arg("inspect")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("identity    spiffe://cluster.local/ns/shop/sa/web"),
        "{text}"
    );
    assert!(text.contains("a Palisade mesh leaf"), "{text}");
    std::fs::write(&path, "garbage").unwrap();
    let out = Command::new(BIN)
        .arg("inspect")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no usable certificate"));
}

const MESH: &str = r#"trustDomain: cluster.local
defaultPolicy: all-authenticated
workloads:
  - {name: web, namespace: shop, serviceAccount: web, ips: ["10.77.0.2"], labels: {app: web}}
  - {name: api, namespace: shop, serviceAccount: api, ips: ["10.77.0.3", "fd00:77::3"], labels: {app: api}}
  - {name: intruder, namespace: shop, serviceAccount: intruder, ips: ["10.77.0.4"], labels: {app: intruder}}
services:
  - {name: api, namespace: shop, clusterIPs: [10.96.0.10], selector: {app: api}, ports: [{port: 80, targetPort: 8080}]}
policies:
  - metadata: {name: api-from-web, namespace: shop}
    spec: {targetSelector: {matchLabels: {app: api}}, ports: [8080], allow: [{serviceAccounts: ["shop/web"]}]}
"#;

fn explain(mesh: &Path, args: &[&str]) -> (i32, String) {
    let mesh = mesh.to_str().unwrap();
    palisade(&[&["policy", "explain", "--mesh-file", mesh], args].concat())
}

/// The text after `marker` on the line that holds it.
fn after<'a>(out: &'a str, marker: &str) -> &'a str {
    let line = out
        .lines()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} in:\n{out}"));
    &line[line.find(marker).unwrap() + marker.len()..]
}

#[test]
fn a_denial_is_explained_and_the_suggested_rule_admits_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, MESH).unwrap();

    let (code, out) = explain(&mesh, &["--from", "shop/web", "--to", "shop/api:8080"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ALLOW"), "{out}");
    assert!(
        out.contains(r#"decided by shop/api-from-web (enforce), allow rule #1: {"serviceAccounts":["shop/web"]}"#),
        "{out}"
    );

    // The caller by pod IP, the target by its IPv6 address: the same decision as by name.
    let (code, out) = explain(&mesh, &["--from", "10.77.0.4", "--to", "[fd00:77::3]:8080"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("DENY: spiffe://cluster.local/ns/shop/sa/intruder -> shop/api:8080"),
        "{out}"
    );
    assert!(out.contains("reason: no_rule_matched"), "{out}");
    let fix = after(&out, "to admit it, add to shop/api-from-web's allow: ").to_owned();
    assert_eq!(fix, r#"{"serviceAccounts":["shop/intruder"]}"#);

    // The same denial pasted as the proxy logged it.
    let event = r#"{"level":"WARN","message":"connection denied","target":"palisade::policy","result":"deny","caller":"spiffe://cluster.local/ns/shop/sa/intruder","caller_address":"10.77.0.4:40000","target_workload":"shop/api","port":8080,"policy":"shop/api-from-web","reason":"no_rule_matched","suppressed_since_last":0}"#;
    let by_name = explain(&mesh, &["--from", "shop/intruder", "--to", "shop/api:8080"]);
    assert_eq!(explain(&mesh, &["--event", event]), by_name);
    assert_eq!(
        out.replace(
            "  caller: 10.77.0.4 is shop/intruder, service account intruder\n",
            ""
        ),
        by_name.1
    );

    // Applied, the suggestion admits the caller, by the rule it suggested.
    let fixed = MESH.replace(
        r#"allow: [{serviceAccounts: ["shop/web"]}]"#,
        &format!(r#"allow: [{{serviceAccounts: ["shop/web"]}}, {fix}]"#),
    );
    std::fs::write(&mesh, &fixed).unwrap();
    let (code, out) = explain(&mesh, &["--from", "shop/intruder", "--to", "shop/api:8080"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("allow rule #2"), "{out}");
    // The event now disagrees with the file, and says so.
    let (_, out) = explain(&mesh, &["--event", event]);
    assert!(
        out.contains(
            "the proxy logged reason no_rule_matched; under this mesh file it is rule_matched"
        ),
        "{out}"
    );
}

#[test]
fn a_default_denial_gets_a_policy_that_admits_the_caller_and_warns_what_it_costs() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, MESH).unwrap();
    // An unmeshed address calling a port no policy covers: the default (all-authenticated).
    let (code, out) = explain(&mesh, &["--from", "10.77.0.9", "--to", "shop/api:9090"]);
    assert_eq!(code, 1, "{out}");
    for part in [
        "10.77.0.9 is no meshed workload: its connections arrive in plaintext",
        "reason: plaintext_not_allowed",
        "the default decides, all-authenticated (from the mesh-wide default: a mesh file's defaultPolicy, or the CA's --default-policy)",
        "admits every caller; mesh the caller instead",
        "every caller it does not allow",
    ] {
        assert!(out.contains(part), "{part} in:\n{out}");
    }
    let metadata = after(&out, "    metadata: ");
    let spec = after(&out, "    spec: ");
    let fixed = format!("{MESH}  - metadata: {metadata}\n    spec: {spec}\n");
    std::fs::write(&mesh, fixed).unwrap();
    let (code, out) = explain(&mesh, &["--from", "plaintext", "--to", "shop/api:9090"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("decided by shop/api-9090 (enforce), allow rule #1"),
        "{out}"
    );
}

#[test]
fn what_no_rule_can_admit_and_what_is_not_a_workload_are_said_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, MESH).unwrap();
    let (code, out) = explain(
        &mesh,
        &[
            "--from",
            "spiffe://other.org/ns/shop/sa/web",
            "--to",
            "shop/api:8080",
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("reason: foreign_trust_domain"), "{out}");
    assert!(
        out.contains("needs a certificate of cluster.local"),
        "{out}"
    );
    for (to, says) in [
        ("10.96.0.10:80", "the address of Service shop/api"),
        ("10.77.0.99:80", "no meshed workload has 10.77.0.99"),
        ("shop/nope:80", "no workload shop/nope"),
        ("shop/api", "give ns/pod:PORT"),
    ] {
        let (code, out) = explain(&mesh, &["--from", "shop/web", "--to", to]);
        assert_eq!(code, 2, "{to}: {out}");
        assert!(out.contains(says), "{to}: {out}");
    }
    let (code, out) = explain(&mesh, &["--event", r#"{"message":"hello"}"#]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no \"caller\""), "{out}");
}

/// The SPIFFE ID of service account `sa` of namespace shop.
fn id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/{sa}")
}

/// One series of a proxy's `palisade_inbound_connections_total`, as `/metrics` writes it.
fn series(client: &str, port: &str, decision: &str, n: u32) -> String {
    format!(
        "palisade_inbound_connections_total{{client_id=\"{client}\",port=\"{port}\",decision=\"{decision}\"}} {n}\n"
    )
}

/// `palisade policy suggest` from a proxy's /metrics: the suggested manifests admit exactly the
/// callers that were seen and allowed, under the same evaluation `policy check` (and the
/// proxy) runs.
#[test]
fn suggested_policies_admit_what_was_seen_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        MeshFile::new("all-authenticated")
            .workload("web", "shop", "web", "10.77.0.2")
            .workload("api", "shop", "api", "10.77.0.3")
            .workload("intruder", "shop", "intruder", "10.77.0.4")
            .workload("monitor", "shop", "monitor", "10.77.0.5")
            .to_yaml(),
    )
    .unwrap();
    let metrics = dir.path().join("api.metrics");
    std::fs::write(
        &metrics,
        [
            "# TYPE palisade_inbound_connections_total counter\n".to_owned(),
            series(&id("web"), "8080", "allow", 5),
            series(&id("monitor"), "9090", "allow", 2),
            series(&id("intruder"), "8080", "deny", 1),
            series(&id("web"), "7070", "allow", 0),
            series("other", "other", "allow", 3),
        ]
        .concat(),
    )
    .unwrap();
    let m = mesh.to_str().unwrap();
    let given = format!("shop/api={}", metrics.display());
    let (code, audit) = palisade(&["policy", "suggest", "--mesh-file", m, "--metrics", &given]);
    assert_eq!(code, 0, "{audit}");
    assert!(audit.contains("\"mode\": \"audit\""), "{audit}");
    let (code, out) = palisade(&[
        "policy",
        "suggest",
        "--mesh-file",
        m,
        "--metrics",
        &given,
        "--mode",
        "enforce",
    ]);
    assert_eq!(code, 0, "{out}");
    for part in [
        "\"name\": \"api-8080-observed\"",
        "\"name\": \"api-9090-observed\"",
        "seen and denied, not allowed here: spiffe://cluster.local/ns/shop/sa/intruder → port 8080",
        "past its label bounds",
        "default policy of the namespace: all-authenticated",
    ] {
        assert!(out.contains(part), "{part} missing:\n{out}");
    }
    assert!(
        !out.contains("7070"),
        "a series counted 0 times became a rule:\n{out}"
    );
    let suggested = dir.path().join("suggested.yaml");
    std::fs::write(&suggested, &out).unwrap();
    let s = suggested.to_str().unwrap();
    for (from, port, allowed) in [
        ("shop/web", "8080", true),
        ("shop/monitor", "9090", true),
        ("shop/intruder", "8080", false),
        ("shop/monitor", "8080", false),
        ("shop/web", "9090", false),
        ("plaintext", "8080", false),
    ] {
        let (code, verdict) = check(&[
            "--policies",
            s,
            "--from",
            from,
            "--to",
            "shop",
            "--labels",
            "app=api",
            "--port",
            port,
        ]);
        assert_eq!(code == 0, allowed, "{from} → {port}: {verdict}");
    }
    let (code, out) = palisade(&[
        "policy",
        "suggest",
        "--mesh-file",
        m,
        "--metrics",
        &format!("shop/nobody={}", metrics.display()),
    ]);
    assert_eq!(code, 2);
    assert!(
        out.contains("no workload shop/nobody in the mesh file"),
        "{out}"
    );
}

/// What `suggest` must not do: allow an identity that was also denied, admit everyone through
/// `unauthenticated: true` where identities were denied, or select workloads beyond the one
/// that reported.
#[test]
fn suggest_refuses_what_would_reach_further_than_what_was_seen() {
    use palisade_testkit::mesh_file::Workload;
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        MeshFile::new("all-authenticated")
            .workload("api", "shop", "api", "10.77.0.3")
            .add_workload(
                Workload::new("api-admin", "shop", "api", "10.77.0.6")
                    .label("app", "api")
                    .label("role", "admin"),
            )
            .add_workload(Workload::new("db", "shop", "db", "10.77.0.7").label("app", "db"))
            .to_yaml(),
    )
    .unwrap();
    let api = dir.path().join("api.metrics");
    std::fs::write(&api, series(&id("web"), "8080", "allow", 1)).unwrap();
    let db = dir.path().join("db.metrics");
    std::fs::write(
        &db,
        [
            series(&id("web"), "5432", "allow", 1),
            series(&id("web"), "5432", "deny", 1),
            series(&id("api"), "5432", "allow", 1),
            series("unauthenticated", "5432", "allow", 1),
            series(&id("intruder"), "5432", "deny", 1),
        ]
        .concat(),
    )
    .unwrap();
    let m = mesh.to_str().unwrap();
    let (code, out) = palisade(&[
        "policy",
        "suggest",
        "--mesh-file",
        m,
        "--metrics",
        &format!("shop/api={}", api.display()),
        "--metrics",
        &format!("shop/db={}", db.display()),
        "--mode",
        "enforce",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("shop: api: no policy suggested")
            && out.contains("also select shop/api-admin"),
        "{out}"
    );
    assert!(!out.contains("api-8080-observed"), "{out}");
    assert!(
        out.contains("shop/web was both admitted and denied on port 5432"),
        "{out}"
    );
    assert!(
        out.contains("would also admit the identities denied"),
        "{out}"
    );
    assert!(!out.contains("\"unauthenticated\": true"), "{out}");
    let suggested = dir.path().join("suggested.yaml");
    std::fs::write(&suggested, &out).unwrap();
    let s = suggested.to_str().unwrap();
    for (from, allowed) in [
        ("shop/api", true),
        ("shop/web", false),
        ("shop/intruder", false),
        ("plaintext", false),
    ] {
        let (code, verdict) = check(&[
            "--policies",
            s,
            "--from",
            from,
            "--to",
            "shop",
            "--labels",
            "app=db",
            "--port",
            "5432",
        ]);
        assert_eq!(code == 0, allowed, "{from}: {verdict}");
    }
}

/// `--kube` reads the live cluster; without one it says so and how to go on, and it never
/// mixes with a mesh file.
#[test]
fn live_mode_without_a_cluster_says_what_to_give() {
    for tool in [
        &[
            "policy",
            "explain",
            "--from",
            "shop/web",
            "--to",
            "shop/api-1:8080",
        ][..],
        &["policy", "suggest", "--metrics", "shop/api-1=api.metrics"][..],
    ] {
        let out = Command::new(BIN)
            .args(tool)
            .arg("--kube")
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env("HOME", "/nonexistent")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("cannot reach a cluster") && err.contains("or give --mesh-file"),
            "{err}"
        );
    }
    let (code, out) = palisade(&[
        "policy",
        "explain",
        "--kube",
        "--mesh-file",
        "mesh.yaml",
        "--from",
        "shop/web",
        "--to",
        "shop/api-1:8080",
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cannot be used with"), "{out}");
}

/// `explain` over MeshPolicy manifests before they are applied: the target pod is its name and
/// labels, and the answer is the one a proxy would give once they are.
#[test]
fn explain_reads_manifests_with_the_target_given_by_its_labels() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("policies.yaml");
    std::fs::write(
        &manifests,
        "apiVersion: palisade.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: api-from-web, namespace: shop}\nspec:\n  targetSelector: {matchLabels: {app: api}}\n  ports: [8080]\n  allow: [{serviceAccounts: [shop/web]}]\n---\napiVersion: palisade.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: batch-none, namespace: batch}\nspec:\n  targetSelector: {matchLabels: {app: api}}\n  ports: [8080]\n  allow: [{serviceAccounts: [batch/cron]}]\n",
    )
    .unwrap();
    let m = manifests.to_str().unwrap();
    let explain =
        |extra: &[&str]| palisade(&[&["policy", "explain", "--policies", m], extra].concat());

    let (code, out) = explain(&[
        "--labels",
        "app=api",
        "--from",
        "shop/web",
        "--to",
        "shop/api-0:8080",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("decided by shop/api-from-web (enforce), allow rule #1"),
        "{out}"
    );

    let (code, out) = explain(&[
        "--labels",
        "app=api,tier=back",
        "--from",
        "shop/intruder",
        "--to",
        "shop/api-0:8080",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("reason: no_rule_matched"), "{out}");
    assert!(
        out.contains(r#"to admit it, add to shop/api-from-web's allow: {"serviceAccounts":["shop/intruder"]}"#),
        "{out}"
    );

    // Labels no policy selects: the default decides, and which default it is can be given.
    let (code, out) = explain(&[
        "--labels",
        "app=web",
        "--from",
        "shop/intruder",
        "--to",
        "shop/web-0:8080",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("all-authenticated"), "{out}");
    let (code, out) = explain(&[
        "--labels",
        "app=web",
        "--default-policy",
        "deny",
        "--from",
        "shop/intruder",
        "--to",
        "shop/web-0:8080",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("reason: default_deny"), "{out}");

    // What manifests cannot know is refused, with what to give instead.
    let (code, out) = explain(&[
        "--labels",
        "app=api",
        "--from",
        "10.77.0.4",
        "--to",
        "shop/api-0:8080",
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("manifests know no pod addresses"), "{out}");
    let (code, out) = explain(&["--from", "shop/web", "--to", "10.77.0.3:8080"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("with --policies give the target as ns/pod:PORT"),
        "{out}"
    );
    let (code, out) = palisade(&[
        "policy",
        "suggest",
        "--policies",
        m,
        "--metrics",
        "shop/api-0=x",
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("give --mesh-file or --kube for the workloads"),
        "{out}"
    );
}
