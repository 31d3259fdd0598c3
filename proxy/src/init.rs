//! `palisade-proxy init`: the nat rules that capture the pod's TCP traffic, and the filter rule
//! that keeps inbound UDP out.
//!
//! Two nat chains of our own, `PALISADE_INBOUND` (jumped to from PREROUTING, redirecting to the
//! inbound port) and `PALISADE_OUTBOUND` (from OUTPUT, redirecting to the outbound port). The
//! proxy carries TCP only, so inbound UDP could reach the app around every policy: the filter
//! chain `PALISADE_INBOUND_UDP` (from INPUT) drops it, except replies to the pod's own requests
//! (DNS answers among them), loopback, and the ports `--allow-inbound-udp-ports` lists.
//! Each run flushes and refills those chains and adds each jump only when it is missing, so
//! running twice leaves one set of rules. The rules are built by a pure function; only
//! `apply` runs `iptables`, with the backend (legacy or nft) the host already uses.
//!
//! Both families: when the pod has IPv6 the same chains are installed with `ip6tables`. When
//! IPv6 is present but cannot be captured (no ip6tables, no IPv6 nat table), IPv6 is closed
//! instead — never left open: see [`ipv6`].

use std::process::Command;

use palisade_ca_api::contract::{self, Cidr};

pub mod ipv6;

/// Rules as (chain, arguments after `-A <chain>`).
pub type Rules = Vec<(&'static str, Vec<String>)>;

/// An address family, with what differs between its rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The loopback range, never captured outbound.
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

pub const INBOUND_CHAIN: &str = "PALISADE_INBOUND";
pub const OUTBOUND_CHAIN: &str = "PALISADE_OUTBOUND";
pub const INBOUND_UDP_CHAIN: &str = "PALISADE_INBOUND_UDP";

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{flag} {value:?} is invalid: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "cannot run {0}: {1} (is iptables installed, and does the container have NET_ADMIN and NET_RAW?)"
    )]
    Spawn(String, std::io::Error),
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error(
        "the pod has IPv6 and it would bypass the mesh: {0}. Give the proxy image ip6tables and the node the ip6table_nat module, or turn IPv6 off for the pod"
    )]
    Ipv6Open(String),
}

/// What to capture and what to leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOptions {
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    pub skip_inbound_ports: Vec<u16>,
    pub skip_outbound_ports: Vec<u16>,
    pub skip_outbound_cidrs: Vec<Cidr>,
    /// Inbound UDP ports the app may be reached on (policy does not apply to them).
    pub allow_inbound_udp_ports: Vec<u16>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            proxy_uid: contract::PROXY_UID,
            inbound_port: contract::INBOUND_PORT,
            outbound_port: contract::OUTBOUND_PORT,
            admin_port: contract::PROXY_ADMIN_PORT,
            skip_inbound_ports: vec![],
            skip_outbound_ports: vec![],
            skip_outbound_cidrs: vec![],
            allow_inbound_udp_ports: vec![],
        }
    }
}

/// The contract's port list (`P,P,...`), with the flag named in an error.
pub fn parse_ports(flag: &'static str, s: &str) -> Result<Vec<u16>, InitError> {
    contract::parse_ports(s).map_err(|reason| invalid(flag, s, reason))
}

/// The contract's CIDR list (`a.b.c.d/len,...`), with the flag named in an error: the same
/// parser the injector checks `palisade.dev/skip-outbound-cidrs` with, so a pod it admits
/// never fails here.
pub fn parse_cidrs(flag: &'static str, s: &str) -> Result<Vec<Cidr>, InitError> {
    contract::parse_cidrs(s).map_err(|reason| invalid(flag, s, reason))
}

fn invalid(flag: &'static str, value: &str, reason: String) -> InitError {
    InitError::Invalid {
        flag,
        value: value.to_owned(),
        reason,
    }
}

pub(crate) fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// One chain's rules (arguments after `-t nat -A <chain>`) for `family`: the skipped CIDRs of
/// that family only. Pure.
pub fn chain_rules(o: &InitOptions, family: Family) -> Rules {
    let mut rules = Vec::new();
    // Inbound: the admin port (kubelet probes) and skipped ports reach the app directly.
    rules.push((
        INBOUND_CHAIN,
        args(&format!("-p tcp --dport {} -j RETURN", o.admin_port)),
    ));
    for p in &o.skip_inbound_ports {
        rules.push((
            INBOUND_CHAIN,
            args(&format!("-p tcp --dport {p} -j RETURN")),
        ));
    }
    rules.push((
        INBOUND_CHAIN,
        args(&format!("-p tcp -j REDIRECT --to-ports {}", o.inbound_port)),
    ));
    // Outbound: never the proxy's own traffic (it would loop), nor loopback.
    rules.push((
        OUTBOUND_CHAIN,
        args(&format!("-m owner --uid-owner {} -j RETURN", o.proxy_uid)),
    ));
    rules.push((OUTBOUND_CHAIN, args("-o lo -j RETURN")));
    rules.push((
        OUTBOUND_CHAIN,
        args(&format!("-d {} -j RETURN", family.loopback())),
    ));
    for p in &o.skip_outbound_ports {
        rules.push((
            OUTBOUND_CHAIN,
            args(&format!("-p tcp --dport {p} -j RETURN")),
        ));
    }
    let of_family = |c: &&Cidr| c.is_ipv4() == (family == Family::V4);
    for c in o.skip_outbound_cidrs.iter().filter(of_family) {
        rules.push((OUTBOUND_CHAIN, args(&format!("-d {c} -j RETURN"))));
    }
    rules.push((
        OUTBOUND_CHAIN,
        args(&format!(
            "-p tcp -j REDIRECT --to-ports {}",
            o.outbound_port
        )),
    ));
    rules
}

/// The jumps into our chains: (parent chain, rule). Pure.
pub fn jump_rules() -> Rules {
    vec![
        ("PREROUTING", args(&format!("-p tcp -j {INBOUND_CHAIN}"))),
        ("OUTPUT", args(&format!("-p tcp -j {OUTBOUND_CHAIN}"))),
    ]
}

/// The filter table's rules for inbound UDP (arguments after `-t filter -A <chain>`). Pure.
pub fn udp_rules(o: &InitOptions) -> Rules {
    let mut rules = vec![
        (INBOUND_UDP_CHAIN, args("-i lo -j RETURN")),
        // Answers to the pod's own requests: DNS, NTP, whatever the app asked.
        (
            INBOUND_UDP_CHAIN,
            args("-m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"),
        ),
    ];
    for p in &o.allow_inbound_udp_ports {
        rules.push((
            INBOUND_UDP_CHAIN,
            args(&format!("-p udp --dport {p} -j RETURN")),
        ));
    }
    rules.push((INBOUND_UDP_CHAIN, args("-j DROP")));
    rules
}

/// The filter table's jump into the UDP chain. Pure.
pub fn udp_jump_rules() -> Rules {
    vec![("INPUT", args(&format!("-p udp -j {INBOUND_UDP_CHAIN}")))]
}

/// Every command `apply` runs on a host where our chains do not exist yet, for `--dry-run`.
pub fn script(binary: &str, o: &InitOptions, family: Family) -> Vec<String> {
    let mut out = install_script(
        binary,
        "nat",
        &[INBOUND_CHAIN, OUTBOUND_CHAIN],
        chain_rules(o, family),
        jump_rules(),
    );
    out.extend(udp_drop_script(binary, o));
    out
}

/// The commands [`install`] runs for one table on a host without our chains. Pure.
pub(crate) fn install_script(
    binary: &str,
    table: &str,
    chains: &[&str],
    rules: Rules,
    jumps: Rules,
) -> Vec<String> {
    let mut out = Vec::new();
    for chain in chains {
        out.push(format!("{binary} -t {table} -N {chain}"));
        out.push(format!("{binary} -t {table} -F {chain}"));
    }
    for (chain, rule) in rules.into_iter().chain(jumps) {
        out.push(format!("{binary} -t {table} -A {chain} {}", rule.join(" ")));
    }
    out
}

/// The commands of [`install_udp_drop`]. Pure.
pub(crate) fn udp_drop_script(binary: &str, o: &InitOptions) -> Vec<String> {
    install_script(
        binary,
        "filter",
        &[INBOUND_UDP_CHAIN],
        udp_rules(o),
        udp_jump_rules(),
    )
}

/// Which iptables the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
    /// Neither variant is installed; plain `iptables`.
    Default,
}

impl Backend {
    pub fn binary(self) -> &'static str {
        self.binary_for(Family::V4)
    }

    /// `iptables…` or `ip6tables…` of this backend.
    pub fn binary_for(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Legacy, Family::V4) => "iptables-legacy",
            (Backend::Nft, Family::V4) => "iptables-nft",
            (Backend::Default, Family::V4) => "iptables",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy",
            (Backend::Nft, Family::V6) => "ip6tables-nft",
            (Backend::Default, Family::V6) => "ip6tables",
        }
    }
}

/// Picks the backend that already holds rules; nft when neither does. `None` means that
/// variant is not installed. Pure.
pub fn choose_backend(legacy_rules: Option<usize>, nft_rules: Option<usize>) -> Backend {
    match (legacy_rules, nft_rules) {
        (Some(l), Some(n)) if l > n => Backend::Legacy,
        (Some(_), Some(_)) | (None, Some(_)) => Backend::Nft,
        (Some(_), None) => Backend::Legacy,
        (None, None) => Backend::Default,
    }
}

/// Rules (`-A` lines) a backend holds now, or `None` when it is not installed.
fn rule_count(save_binary: &str) -> Option<usize> {
    let out = Command::new(save_binary).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count(),
    )
}

/// The backend the host uses for `family`, chosen by where its rules already are.
pub fn detect_backend(family: Family) -> Backend {
    let save = |b: Backend| format!("{}-save", b.binary_for(family));
    choose_backend(
        rule_count(&save(Backend::Legacy)),
        rule_count(&save(Backend::Nft)),
    )
}

pub(crate) fn run(binary: &str, a: &[String]) -> Result<bool, InitError> {
    let out = Command::new(binary)
        .args(a)
        .output()
        .map_err(|e| InitError::Spawn(binary.to_owned(), e))?;
    Ok(out.status.success())
}

pub(crate) fn must(binary: &str, a: &[String]) -> Result<(), InitError> {
    let out = Command::new(binary)
        .args(a)
        .output()
        .map_err(|e| InitError::Spawn(binary.to_owned(), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(InitError::Failed {
            command: format!("{binary} {}", a.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn in_table(table: &str, rest: &[&str]) -> Vec<String> {
    ["-t", table]
        .iter()
        .chain(rest)
        .map(|s| (*s).to_owned())
        .collect()
}

/// Installs the rules of `family` with `binary`: creates our chains if missing, flushes and
/// refills them, and adds each jump only when it is not there yet.
pub fn apply(binary: &str, o: &InitOptions, family: Family) -> Result<(), InitError> {
    install(
        binary,
        "nat",
        &[INBOUND_CHAIN, OUTBOUND_CHAIN],
        chain_rules(o, family),
        jump_rules(),
    )?;
    install_udp_drop(binary, o)
}

/// The filter table's inbound UDP drop, on its own (IPv6 gets it also when it is closed).
pub(crate) fn install_udp_drop(binary: &str, o: &InitOptions) -> Result<(), InitError> {
    install(
        binary,
        "filter",
        &[INBOUND_UDP_CHAIN],
        udp_rules(o),
        udp_jump_rules(),
    )
}

/// One table's chains of ours: each made if missing, flushed and refilled; each jump added
/// only when missing, so running twice leaves one set of rules.
pub(crate) fn install(
    binary: &str,
    table: &str,
    chains: &[&str],
    rules: Rules,
    jumps: Rules,
) -> Result<(), InitError> {
    for chain in chains {
        if !run(binary, &in_table(table, &["-S", chain]))? {
            must(binary, &in_table(table, &["-N", chain]))?;
        }
        must(binary, &in_table(table, &["-F", chain]))?;
    }
    for (chain, rule) in rules {
        let mut a = in_table(table, &["-A", chain]);
        a.extend(rule);
        must(binary, &a)?;
    }
    for (parent, rule) in jumps {
        let mut check = in_table(table, &["-C", parent]);
        check.extend(rule.iter().cloned());
        if !run(binary, &check)? {
            let mut add = in_table(table, &["-A", parent]);
            add.extend(rule);
            must(binary, &add)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_capture_both_directions_and_skip_the_proxy() {
        let s = script("iptables-nft", &InitOptions::default(), Family::V4);
        let expected = [
            "iptables-nft -t nat -N PALISADE_INBOUND",
            "iptables-nft -t nat -F PALISADE_INBOUND",
            "iptables-nft -t nat -N PALISADE_OUTBOUND",
            "iptables-nft -t nat -F PALISADE_OUTBOUND",
            "iptables-nft -t nat -A PALISADE_INBOUND -p tcp --dport 15021 -j RETURN",
            "iptables-nft -t nat -A PALISADE_INBOUND -p tcp -j REDIRECT --to-ports 15006",
            "iptables-nft -t nat -A PALISADE_OUTBOUND -m owner --uid-owner 1337 -j RETURN",
            "iptables-nft -t nat -A PALISADE_OUTBOUND -o lo -j RETURN",
            "iptables-nft -t nat -A PALISADE_OUTBOUND -d 127.0.0.0/8 -j RETURN",
            "iptables-nft -t nat -A PALISADE_OUTBOUND -p tcp -j REDIRECT --to-ports 15001",
            "iptables-nft -t nat -A PREROUTING -p tcp -j PALISADE_INBOUND",
            "iptables-nft -t nat -A OUTPUT -p tcp -j PALISADE_OUTBOUND",
            "iptables-nft -t filter -N PALISADE_INBOUND_UDP",
            "iptables-nft -t filter -F PALISADE_INBOUND_UDP",
            "iptables-nft -t filter -A PALISADE_INBOUND_UDP -i lo -j RETURN",
            "iptables-nft -t filter -A PALISADE_INBOUND_UDP -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
            "iptables-nft -t filter -A PALISADE_INBOUND_UDP -j DROP",
            "iptables-nft -t filter -A INPUT -p udp -j PALISADE_INBOUND_UDP",
        ];
        assert_eq!(s, expected);
    }

    #[test]
    fn inbound_udp_is_dropped_but_for_replies_loopback_and_listed_ports() {
        let o = InitOptions {
            allow_inbound_udp_ports: vec![5301, 8125],
            ..InitOptions::default()
        };
        let rules: Vec<String> = udp_rules(&o)
            .into_iter()
            .map(|(c, r)| format!("{c} {}", r.join(" ")))
            .collect();
        assert_eq!(
            rules,
            [
                "PALISADE_INBOUND_UDP -i lo -j RETURN",
                "PALISADE_INBOUND_UDP -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
                "PALISADE_INBOUND_UDP -p udp --dport 5301 -j RETURN",
                "PALISADE_INBOUND_UDP -p udp --dport 8125 -j RETURN",
                "PALISADE_INBOUND_UDP -j DROP",
            ]
        );
        let s = script("iptables-nft", &o, Family::V4);
        assert!(s.contains(
            &"iptables-nft -t filter -A INPUT -p udp -j PALISADE_INBOUND_UDP".to_owned()
        ));
        assert!(s.contains(&"iptables-nft -t filter -N PALISADE_INBOUND_UDP".to_owned()));
    }

    #[test]
    fn skip_lists_return_before_the_redirect() {
        let o = InitOptions {
            proxy_uid: 2000,
            inbound_port: 16006,
            outbound_port: 16001,
            skip_inbound_ports: vec![22],
            skip_outbound_ports: vec![3306, 5432],
            skip_outbound_cidrs: vec!["169.254.169.254/32".parse().unwrap()],
            ..InitOptions::default()
        };
        let rules: Vec<String> = chain_rules(&o, Family::V4)
            .into_iter()
            .map(|(c, r)| format!("{c} {}", r.join(" ")))
            .collect();
        let pos = |needle: &str| {
            rules
                .iter()
                .position(|r| r == needle)
                .unwrap_or_else(|| panic!("{needle} in {rules:?}"))
        };
        assert!(
            pos("PALISADE_INBOUND -p tcp --dport 22 -j RETURN")
                < pos("PALISADE_INBOUND -p tcp -j REDIRECT --to-ports 16006")
        );
        let redirect = pos("PALISADE_OUTBOUND -p tcp -j REDIRECT --to-ports 16001");
        for r in [
            "PALISADE_OUTBOUND -m owner --uid-owner 2000 -j RETURN",
            "PALISADE_OUTBOUND -p tcp --dport 3306 -j RETURN",
            "PALISADE_OUTBOUND -p tcp --dport 5432 -j RETURN",
            "PALISADE_OUTBOUND -d 169.254.169.254/32 -j RETURN",
        ] {
            assert!(pos(r) < redirect, "{r}");
        }
        assert_eq!(redirect, rules.len() - 1);
    }

    #[test]
    fn ipv6_rules_mirror_ipv4_with_the_other_loopback_and_each_family_its_own_cidrs() {
        let o = InitOptions {
            skip_outbound_cidrs: ["10.0.0.0/8", "fd00:ec2::254"]
                .iter()
                .map(|c| c.parse().unwrap())
                .collect(),
            ..InitOptions::default()
        };
        let v4 = script("iptables-nft", &o, Family::V4);
        let v6 = script("ip6tables-nft", &o, Family::V6);
        assert_eq!(v4.len(), v6.len());
        let expect = |lines: &[String], has: &str, lacks: &str| {
            assert!(lines.iter().any(|l| l.ends_with(has)), "{has} in {lines:?}");
            assert!(
                !lines.iter().any(|l| l.contains(lacks)),
                "{lacks} in {lines:?}"
            );
        };
        expect(&v4, "-d 127.0.0.0/8 -j RETURN", "::1");
        expect(&v4, "-d 10.0.0.0/8 -j RETURN", "fd00:ec2::254");
        expect(&v6, "-d ::1/128 -j RETURN", "127.0.0.0/8");
        expect(&v6, "-d fd00:ec2::254/128 -j RETURN", "10.0.0.0/8");
        for (a, b) in v4.iter().zip(&v6) {
            let same = |l: &str| {
                l.replacen("ip6tables", "iptables", 1)
                    .replace("::1/128", "127.0.0.0/8")
                    .replace("fd00:ec2::254/128", "10.0.0.0/8")
            };
            assert_eq!(same(a), same(b));
        }
        assert_eq!(Backend::Legacy.binary_for(Family::V6), "ip6tables-legacy");
        assert_eq!(Backend::Default.binary_for(Family::V6), "ip6tables");
    }

    #[test]
    fn backend_follows_the_host() {
        assert_eq!(choose_backend(Some(12), Some(0)), Backend::Legacy);
        assert_eq!(choose_backend(Some(0), Some(3)), Backend::Nft);
        assert_eq!(choose_backend(Some(0), Some(0)), Backend::Nft);
        assert_eq!(choose_backend(None, Some(0)), Backend::Nft);
        assert_eq!(choose_backend(Some(0), None), Backend::Legacy);
        assert_eq!(choose_backend(None, None), Backend::Default);
    }

    #[test]
    fn lists_are_validated_with_the_flag_named() {
        assert_eq!(
            parse_ports("--skip-inbound-ports", "22, 80,").unwrap(),
            vec![22, 80]
        );
        assert!(parse_ports("--skip-inbound-ports", "").unwrap().is_empty());
        let e = parse_ports("--skip-outbound-ports", "22,http")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--skip-outbound-ports") && e.contains("http"),
            "{e}"
        );
        assert!(parse_ports("--skip-outbound-ports", "70000").is_err());
        assert_eq!(
            parse_cidrs("--skip-outbound-cidrs", "10.0.0.0/8,1.2.3.4")
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec!["10.0.0.0/8", "1.2.3.4/32"]
        );
        for bad in ["10.0.0.0/33", "10.0.0/8", "fe80::/129", "x"] {
            let e = parse_cidrs("--skip-outbound-cidrs", bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("--skip-outbound-cidrs"), "{e}");
        }
    }
}
