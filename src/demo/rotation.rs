//! The demo's live rotation: shop/web keeps calling the Service shop/api while its proxy and
//! both api replicas' proxies renew their certificates, and every failed request is counted.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

use super::AFTER_ROTATION;
use super::progress::Progress;
use super::report::{CaRotation, RotationRow, Traffic};
use super::traffic::{admin_get, get};
use super::world::{Proxy, WEB, World};

/// Keeps shop/web calling shop/api until the three proxies on the way have renewed their
/// certificates (and a little longer), counting every request that fails.
pub(super) async fn rotation(
    world: &World,
    progress: &Progress,
) -> anyhow::Result<(Vec<RotationRow>, Traffic)> {
    let proxies = [&world.web, &world.api, &world.api_2];
    let mut renewals = Renewals::start(&proxies).await?;
    progress.step(
        "rotation: shop/web keeps calling shop/api while the proxies of web, api-1 and api-2 renew their certificates",
    );
    let started = Instant::now();
    // The renewal comes at 60% of the lifetime at the latest; the certificate expires at 100%.
    let deadline = started + world.cert_ttl;
    let mut calls = Calls::default();
    let mut polled = started;
    let mut all_renewed_at = None;
    loop {
        calls.make(world).await;
        if polled.elapsed() >= Duration::from_millis(250) {
            polled = Instant::now();
            let renewed = renewals.poll(&proxies, progress).await?;
            progress.detail(&format!(
                "rotation: {} requests, {} failed; {renewed} of {} proxies renewed ({:.0}s of at most {}s)",
                calls.traffic.requests,
                calls.traffic.failed,
                proxies.len(),
                started.elapsed().as_secs_f64(),
                world.cert_ttl.as_secs()
            ));
            if renewed == proxies.len() {
                all_renewed_at.get_or_insert_with(Instant::now);
            }
        }
        if all_renewed_at.is_some_and(|t| t.elapsed() >= AFTER_ROTATION) {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "the proxies of {} did not renew their certificates within {:?} (the certificates' lifetime)",
                renewals.late(&proxies).join(" and "),
                world.cert_ttl
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let traffic = calls.none_failed("the rotation")?;
    Ok((renewals.rows(&proxies), traffic))
}

/// The CA replaces its intermediate while shop/web keeps calling shop/api: the phases the CA
/// goes through and how long each took, with every failed request counted.
pub(super) async fn intermediate_rotation(
    world: &World,
    progress: &Progress,
) -> anyhow::Result<CaRotation> {
    use palisade_ca::rotation::{Kind, Trigger};
    let rotation = world.ca.ca.rotation.clone();
    let before = rotation.status().issuing_intermediate;
    progress.step("intermediate rotation: the CA replaces its intermediate while shop/web keeps calling shop/api");
    rotation
        .begin(
            Kind::Intermediate,
            Trigger::Manual,
            time::OffsetDateTime::now_utc(),
        )
        .context("the CA did not start the intermediate rotation")?;
    let started = Instant::now();
    let deadline = started + 3 * world.cert_ttl;
    let mut calls = Calls::default();
    let mut phases: Vec<(String, Instant)> = vec![(rotation.status().phase, started)];
    loop {
        calls.make(world).await;
        let phase = rotation.status().phase;
        if phases.last().is_some_and(|(p, _)| *p != phase) {
            progress.detail(&format!("intermediate rotation: {phase}"));
            phases.push((phase.clone(), Instant::now()));
        }
        if phase == "idle" {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "the intermediate rotation did not finish within {:?}: it is {phase}, waiting for {:?}",
                deadline - started,
                rotation.status().proxies.lagging
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let traffic = calls.none_failed("the intermediate rotation")?;
    let after = rotation.status().issuing_intermediate;
    Ok(CaRotation {
        before,
        after,
        phases: phases
            .windows(2)
            .map(|w| (w[0].0.clone(), (w[1].1 - w[0].1).as_secs_f64()))
            .collect(),
        traffic,
    })
}

/// shop/web's calls to shop/api while something rotates, and the first failure.
#[derive(Default)]
struct Calls {
    traffic: Traffic,
    first_failure: Option<String>,
}

impl Calls {
    async fn make(&mut self, world: &World) {
        let outcome = get(Some(WEB.ip), world.web.bound.outbound, "/orders").await;
        self.traffic.requests += 1;
        if !outcome.is_ok() {
            self.traffic.failed += 1;
            self.first_failure
                .get_or_insert_with(|| outcome.to_string());
        }
    }

    /// The traffic, or an error naming the first failure.
    fn none_failed(self, during: &str) -> anyhow::Result<Traffic> {
        if self.traffic.failed > 0 {
            bail!(
                "{} of {} requests from shop/web to shop/api failed during {during}; the first: {}",
                self.traffic.failed,
                self.traffic.requests,
                self.first_failure.unwrap_or_default()
            );
        }
        Ok(self.traffic)
    }
}

/// Each proxy's serial before the rotation, and the new one with when it was first seen.
struct Renewals {
    before: Vec<String>,
    after: Vec<Option<(String, f64)>>,
}

impl Renewals {
    async fn start(proxies: &[&Proxy]) -> anyhow::Result<Self> {
        let mut before = Vec::new();
        for p in proxies {
            before.push(serial(p.bound.admin).await?);
        }
        Ok(Renewals {
            after: vec![None; before.len()],
            before,
        })
    }

    /// Looks at every proxy's serial again; returns how many have renewed.
    async fn poll(&mut self, proxies: &[&Proxy], progress: &Progress) -> anyhow::Result<usize> {
        for (i, p) in proxies.iter().enumerate() {
            let now = serial(p.bound.admin).await?;
            if self.after[i].is_none() && now != self.before[i] {
                self.after[i] = Some((now, progress.elapsed()));
            }
        }
        Ok(self.after.iter().filter(|a| a.is_some()).count())
    }

    /// The workloads whose proxies have not renewed.
    fn late(&self, proxies: &[&Proxy]) -> Vec<String> {
        proxies
            .iter()
            .zip(&self.after)
            .filter(|(_, a)| a.is_none())
            .map(|(p, _)| p.workload.workload())
            .collect()
    }

    fn rows(self, proxies: &[&Proxy]) -> Vec<RotationRow> {
        proxies
            .iter()
            .zip(self.before)
            .zip(self.after)
            .filter_map(|((p, before), after)| {
                after.map(|(after, seen_at)| RotationRow {
                    workload: p.workload.workload(),
                    before,
                    after,
                    seen_at,
                })
            })
            .collect()
    }
}

/// The serial of the certificate a proxy presents now, from its `/identity`.
async fn serial(admin: SocketAddr) -> anyhow::Result<String> {
    let body = admin_get(admin, "/identity")
        .await
        .map_err(|e| anyhow!(e))?;
    let v: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("/identity answered {body:?}"))?;
    v["serial"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("/identity of {admin} has no serial: {body}"))
}
