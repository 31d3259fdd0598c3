//! The value forms that flags, environment variables and annotations share. Each parser returns
//! the reason a value is refused and the form to write instead; the caller adds the name of the
//! flag, variable or annotation that carried it.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

/// Parses `500ms`, `90s`, `30m`, `1h`, `2d` and sums like `1h30m`. Zero is a duration; callers
/// that need a positive one say so themselves.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration: write e.g. 500ms, 90s, 30m, 1h or 1h30m");
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (number, tail) = rest.split_at(digits);
        let n: u64 = number.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
        rest = next;
    }
    Ok(total)
}

/// The shortest text [`parse_duration`] reads back as `d` (whole seconds; `ms` below one).
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 && d.subsec_millis() > 0 {
        return format!("{}ms", d.subsec_millis());
    }
    match (s / 3600, s % 3600 / 60, s % 60) {
        (h, 0, 0) if h > 0 => format!("{h}h"),
        (0, m, 0) if m > 0 => format!("{m}m"),
        (h, m, 0) if h > 0 => format!("{h}h{m}m"),
        _ => format!("{s}s"),
    }
}

/// Parses `P,P,...` (empty is none) into sorted, distinct ports 1-65535.
/// A switch: `true` or `false`; empty (an absent annotation through the downward API) is false.
pub fn parse_switch(text: &str) -> Result<bool, String> {
    match text.trim() {
        "" | "false" => Ok(false),
        "true" => Ok(true),
        other => Err(format!("{other:?} is not a switch: write true or false")),
    }
}

pub fn parse_ports(text: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u16>() {
            Ok(port) if port != 0 => ports.push(port),
            _ => {
                return Err(format!(
                    "{item:?} is not a port 1-65535; write ports comma-separated, like 22,3306"
                ));
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// An address range whose traffic capture leaves alone, of either family: `10.0.0.0/8`,
/// `fd00::/8`; a bare address is a single host (`/32` or `/128`). The injector's annotation and
/// `init`'s flag read it with this one parser, so a pod the injector admits never fails `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(item: &str) -> Result<Self, String> {
        const FORM: &str = "write CIDRs of either family comma-separated, like 10.0.0.0/8,169.254.169.254/32,fd00::/8";
        let (addr, len) = match item.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (item, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{item:?} is not an IPv4 or IPv6 address; {FORM}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{item:?} has a prefix length outside 0-{max}; {FORM}"))?,
        };
        Ok(Cidr { addr, prefix_len })
    }
}

/// Parses `CIDR,CIDR,...` (empty is none).
pub fn parse_cidrs(text: &str) -> Result<Vec<Cidr>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::parse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit_and_sums() {
        let cases = [
            ("500ms", Duration::from_millis(500)),
            ("90s", Duration::from_secs(90)),
            ("30m", Duration::from_secs(1800)),
            ("1h", Duration::from_secs(3600)),
            ("1h30m", Duration::from_secs(5400)),
            ("2d", Duration::from_secs(172_800)),
            ("1s500ms", Duration::from_millis(1500)),
            ("0s", Duration::ZERO),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "1", "h", "1x", "-1h", "1.5s", "s1", "1h 30m", "ms"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("1h30m"), "{bad}: {err}");
        }
    }

    #[test]
    fn formatted_durations_read_back() {
        for secs in [1, 59, 60, 90, 3600, 5400, 86_400] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(200)), "200ms");
    }

    #[test]
    fn ports_are_sorted_and_distinct() {
        assert_eq!(parse_ports(" 8080, 22,8080 ,"), Ok(vec![22, 8080]));
        assert_eq!(parse_ports(""), Ok(vec![]));
        for bad in ["0", "65536", "http", "22;23"] {
            assert!(parse_ports(bad).unwrap_err().contains("22,3306"), "{bad}");
        }
    }

    #[test]
    fn cidrs_of_both_families_with_a_default_prefix() {
        let parsed = parse_cidrs("10.0.0.0/8, 169.254.169.254, fd00::/8, fd00:ec2::254").unwrap();
        let text: Vec<String> = parsed.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "10.0.0.0/8",
                "169.254.169.254/32",
                "fd00::/8",
                "fd00:ec2::254/128"
            ]
        );
        assert_eq!(
            parsed.iter().map(Cidr::is_ipv4).collect::<Vec<_>>(),
            [true, true, false, false]
        );
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/",
            "fd00::/129",
            "fd00:::1/64",
            "[fd00::1]/64",
            "fe80::1%eth0",
        ] {
            let e = parse_cidrs(bad).unwrap_err();
            assert!(e.contains("fd00::/8"), "{bad}: {e}");
        }
        assert!(parse_cidrs("fd00::/129").unwrap_err().contains("0-128"));
    }
}
