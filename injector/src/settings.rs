//! What every injected pod gets unless an annotation overrides it: the proxy image, how to reach
//! the CA, sidecar mode and the proxy's resources. Built from the command line (`serve`), checked
//! once in [`InjectorSettings::validate`], then shared read-only by every review.

use std::sync::Arc;

use crate::annotations::{self, PodOverrides, Quantity, ValueError};
use crate::sidecar::{Prebuilt, ProxyResources, SidecarDefaults};

use palisade_ca_api::contract::{self, DEFAULT_CA_NAMESPACE, DEFAULT_TRUST_DOMAIN};
use palisade_ca_api::spiffe::validate_trust_domain;

/// The injector's defaults, validated. Built only by [`RawSettings::validate`], which also
/// renders the injected objects once for pods without overrides; the fields are read-only
/// outside this crate so that rendering cannot go stale.
#[derive(Debug, Clone)]
pub struct InjectorSettings {
    /// What the injected objects carry (image, CA, trust domain, sidecar mode, log level).
    pub(crate) sidecar: SidecarDefaults,
    pub(crate) cpu_request: Quantity,
    pub(crate) cpu_limit: Option<Quantity>,
    pub(crate) memory_request: Quantity,
    pub(crate) memory_limit: Quantity,
    /// The families the nodes capture: a skipped range of another family is refused.
    pub(crate) ip_families: IpFamilies,
    /// The injected objects of a pod without overrides, serialised once: most pods have none,
    /// and rebuilding them per review was most of a review's CPU time.
    pub(crate) prebuilt: Arc<Prebuilt>,
}

/// The settings as typed on the command line, before validation.
#[derive(Debug, Clone)]
pub struct RawSettings {
    pub proxy_image: String,
    pub ca_addr: String,
    pub ca_name: String,
    pub trust_domain: String,
    pub native_sidecar: bool,
    pub cpu_request: String,
    pub cpu_limit: Option<String>,
    pub memory_request: String,
    pub memory_limit: String,
    pub log_level: String,
    /// The families the nodes capture (`IPv4`, `IPv6`, comma-separated).
    pub ip_families: String,
}

impl Default for RawSettings {
    fn default() -> Self {
        Self {
            proxy_image: concat!("palisade-proxy:", env!("CARGO_PKG_VERSION")).to_owned(),
            ca_addr: contract::ca_addr(DEFAULT_CA_NAMESPACE),
            ca_name: contract::ca_dns_name(DEFAULT_CA_NAMESPACE),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            native_sidecar: true,
            cpu_request: "100m".to_owned(),
            cpu_limit: None,
            memory_request: "64Mi".to_owned(),
            memory_limit: "256Mi".to_owned(),
            log_level: "info".to_owned(),
            ip_families: "IPv4,IPv6".to_owned(),
        }
    }
}

/// Which address families the cluster's nodes can capture (`--ip-families`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpFamilies {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl IpFamilies {
    pub fn parse(flag: &str, text: &str) -> Result<IpFamilies, ValueError> {
        let mut families = IpFamilies {
            ipv4: false,
            ipv6: false,
        };
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item {
                "IPv4" => families.ipv4 = true,
                "IPv6" => families.ipv6 = true,
                other => {
                    return Err(ValueError::new(
                        flag,
                        text,
                        format!("{other:?} is not an address family"),
                        "IPv4, IPv6 or IPv4,IPv6 (spelled as a Service's ipFamilies)",
                    ));
                }
            }
        }
        if !families.ipv4 && !families.ipv6 {
            return Err(ValueError::new(
                flag,
                text,
                "no family given",
                "IPv4, IPv6 or IPv4,IPv6 (spelled as a Service's ipFamilies)",
            ));
        }
        Ok(families)
    }

    pub fn captures(&self, ipv4: bool) -> bool {
        if ipv4 { self.ipv4 } else { self.ipv6 }
    }
}

impl RawSettings {
    /// Checks each value and the relations between them; errors name the flag.
    pub fn validate(&self) -> Result<InjectorSettings, ValueError> {
        let flag_error = |flag: &str, value: &str, reason: &str, accepted| ValueError {
            setting: flag.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
            accepted,
        };
        if self.proxy_image.trim().is_empty() || self.proxy_image.contains(char::is_whitespace) {
            return Err(flag_error(
                "--proxy-image",
                &self.proxy_image,
                "not an image reference",
                "an image reference such as \"registry.example/palisade-proxy:0.1.0\"",
            ));
        }
        match self.ca_addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => {
                return Err(flag_error(
                    "--ca-addr",
                    &self.ca_addr,
                    "not host:port",
                    "host:port, e.g. \"palisade-ca.palisade-system.svc:15012\" (the CA's Service)",
                ));
            }
        }
        if self.ca_name.is_empty()
            || self
                .ca_name
                .contains(|c: char| c.is_whitespace() || c == ':')
        {
            return Err(flag_error(
                "--ca-name",
                &self.ca_name,
                "not a DNS name",
                "the DNS name on the CA's certificate, e.g. \"palisade-ca.palisade-system.svc\"",
            ));
        }
        if let Err(e) = validate_trust_domain(&self.trust_domain) {
            return Err(flag_error(
                "--trust-domain",
                &self.trust_domain,
                &e.to_string(),
                "the trust domain the CA was started with (chart value trustDomain), e.g. \"cluster.local\"",
            ));
        }
        let mut settings = InjectorSettings {
            sidecar: SidecarDefaults {
                proxy_image: self.proxy_image.clone(),
                ca_addr: self.ca_addr.clone(),
                ca_name: self.ca_name.clone(),
                trust_domain: self.trust_domain.clone(),
                native_sidecar: self.native_sidecar,
                log_level: annotations::parse_log_level("--proxy-log-level", &self.log_level)?,
            },
            cpu_request: Quantity::cpu("--proxy-cpu-request", &self.cpu_request)?,
            cpu_limit: self
                .cpu_limit
                .as_deref()
                .map(|v| Quantity::cpu("--proxy-cpu-limit", v))
                .transpose()?,
            memory_request: Quantity::memory("--proxy-memory-request", &self.memory_request)?,
            memory_limit: Quantity::memory("--proxy-memory-limit", &self.memory_limit)?,
            ip_families: IpFamilies::parse("--ip-families", &self.ip_families)?,
            prebuilt: Arc::default(),
        };
        let resources = settings.resources(None, None).map_err(|e| ValueError {
            setting: e.setting.replace("palisade.dev/proxy-", "--proxy-"),
            ..e
        })?;
        settings.prebuilt = Arc::new(Prebuilt::new(
            &settings.sidecar,
            &PodOverrides::default(),
            resources,
        ));
        Ok(settings)
    }
}

impl InjectorSettings {
    pub fn native_sidecar(&self) -> bool {
        self.sidecar.native_sidecar
    }

    pub fn proxy_image(&self) -> &str {
        &self.sidecar.proxy_image
    }

    pub fn ca_addr(&self) -> &str {
        &self.sidecar.ca_addr
    }

    pub fn trust_domain(&self) -> &str {
        &self.sidecar.trust_domain
    }

    /// Resources with a pod's overrides applied. A request above its limit would make the API
    /// server reject the pod with a message about our container, so it is refused here with
    /// one about the annotation instead.
    pub fn resources(
        &self,
        cpu_request: Option<&Quantity>,
        memory_limit: Option<&Quantity>,
    ) -> Result<ProxyResources, ValueError> {
        let resources = ProxyResources {
            cpu_request: cpu_request.unwrap_or(&self.cpu_request).clone(),
            cpu_limit: self.cpu_limit.clone(),
            memory_request: self.memory_request.clone(),
            memory_limit: memory_limit.unwrap_or(&self.memory_limit).clone(),
        };
        if let Some(limit) = &resources.cpu_limit
            && resources.cpu_request.milli > limit.milli
        {
            return Err(ValueError {
                setting: annotations::PROXY_CPU_REQUEST.to_owned(),
                value: resources.cpu_request.text.clone(),
                reason: format!("it is above the proxy's CPU limit {}", limit.text),
                accepted: "a CPU quantity no larger than the injector's --proxy-cpu-limit",
            });
        }
        if resources.memory_limit.milli < resources.memory_request.milli {
            return Err(ValueError {
                setting: annotations::PROXY_MEMORY_LIMIT.to_owned(),
                value: resources.memory_limit.text.clone(),
                reason: format!(
                    "it is below the proxy's memory request {}",
                    resources.memory_request.text
                ),
                accepted: "a memory quantity no smaller than the injector's --proxy-memory-request",
            });
        }
        Ok(resources)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let s = RawSettings::default().validate().unwrap();
        assert!(s.native_sidecar());
        assert_eq!(s.memory_limit.text, "256Mi");
    }

    #[test]
    fn bad_flags_are_named() {
        type Breaker = fn(&mut RawSettings);
        let cases: [(&str, Breaker); 6] = [
            ("--trust-domain", |r| r.trust_domain = "Prod Example".into()),
            ("--ca-addr", |r| r.ca_addr = "no-port".into()),
            ("--proxy-image", |r| r.proxy_image = " ".into()),
            ("--proxy-cpu-request", |r| r.cpu_request = "lots".into()),
            ("--proxy-log-level", |r| r.log_level = "loud".into()),
            ("--proxy-memory-limit", |r| r.memory_limit = "1Mi".into()),
        ];
        for (flag, break_it) in cases {
            let mut raw = RawSettings::default();
            break_it(&mut raw);
            let err = raw.validate().unwrap_err();
            assert_eq!(err.setting, flag, "{err}");
        }
    }

    #[test]
    fn memory_limit_below_request_is_refused_naming_the_annotation() {
        let s = RawSettings::default().validate().unwrap();
        let low = Quantity::memory("x", "32Mi").unwrap();
        let err = s.resources(None, Some(&low)).unwrap_err();
        assert_eq!(err.setting, annotations::PROXY_MEMORY_LIMIT);
        assert!(err.to_string().contains("64Mi"), "{err}");
    }

    #[test]
    fn cpu_request_above_limit_is_refused() {
        let raw = RawSettings {
            cpu_limit: Some("500m".into()),
            ..RawSettings::default()
        };
        let s = raw.validate().unwrap();
        let high = Quantity::cpu("x", "1").unwrap();
        assert!(s.resources(Some(&high), None).is_err());
        let ok = Quantity::cpu("x", "500m").unwrap();
        assert_eq!(
            s.resources(Some(&ok), None).unwrap().cpu_request.text,
            "500m"
        );
    }
}
