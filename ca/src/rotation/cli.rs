//! `palisade-ca rotate …` and `palisade-ca bundle`: start a rotation on the running CA through
//! its admin port, follow it, recover from an expired root offline, and print the bundle a
//! state directory stands for.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use palisade_ca_api::cert::cert_to_pem;
use time::OffsetDateTime;

use super::keyset::{self, CURRENT, KeySet, NEXT};
use super::{Kind, Phase, RotationStatus};
use crate::keys::{DirStore, KeyStore, Lifetimes};

/// The longest admin answer read.
const MAX_ANSWER: u64 = 1 << 20;

/// One plain HTTP/1.1 request to the admin port: the status and the body.
pub fn admin_request(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    admin_request_with(addr, method, path, "")
}

fn admin_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let unreachable = |e: std::io::Error| {
        anyhow::anyhow!(
            "cannot reach the CA's admin port at {addr}: {e} (is palisade-ca running? give --admin-addr, or kubectl exec into its pod)"
        )
    };
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(unreachable)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(unreachable)?;
    let mut raw = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut raw)
        .map_err(unreachable)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("{addr} did not answer HTTP: is it the admin port?"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{addr} answered without a status line"))?;
    Ok((status, body.to_owned()))
}

fn parse_status(body: &str) -> anyhow::Result<RotationStatus> {
    serde_json::from_str(body)
        .map_err(|e| anyhow::anyhow!("the CA's /rotation answer is not understood ({e}): is the CA the same version as this command?"))
}

/// `palisade-ca rotate root|intermediate|abort`: `POST /rotation/<what>`; the status after it.
pub fn post(addr: SocketAddr, what: &str) -> anyhow::Result<RotationStatus> {
    post_with(addr, what, "")
}

/// `palisade-ca rotate root --from-cert F --from-key F`: the CA reads the files itself (it
/// runs beside this command), so the key never crosses the admin port.
pub fn post_root_files(
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<RotationStatus> {
    let absolute =
        |p: &Path| std::fs::canonicalize(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
    let body = serde_json::json!({"from_cert": absolute(cert)?, "from_key": absolute(key)?});
    post_with(addr, "root", &body.to_string())
}

/// `palisade-ca rotate intermediate --from-cert F --from-key F --chain F`: an intermediate
/// signed by an operator's offline root, read by the CA as for [`post_root_files`]. Under a
/// root the CA does not use yet, it starts a root rotation.
pub fn post_intermediate_files(
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
    chain: &Path,
) -> anyhow::Result<RotationStatus> {
    let absolute =
        |p: &Path| std::fs::canonicalize(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
    let body = serde_json::json!({
        "from_cert": absolute(cert)?,
        "from_key": absolute(key)?,
        "from_chain": absolute(chain)?,
    });
    post_with(addr, "intermediate", &body.to_string())
}

fn post_with(addr: SocketAddr, what: &str, body: &str) -> anyhow::Result<RotationStatus> {
    let (status, body) = admin_request_with(addr, "POST", &format!("/rotation/{what}"), body)?;
    if status != 202 {
        anyhow::bail!("the CA refused ({status}): {}", body.trim());
    }
    parse_status(&body)
}

pub fn status(addr: SocketAddr) -> anyhow::Result<RotationStatus> {
    let (code, body) = admin_request(addr, "GET", "/rotation")?;
    if code != 200 {
        anyhow::bail!("GET /rotation answered {code}: {}", body.trim());
    }
    parse_status(&body)
}

/// `rotate status --wait`: polls until `idle` or until `wait` has passed; the last status.
pub fn wait_idle(addr: SocketAddr, wait: Duration) -> anyhow::Result<RotationStatus> {
    let deadline = Instant::now() + wait;
    loop {
        let s = status(addr)?;
        if s.phase == Phase::Idle.as_str() || Instant::now() >= deadline {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The status in lines a person reads.
pub fn describe(s: &RotationStatus) -> String {
    let mut out = format!("phase: {}", s.phase);
    if let Some(kind) = &s.kind {
        out.push_str(&format!(" ({kind} rotation)"));
    }
    out.push('\n');
    out.push_str(&format!(
        "trusted roots (SHA-256): {}\n",
        s.trusted_roots.join(", ")
    ));
    out.push_str(&format!("issuing root: {}\n", s.issuing_root));
    out.push_str(&format!(
        "proxies: {} holding a current certificate, {} confirmed the bundle, {} lagging\n",
        s.proxies.total,
        s.proxies.confirmed,
        s.proxies.lagging.len()
    ));
    for p in &s.proxies.lagging {
        out.push_str(&format!(
            "  lagging: {} ({})\n",
            p.pod.as_deref().unwrap_or("-"),
            p.spiffe_id
        ));
    }
    out.push_str(&format!(
        "leaves not from the issuing intermediate: {}\n",
        s.leaves_on_previous_root
    ));
    if let Some(t) = &s.started_at {
        out.push_str(&format!("started at: {t}\n"));
    }
    if let Some(t) = &s.deadline {
        out.push_str(&format!("deadline: {t}\n"));
    }
    out.push_str(&format!(
        "root expires: {}; intermediate expires: {}\n",
        s.root_expires_at, s.intermediate_expires_at
    ));
    if let Some(t) = &s.mesh_expires_at {
        out.push_str(&format!(
            "the mesh runs without the CA until: {t} (the first proxy certificate to expire)\n"
        ));
    }
    out
}

/// The trust bundle a state directory stands for: its root, and during a root rotation the
/// next root too (only the next one once it is retiring).
pub fn bundle_pem(state_dir: &Path) -> anyhow::Result<String> {
    let store = DirStore(state_dir.to_path_buf());
    let read = |name: &str| -> anyhow::Result<Option<String>> { Ok(store.read(name, false)?) };
    let current = read(CURRENT.root_cert)?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} holds no root: start `palisade-ca serve --state-dir {}` once first",
            state_dir.display(),
            state_dir.display()
        )
    })?;
    let record = keyset::read_record(&store)?;
    let next = match &record {
        Some(r) if r.kind == Kind::Root => read(NEXT.root_cert)?,
        _ => None,
    };
    Ok(match (record.map(|r| r.phase), next) {
        (Some(Phase::Retiring), Some(next)) => next,
        (Some(_), Some(next)) => format!("{current}{next}"),
        _ => current,
    })
}

/// `rotate root --emergency`: with the CA stopped, replaces the root and intermediate at once
/// (an expired or compromised root), abandoning any rotation under way. Written the way a
/// rotation ends (the new set as `next-*`, a record in `retiring`, then promoted), so that an
/// interrupted run is finished by the next start. Returns the new root.
pub fn emergency_root(
    state_dir: &Path,
    trust_domain: &str,
    lifetimes: &Lifetimes,
) -> anyhow::Result<String> {
    std::fs::create_dir_all(state_dir)?;
    let _lock = keyset::lock_state_dir(state_dir).map_err(anyhow::Error::msg)?;
    let mut store = DirStore(state_dir.to_path_buf());
    let now = OffsetDateTime::now_utc();
    let set = KeySet::generate_root(trust_domain, lifetimes, now)?;
    keyset::write_record(&mut store, None)?;
    set.save(&mut store, &NEXT)?;
    keyset::write_record(
        &mut store,
        Some(&super::Record {
            kind: Kind::Root,
            phase: Phase::Retiring,
            trigger: super::Trigger::Manual,
            started_at: now.unix_timestamp(),
            phase_started_at: now.unix_timestamp(),
        }),
    )?;
    keyset::promote(&mut store, now)?;
    Ok(cert_to_pem(&set.root))
}
