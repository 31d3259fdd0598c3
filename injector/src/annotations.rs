//! Per-pod overrides read from `palisade.dev/*` annotations, and the value parsers that the
//! command-line defaults share with them. Parsing is strict: a value the proxy could not use is
//! an error that names the annotation and the accepted form, so a pod is never injected with a
//! setting silently dropped.

use std::collections::BTreeMap;

pub use palisade_ca_api::contract::INJECT;
pub use palisade_ca_api::contract::annotations::*;
use palisade_ca_api::contract::{self, APP_PROBES_ANNOTATION, Cidr, DEFAULT_POLICY_ANNOTATION};

const PORTS_FORM: &str = "comma-separated port numbers 1-65535, e.g. \"8080,9090\"";
const CIDRS_FORM: &str =
    "comma-separated CIDRs of either family, e.g. \"10.0.0.0/8,169.254.169.254/32,fd00::/8\"";
const CPU_FORM: &str = "a Kubernetes CPU quantity above zero, e.g. \"100m\" or \"0.5\"";
const MEMORY_FORM: &str = "a Kubernetes memory quantity above zero, e.g. \"128Mi\" or \"1Gi\" (suffixes Ki Mi Gi Ti k M G T)";
const LOG_FORM: &str = "a level (trace, debug, info, warn, error, off) or comma-separated \
     target=level directives, e.g. \"info,palisade_proxy=debug\"";
const INJECT_FORM: &str = "\"enabled\" or \"disabled\"";
const SWITCH_FORM: &str = "\"true\" or \"false\"";

/// A value that cannot be used: names the setting, the value and the accepted form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}={value:?} is invalid: {reason}; expected {accepted}")]
pub struct ValueError {
    /// The annotation (or, for defaults, the command-line flag) that carried the value.
    pub setting: String,
    pub value: String,
    pub reason: String,
    pub accepted: &'static str,
}

impl ValueError {
    pub(crate) fn new(
        setting: &str,
        value: &str,
        reason: impl Into<String>,
        accepted: &'static str,
    ) -> Self {
        // Long values would drown the message that the API server shows to the user.
        let mut value = value.to_owned();
        if value.len() > 80 {
            let mut cut = 80;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
            value.push('…');
        }
        Self {
            setting: setting.to_owned(),
            value,
            reason: reason.into(),
            accepted,
        }
    }
}

/// Overrides of one pod; `None`/empty means "use the injector's default".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodOverrides {
    pub skip_inbound_ports: Vec<u16>,
    pub skip_outbound_ports: Vec<u16>,
    pub skip_outbound_cidrs: Vec<Cidr>,
    pub inbound_udp_ports: Vec<u16>,
    pub cpu_request: Option<Quantity>,
    pub memory_limit: Option<Quantity>,
    pub log_level: Option<String>,
}

/// Reads every `palisade.dev/*` annotation of a pod. Unknown keys under `palisade.dev/` are
/// returned as warnings (a typo should not pass unnoticed, but does not block the pod).
pub fn parse_overrides(
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<(PodOverrides, Vec<String>), ValueError> {
    let mut overrides = PodOverrides::default();
    let mut warnings = Vec::new();
    let Some(annotations) = annotations else {
        return Ok((overrides, warnings));
    };
    for (key, value) in annotations {
        match key.as_str() {
            SKIP_INBOUND_PORTS => overrides.skip_inbound_ports = parse_ports(key, value)?,
            SKIP_OUTBOUND_PORTS => overrides.skip_outbound_ports = parse_ports(key, value)?,
            SKIP_OUTBOUND_CIDRS => overrides.skip_outbound_cidrs = parse_cidrs(key, value)?,
            INBOUND_UDP_PORTS => overrides.inbound_udp_ports = parse_ports(key, value)?,
            PROXY_CPU_REQUEST => overrides.cpu_request = Some(Quantity::cpu(key, value)?),
            PROXY_MEMORY_LIMIT => overrides.memory_limit = Some(Quantity::memory(key, value)?),
            LOG_LEVEL => overrides.log_level = Some(parse_log_level(key, value)?),
            INJECT => parse_inject(key, value).map(drop)?,
            // Read by the proxy from its environment; checked here so a bad value is refused
            // at admission, not found when the proxy stops at start-up.
            INBOUND_LOOPBACK_PORTS => parse_ports(key, value).map(drop)?,
            ADMIN_REMOTE_METRICS => contract::parse_switch(value)
                .map(drop)
                .map_err(|reason| ValueError::new(key, value, reason, SWITCH_FORM))?,
            APP_PROBES_ANNOTATION | DEFAULT_POLICY_ANNOTATION => {}
            other if other.starts_with("palisade.dev/") => warnings.push(format!(
                "annotation {other} is not one palisade-injector knows and was ignored; \
                 see docs/injector.md for the supported annotations"
            )),
            _ => {}
        }
    }
    Ok((overrides, warnings))
}

/// `palisade.dev/inject` as label or annotation: `Ok(true)` for `disabled`.
pub fn parse_inject(setting: &str, value: &str) -> Result<bool, ValueError> {
    match value {
        "disabled" => Ok(true),
        "enabled" => Ok(false),
        _ => Err(ValueError::new(
            setting,
            value,
            "only \"disabled\" opts a pod out; other values are refused rather than guessed",
            INJECT_FORM,
        )),
    }
}

/// The contract's port list, as `palisade-init` reads it.
pub fn parse_ports(setting: &str, value: &str) -> Result<Vec<u16>, ValueError> {
    contract::parse_ports(value).map_err(|why| ValueError::new(setting, value, why, PORTS_FORM))
}

/// The contract's CIDR list: the parser `palisade-init` uses, so a pod admitted here never
/// fails there.
pub fn parse_cidrs(setting: &str, value: &str) -> Result<Vec<Cidr>, ValueError> {
    contract::parse_cidrs(value).map_err(|why| ValueError::new(setting, value, why, CIDRS_FORM))
}

pub fn parse_log_level(setting: &str, value: &str) -> Result<String, ValueError> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let value = value.trim();
    let bad = |why: String| ValueError::new(setting, value, why, LOG_FORM);
    if value.is_empty() {
        return Err(bad("it is empty".into()));
    }
    for directive in value.split(',') {
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (Some(target), level),
            None => (None, directive),
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(bad(format!("{level:?} is not a log level")));
        }
        if let Some(target) = target {
            let valid = !target.is_empty()
                && target
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
            if !valid {
                return Err(bad(format!("{target:?} is not a Rust module path")));
            }
        }
    }
    Ok(value.to_owned())
}

/// A Kubernetes resource quantity, kept as written (the API server canonicalises it) with its
/// value in milli-units for comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantity {
    pub text: String,
    pub milli: u128,
}

impl Quantity {
    pub fn cpu(setting: &str, value: &str) -> Result<Self, ValueError> {
        let text = value.trim();
        let milli = match text.strip_suffix('m') {
            Some(m) if !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()) => m.parse().ok(),
            Some(_) => None,
            None => decimal_milli(text, 1),
        };
        match milli {
            Some(milli) if milli > 0 => Ok(Self {
                text: text.to_owned(),
                milli,
            }),
            _ => Err(ValueError::new(
                setting,
                value,
                "not a positive CPU quantity",
                CPU_FORM,
            )),
        }
    }

    pub fn memory(setting: &str, value: &str) -> Result<Self, ValueError> {
        const SUFFIXES: [(&str, u128); 8] = [
            ("Ki", 1 << 10),
            ("Mi", 1 << 20),
            ("Gi", 1 << 30),
            ("Ti", 1 << 40),
            ("k", 1_000),
            ("M", 1_000_000),
            ("G", 1_000_000_000),
            ("T", 1_000_000_000_000),
        ];
        let text = value.trim();
        let (number, unit) = SUFFIXES
            .iter()
            .find_map(|(suffix, unit)| text.strip_suffix(suffix).map(|n| (n, *unit)))
            .unwrap_or((text, 1));
        match decimal_milli(number, unit) {
            Some(milli) if milli > 0 => Ok(Self {
                text: text.to_owned(),
                milli,
            }),
            _ => Err(ValueError::new(
                setting,
                value,
                "not a positive memory quantity",
                MEMORY_FORM,
            )),
        }
    }
}

/// `"1.5"` × unit, in thousandths; `None` unless the text is digits with at most one dot.
fn decimal_milli(text: &str, unit: u128) -> Option<u128> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && fraction.is_empty() || !digits(whole) || !digits(fraction) {
        return None;
    }
    if whole.len() > 20 || fraction.len() > 9 {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let scale = 10u128.pow(fraction.len() as u32);
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().ok()?
    };
    // Round up like the API server: 0.0001 CPU is 1m, not 0.
    let milli_num = (whole * scale + fraction)
        .checked_mul(unit)?
        .checked_mul(1000)?;
    Some(milli_num.div_ceil(scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ports_are_parsed_sorted_and_deduplicated() {
        assert_eq!(
            parse_ports("x", " 9090, 8080,,8080 ").unwrap(),
            vec![8080, 9090]
        );
        assert_eq!(parse_ports("x", "").unwrap(), Vec::<u16>::new());
    }

    #[test]
    fn bad_ports_name_the_annotation_and_the_form() {
        for bad in ["0", "65536", "80-90", "http", "-1"] {
            let err = parse_ports(SKIP_INBOUND_PORTS, bad).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with("palisade.dev/skip-inbound-ports="),
                "{text}"
            );
            assert!(text.contains("1-65535"), "{text}");
        }
    }

    #[test]
    fn cidrs_are_the_forms_palisade_init_accepts() {
        let text = |cidrs: Vec<Cidr>| cidrs.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            text(parse_cidrs("x", "10.0.0.0/8, 169.254.169.254, fd00:ec2::254").unwrap()),
            ["10.0.0.0/8", "169.254.169.254/32", "fd00:ec2::254/128"]
        );
        for bad in ["10.0.0.0/33", "example.com/8", "10.0.0.0/x", "fd00::/200"] {
            let err = parse_cidrs(SKIP_OUTBOUND_CIDRS, bad).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with("palisade.dev/skip-outbound-cidrs="),
                "{text}"
            );
            assert!(text.contains("10.0.0.0/8,169.254.169.254/32"), "{text}");
        }
    }

    #[test]
    fn cpu_quantities() {
        assert_eq!(Quantity::cpu("x", "100m").unwrap().milli, 100);
        assert_eq!(Quantity::cpu("x", "0.5").unwrap().milli, 500);
        assert_eq!(Quantity::cpu("x", "2").unwrap().milli, 2000);
        assert_eq!(Quantity::cpu("x", "0.0001").unwrap().milli, 1);
        for bad in ["", "0", "0m", "m", "1.5m", "-1", "100Mi", "1e3", "lots"] {
            let err = Quantity::cpu(PROXY_CPU_REQUEST, bad).unwrap_err();
            assert!(err.to_string().contains("\"100m\""), "{bad}: {err}");
        }
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(Quantity::memory("x", "1Ki").unwrap().milli, 1024 * 1000);
        assert_eq!(
            Quantity::memory("x", "1.5Gi").unwrap().milli,
            3 * (1u128 << 29) * 1000
        );
        assert_eq!(
            Quantity::memory("x", "128M").unwrap().milli,
            128_000_000_000
        );
        assert!(
            Quantity::memory("x", "128Mi").unwrap().milli
                > Quantity::memory("x", "128M").unwrap().milli
        );
        for bad in ["", "0", "0Mi", "Mi", "128MB", "128 Mi", "-1Gi", "1.2.3Gi"] {
            let err = Quantity::memory(PROXY_MEMORY_LIMIT, bad).unwrap_err();
            assert!(
                err.to_string().contains("palisade.dev/proxy-memory-limit"),
                "{err}"
            );
        }
    }

    #[test]
    fn log_levels() {
        assert_eq!(parse_log_level("x", "debug").unwrap(), "debug");
        assert_eq!(
            parse_log_level("x", "info,palisade_proxy::tls=trace").unwrap(),
            "info,palisade_proxy::tls=trace"
        );
        for bad in ["", "verbose", "a b=info", "=info", "info,"] {
            assert!(parse_log_level(LOG_LEVEL, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn overrides_from_annotations() {
        let a = annotations(&[
            (SKIP_INBOUND_PORTS, "22"),
            (SKIP_OUTBOUND_PORTS, "5432,6379"),
            (SKIP_OUTBOUND_CIDRS, "169.254.169.254/32"),
            (PROXY_CPU_REQUEST, "250m"),
            (PROXY_MEMORY_LIMIT, "512Mi"),
            (LOG_LEVEL, "debug"),
            (INJECT, "enabled"),
            (INBOUND_LOOPBACK_PORTS, "9090"),
            (INBOUND_UDP_PORTS, "5353,8125"),
            (ADMIN_REMOTE_METRICS, "true"),
            ("example.com/other", "anything"),
        ]);
        let (o, warnings) = parse_overrides(Some(&a)).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(o.skip_inbound_ports, vec![22]);
        assert_eq!(o.skip_outbound_ports, vec![5432, 6379]);
        assert_eq!(o.inbound_udp_ports, vec![5353, 8125]);
        assert_eq!(
            o.skip_outbound_cidrs,
            vec!["169.254.169.254/32".parse().unwrap()]
        );
        assert_eq!(o.cpu_request.unwrap().text, "250m");
        assert_eq!(o.memory_limit.unwrap().text, "512Mi");
        assert_eq!(o.log_level.as_deref(), Some("debug"));
    }

    #[test]
    fn unknown_palisade_annotation_is_a_warning() {
        let a = annotations(&[("palisade.dev/proxy-cpu-limit", "1")]);
        let (_, warnings) = parse_overrides(Some(&a)).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("palisade.dev/proxy-cpu-limit"));
    }

    #[test]
    fn inject_values_other_than_enabled_or_disabled_are_refused() {
        assert!(parse_inject(INJECT, "disabled").unwrap());
        assert!(!parse_inject(INJECT, "enabled").unwrap());
        let err = parse_inject(INJECT, "false").unwrap_err();
        assert!(
            err.to_string().contains("\"enabled\" or \"disabled\""),
            "{err}"
        );
    }

    #[test]
    fn the_remote_metrics_switch_is_true_or_false() {
        let a = annotations(&[(ADMIN_REMOTE_METRICS, "yes")]);
        let err = parse_overrides(Some(&a)).unwrap_err().to_string();
        assert!(
            err.starts_with("palisade.dev/admin-remote-metrics=\"yes\"")
                && err.contains("\"true\" or \"false\""),
            "{err}"
        );
        for ok in ["true", "false", ""] {
            let a = annotations(&[(ADMIN_REMOTE_METRICS, ok)]);
            assert!(parse_overrides(Some(&a)).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let long = "x".repeat(500);
        let err = parse_ports(SKIP_INBOUND_PORTS, &long).unwrap_err();
        assert!(err.value.chars().count() <= 81);
    }
}
