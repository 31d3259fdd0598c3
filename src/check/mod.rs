//! `palisade check`: is the mesh in this cluster healthy? Each check is one line, green or red,
//! and a red line carries the fix. The checks are pure functions over a [`ClusterSnapshot`];
//! [`fetch`] fills the snapshot through the Kubernetes API (read-only: get and list, and the
//! pod proxy for the CA's admin port).

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::process::ExitCode;

use palisade_ca_api::contract::DEFAULT_CA_NAMESPACE;
use serde::Serialize;

mod control_plane;
mod fetch;
mod injector;
mod policy;
mod snapshot;
#[cfg(test)]
mod test_support;
mod workloads;

pub use fetch::{FetchError, fetch};
pub use snapshot::{CaAdmin, ClusterSnapshot, Fetched, ListError, ListedPolicy, Undecoded};

#[derive(clap::Args)]
pub struct CheckArgs {
    /// How to print the results: `text` (one line per check) or `json` (an array of
    /// `{"check", "ok", "message", "fix"}`).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text, env = "PALISADE_CHECK_OUTPUT")]
    pub output: Output,
    /// The namespace Palisade's control plane is installed in.
    #[arg(long, short = 'n', default_value = DEFAULT_CA_NAMESPACE, env = "PALISADE_NAMESPACE")]
    pub namespace: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// The outcome of one check. In JSON every key is always present; `fix` is null on green lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// A stable name of the check, such as `ca-pods` or `unmeshed-pod`.
    pub check: &'static str,
    pub ok: bool,
    pub message: String,
    pub fix: Option<String>,
}

impl CheckResult {
    pub fn pass(check: &'static str, message: impl Into<String>) -> Self {
        CheckResult {
            check,
            ok: true,
            message: message.into(),
            fix: None,
        }
    }

    pub fn fail(check: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        CheckResult {
            check,
            ok: false,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Every check, in the order they are printed.
pub fn run_checks(snapshot: &ClusterSnapshot) -> Vec<CheckResult> {
    let mut results = control_plane::check(snapshot);
    results.extend(injector::check(snapshot));
    results.extend(injector::check_crd(snapshot));
    results.extend(workloads::check(snapshot));
    results.extend(policy::check(snapshot));
    results.extend(snapshot.undecoded.iter().map(|u| {
        CheckResult::fail(
            "malformed-object",
            format!("{} {} could not be read, and was left out of every check: {}", u.kind, u.name, u.error),
            format!("kubectl get {} {} -o yaml shows it; an object the API server serves should decode, so this palisade may be older than the cluster: use the release that matches it", u.kind, u.name),
        )
    }));
    results
}

/// The exit code of a run: 0 when every check passed, 1 otherwise.
pub fn exit_code(results: &[CheckResult]) -> ExitCode {
    if results.iter().all(|r| r.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The results as text: `✔ check: message` or `✘ check: message` followed by `  fix: …`.
pub fn render_text(results: &[CheckResult], colour: bool) -> String {
    let (green, red, reset) = if colour {
        ("\x1b[32m", "\x1b[31m", "\x1b[0m")
    } else {
        ("", "", "")
    };
    let mut out = String::new();
    for r in results {
        if r.ok {
            let _ = writeln!(out, "{green}✔{reset} {}: {}", r.check, r.message);
        } else {
            let _ = writeln!(out, "{red}✘{reset} {}: {}", r.check, r.message);
            if let Some(fix) = &r.fix {
                for (i, line) in fix.lines().enumerate() {
                    let lead = if i == 0 { "fix:" } else { "    " };
                    let _ = writeln!(out, "    {lead} {line}");
                }
            }
        }
    }
    let failed = results.iter().filter(|r| !r.ok).count();
    let _ = writeln!(out, "{} checks, {} failed", results.len(), failed);
    out
}

pub fn render_json(results: &[CheckResult]) -> String {
    serde_json::to_string_pretty(results).expect("check results serialize") + "\n"
}

/// Runs the command against `client`: the results go to `out`, a failure to check at all to
/// `err`; returns the exit code (0 all green, 1 any red, 2 not checked).
pub async fn check_cluster(
    client: kube::Client,
    args: &CheckArgs,
    colour: bool,
    out: &mut impl std::io::Write,
    err: &mut impl std::io::Write,
) -> ExitCode {
    let snapshot = match fetch(&client, &args.namespace, time::OffsetDateTime::now_utc()).await {
        Ok(snapshot) => snapshot,
        Err(e) => {
            let _ = writeln!(err, "palisade check: {e}");
            return ExitCode::from(2);
        }
    };
    let results = run_checks(&snapshot);
    let text = match args.output {
        Output::Text => render_text(&results, colour),
        Output::Json => render_json(&results),
    };
    // A closed stdout (a pipe into `head`) is not a failed check.
    let _ = out.write_all(text.as_bytes());
    exit_code(&results)
}

/// `palisade check` from `main`: the cluster of the current kubeconfig context.
pub fn run(args: &CheckArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("palisade check: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let colour = args.output == Output::Text && std::io::stdout().is_terminal();
    runtime.block_on(async {
        let client = match crate::kube_list::client().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "palisade check: no usable Kubernetes configuration: {e}\n  fix: point KUBECONFIG (or ~/.kube/config) at the cluster, or run inside a pod with a service account; check with `kubectl config current-context`"
                );
                return ExitCode::from(2);
            }
        };
        check_cluster(client, args, colour, &mut std::io::stdout(), &mut std::io::stderr()).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_output_puts_the_fix_under_a_red_line() {
        let results = vec![
            CheckResult::pass("crd", "meshpolicies.palisade.dev serves v1alpha1"),
            CheckResult::fail("ca-pods", "no CA pod", "helm upgrade --install\nthen wait"),
        ];
        let text = render_text(&results, false);
        assert_eq!(
            text,
            "✔ crd: meshpolicies.palisade.dev serves v1alpha1\n✘ ca-pods: no CA pod\n    fix: helm upgrade --install\n         then wait\n2 checks, 1 failed\n"
        );
        assert_eq!(exit_code(&results), ExitCode::from(1));
        assert_eq!(exit_code(&results[..1]), ExitCode::SUCCESS);
    }

    #[test]
    fn json_output_has_every_key_on_every_line() {
        let results = vec![
            CheckResult::pass("crd", "fine"),
            CheckResult::fail("ca-pods", "no CA pod", "install it"),
        ];
        let value: serde_json::Value = serde_json::from_str(&render_json(&results)).unwrap();
        assert_eq!(
            value,
            serde_json::json!([
                {"check": "crd", "ok": true, "message": "fine", "fix": null},
                {"check": "ca-pods", "ok": false, "message": "no CA pod", "fix": "install it"}
            ])
        );
    }
}
