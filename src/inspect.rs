//! `palisade inspect CERT.pem`: what a certificate says, and whether it is a mesh leaf.

use std::path::Path;

use anyhow::Context;
use palisade_ca_api::cert::{check_leaf_profile, parse_pem_certs, spiffe_id_from_cert};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

pub fn run(path: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs = parse_pem_certs(&text)
        .with_context(|| format!("{} holds no usable certificate", path.display()))?;
    let now = OffsetDateTime::now_utc();
    for (i, der) in certs.iter().enumerate() {
        print!("{}", describe(i, der, now)?);
    }
    Ok(())
}

fn human(seconds: i64) -> String {
    let s = seconds.unsigned_abs();
    let text = match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d", s / 86400),
    };
    if seconds < 0 {
        format!("{text} ago")
    } else {
        format!("in {text}")
    }
}

pub fn describe(index: usize, der: &[u8], now: OffsetDateTime) -> anyhow::Result<String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| anyhow::anyhow!("certificate #{index} is not valid X.509: {e}"))?;
    let mut out = String::new();
    let role = if cert.is_ca() {
        if cert.subject() == cert.issuer() {
            "root CA"
        } else {
            "intermediate CA"
        }
    } else {
        "leaf"
    };
    out.push_str(&format!("certificate #{index} ({role})\n"));
    out.push_str(&format!(
        "  subject     {}\n  issuer      {}\n",
        cert.subject(),
        cert.issuer()
    ));
    let serial: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    out.push_str(&format!("  serial      {serial}\n"));
    let (nb, na) = (
        cert.validity().not_before.to_datetime(),
        cert.validity().not_after.to_datetime(),
    );
    out.push_str(&format!(
        "  valid from  {nb} ({})\n",
        human((nb - now).whole_seconds())
    ));
    let state = if na <= now {
        "EXPIRED"
    } else if nb > now {
        "NOT YET VALID"
    } else {
        "valid"
    };
    out.push_str(&format!(
        "  valid until {na} ({}) — {state}\n",
        human((na - now).whole_seconds())
    ));
    if !cert.is_ca() {
        match spiffe_id_from_cert(der) {
            Ok(id) => out.push_str(&format!("  identity    {id}\n")),
            Err(e) => out.push_str(&format!("  identity    none: {e}\n")),
        }
        match check_leaf_profile(der) {
            Ok(_) => out.push_str("  profile     a Palisade mesh leaf (one SPIFFE ID, serverAuth+clientAuth, digitalSignature)\n"),
            Err(e) => out.push_str(&format!("  profile     NOT a mesh leaf: {e}\n")),
        }
    }
    Ok(out)
}
