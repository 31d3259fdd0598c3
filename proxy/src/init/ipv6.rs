//! IPv6 in a pod: captured like IPv4 when it can be, closed when it cannot, never open.
//!
//! A dual-stack pod that had IPv4 rules only would let every IPv6 connection walk around the
//! proxy (no mTLS, no policy). So when the pod has IPv6 (an address on any interface but `lo`,
//! link-local included: a neighbour on the link can use it), `init`:
//! 1. installs the IPv4 chains' twins with `ip6tables` (the backend the host uses);
//! 2. when that fails (no `ip6tables`, no IPv6 nat table), closes IPv6 TCP instead: chain
//!    `PALISADE_IPV6_CLOSED` rejects every TCP packet in or out that is not on `lo`, and inbound
//!    UDP is dropped as for IPv4;
//! 3. when even the filter table cannot be used, turns IPv6 off in the pod
//!    (`net.ipv6.conf.all.disable_ipv6=1`, and `default`) and checks that no address remains;
//! 4. when nothing of that works, fails: the pod does not start rather than run open.

use std::path::Path;

use super::{
    Family, InitError, InitOptions, Rules, install, install_script, install_udp_drop,
    udp_drop_script,
};

pub const CLOSED_CHAIN: &str = "PALISADE_IPV6_CLOSED";

/// What `init` did about IPv6; printed, and the reason the proxy's readiness reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipv6Outcome {
    /// The pod has no IPv6 address outside `lo`: nothing to capture.
    Absent,
    /// Captured like IPv4, with this binary.
    Captured(String),
    /// TCP over IPv6 is rejected (and inbound UDP dropped) because capture failed for `why`.
    Closed { binary: String, why: String },
    /// IPv6 was turned off in the pod because neither capture nor rules were possible.
    Disabled { why: String },
}

impl std::fmt::Display for Ipv6Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ipv6Outcome::Absent => write!(f, "IPv6: none in this pod, nothing to capture"),
            Ipv6Outcome::Captured(binary) => write!(f, "IPv6: captured with {binary}"),
            Ipv6Outcome::Closed { binary, why } => write!(
                f,
                "IPv6: CLOSED, not captured: TCP over IPv6 is rejected ({binary}, chain {CLOSED_CHAIN}) because capture failed: {why}. Install ip6tables with the nat table (kernel module ip6table_nat) on the node to mesh IPv6"
            ),
            Ipv6Outcome::Disabled { why } => write!(
                f,
                "IPv6: DISABLED in this pod (net.ipv6.conf.all.disable_ipv6=1), because it could neither be captured nor closed with rules: {why}"
            ),
        }
    }
}

/// Whether the pod has an IPv6 address on an interface other than `lo`, from the kernel's
/// `if_inet6` table (absent when the kernel has no IPv6). Pure over the table's text.
pub fn has_ipv6(if_inet6: Option<&str>) -> bool {
    if_inet6.is_some_and(|table| {
        table
            .lines()
            .filter_map(|line| line.split_whitespace().nth(5))
            .any(|iface| iface != "lo")
    })
}

fn read_if_inet6(proc_net: &Path) -> Option<String> {
    std::fs::read_to_string(proc_net.join("if_inet6")).ok()
}

/// The rules that close IPv6 TCP: (table, chain) rules and jumps, for [`install`]. Pure.
pub fn closed_rules() -> (Rules, Rules) {
    let a = super::args;
    (
        vec![(CLOSED_CHAIN, a("-p tcp -j REJECT --reject-with tcp-reset"))],
        vec![
            ("INPUT", a(&format!("! -i lo -p tcp -j {CLOSED_CHAIN}"))),
            ("OUTPUT", a(&format!("! -o lo -p tcp -j {CLOSED_CHAIN}"))),
        ],
    )
}

/// Every command that closing IPv6 runs, for `--dry-run`.
pub fn closed_script(binary: &str, o: &InitOptions) -> Vec<String> {
    let (rules, jumps) = closed_rules();
    let mut out = install_script(binary, "filter", &[CLOSED_CHAIN], rules, jumps);
    out.extend(udp_drop_script(binary, o));
    out
}

fn close(binary: &str, o: &InitOptions) -> Result<(), InitError> {
    let (rules, jumps) = closed_rules();
    install(binary, "filter", &[CLOSED_CHAIN], rules, jumps)?;
    install_udp_drop(binary, o)
}

/// Turns IPv6 off through `proc_sys_ipv6_conf` (`/proc/sys/net/ipv6/conf`), then checks that
/// no address outside `lo` remains.
fn disable(proc_sys_ipv6_conf: &Path, proc_net: &Path) -> Result<(), String> {
    for scope in ["all", "default"] {
        let path = proc_sys_ipv6_conf.join(scope).join("disable_ipv6");
        std::fs::write(&path, "1").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if has_ipv6(read_if_inet6(proc_net).as_deref()) {
        return Err("an IPv6 address remained after disable_ipv6=1".into());
    }
    Ok(())
}

/// Captures IPv6 with `binary`, or closes it, or turns it off; an error only when IPv6 stays
/// open after all three.
pub fn secure(binary: &str, o: &InitOptions) -> Result<Ipv6Outcome, InitError> {
    secure_at(
        binary,
        o,
        Path::new("/proc/net"),
        Path::new("/proc/sys/net/ipv6/conf"),
    )
}

fn secure_at(
    binary: &str,
    o: &InitOptions,
    proc_net: &Path,
    proc_sys_ipv6_conf: &Path,
) -> Result<Ipv6Outcome, InitError> {
    if !has_ipv6(read_if_inet6(proc_net).as_deref()) {
        return Ok(Ipv6Outcome::Absent);
    }
    let capture = match super::apply(binary, o, Family::V6) {
        Ok(()) => return Ok(Ipv6Outcome::Captured(binary.to_owned())),
        Err(e) => e.to_string(),
    };
    let closing = match close(binary, o) {
        Ok(()) => {
            return Ok(Ipv6Outcome::Closed {
                binary: binary.to_owned(),
                why: capture,
            });
        }
        Err(e) => e.to_string(),
    };
    match disable(proc_sys_ipv6_conf, proc_net) {
        Ok(()) => Ok(Ipv6Outcome::Disabled {
            why: format!("{capture}; then {closing}"),
        }),
        Err(off) => Err(InitError::Ipv6Open(format!(
            "capture failed ({capture}); closing it with rules failed ({closing}); turning it off failed ({off})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
00000000000000000000000000000001 01 80 10 80       lo
fd000077000000000000000000000003 02 40 00 80     eth0
fe80000000000000a8c1abfffe000003 02 40 20 80     eth0
";

    #[test]
    fn ipv6_counts_when_any_interface_but_lo_has_an_address() {
        assert!(has_ipv6(Some(TABLE)));
        assert!(
            has_ipv6(Some(&TABLE.replace(
                "fd000077000000000000000000000003 02 40 00 80     eth0\n",
                ""
            ))),
            "link-local alone counts"
        );
        assert!(!has_ipv6(Some(TABLE.lines().next().unwrap())));
        assert!(!has_ipv6(Some("")));
        assert!(!has_ipv6(None), "a kernel without IPv6");
    }

    #[test]
    fn closing_rejects_tcp_both_ways_off_loopback_and_drops_inbound_udp() {
        let s = closed_script("ip6tables", &InitOptions::default());
        for line in [
            "ip6tables -t filter -A PALISADE_IPV6_CLOSED -p tcp -j REJECT --reject-with tcp-reset",
            "ip6tables -t filter -A INPUT ! -i lo -p tcp -j PALISADE_IPV6_CLOSED",
            "ip6tables -t filter -A OUTPUT ! -o lo -p tcp -j PALISADE_IPV6_CLOSED",
            "ip6tables -t filter -A PALISADE_INBOUND_UDP -j DROP",
            "ip6tables -t filter -A INPUT -p udp -j PALISADE_INBOUND_UDP",
        ] {
            assert!(s.contains(&line.to_owned()), "{line} in {s:#?}");
        }
    }

    #[test]
    fn without_any_ip6tables_ipv6_is_turned_off_or_init_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (net, conf) = (dir.path().join("net"), dir.path().join("conf"));
        std::fs::create_dir_all(&net).unwrap();
        std::fs::write(net.join("if_inet6"), TABLE).unwrap();
        let secure = || {
            let o = InitOptions::default();
            secure_at("palisade-no-such-ip6tables", &o, &net, &conf)
        };
        // No writable conf directory: nothing works, and init says so rather than run open.
        let e = secure().unwrap_err().to_string();
        assert!(e.contains("IPv6") && e.contains("disable_ipv6"), "{e}");
        // A conf directory that takes the switch, but the address stays: still an error.
        for scope in ["all", "default"] {
            std::fs::create_dir_all(conf.join(scope)).unwrap();
        }
        let e = secure().unwrap_err().to_string();
        assert!(e.contains("remained"), "{e}");
        // Without IPv6 there is nothing to do.
        std::fs::write(net.join("if_inet6"), "").unwrap();
        assert_eq!(secure().unwrap(), Ipv6Outcome::Absent);
    }
}
