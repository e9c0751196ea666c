//! Events about the runtime's own health that no request reports: a listener certificate
//! within [`EXPIRY_WARNING`] of its end (`certificate.expiring`), and an identity provider
//! whose keys could not be fetched (`jwks.refresh_failed`). One task looks, while anything
//! listens on the bus: key fetches every [`KEYS_EVERY`] (one event per new failure, with the
//! failures in a row), certificates at start and every [`CERTS_EVERY`] (one event per
//! certificate and day, so a long-lived warning does not flood the sinks), both against the
//! serving snapshot, so a reload is picked up.

use crate::Shared;
use portcullis_events::types::{CertificateExpiring, JwksRefreshFailed};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A certificate this close to its end is reported.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);
/// How often key fetches are looked at.
pub const KEYS_EVERY: Duration = Duration::from_secs(2);
/// How often certificates are read.
pub const CERTS_EVERY: Duration = Duration::from_secs(3600);

/// Starts the task (once, at start).
pub fn start(shared: &Arc<Shared>) {
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut seen_failures: HashMap<String, u64> = HashMap::new();
        let mut reported: HashMap<String, i64> = HashMap::new();
        let mut certs_at: Option<tokio::time::Instant> = None;
        loop {
            if shared.events.active() {
                keys(&shared, &mut seen_failures);
                if certs_at.is_none_or(|t| t.elapsed() >= CERTS_EVERY) {
                    certs_at = Some(tokio::time::Instant::now());
                    let config = shared.snapshot.load().config.clone();
                    let found =
                        tokio::task::spawn_blocking(move || expiring(&config, SystemTime::now()))
                            .await
                            .unwrap_or_default();
                    let day = unix(SystemTime::now()) / 86_400;
                    for c in found {
                        if reported.get(&c.certificate) != Some(&day) {
                            reported.insert(c.certificate.clone(), day);
                            tracing::warn!(certificate = %c.certificate, days_left = c.days_left, not_after = %c.not_after, "a certificate is about to expire");
                            shared
                                .events
                                .emit(shared.events.source.certificate_expiring(c));
                        }
                    }
                }
            }
            tokio::time::sleep(KEYS_EVERY).await;
        }
    });
}

/// One event per provider whose failure count grew since the last look.
fn keys(shared: &Shared, seen: &mut HashMap<String, u64>) {
    let snap = shared.snapshot.load();
    for (name, p) in snap.identity.providers() {
        let Some(ks) = p.key_source() else { continue };
        let h = ks.health();
        let before = seen.insert(name.clone(), h.failures).unwrap_or(0);
        if h.failures <= before {
            continue;
        }
        let Some((_, error)) = h.last_error else {
            continue;
        };
        let data = JwksRefreshFailed {
            provider: name.clone(),
            uri: ks.uri(),
            error,
            failures: h.in_a_row.max(1),
            last_success: h.last_ok.map(rfc3339),
        };
        shared
            .events
            .emit(shared.events.source.jwks_refresh_failed(data));
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The listener certificates of `config` that end within [`EXPIRY_WARNING`] of `now` (or have
/// ended). A file that cannot be read or parsed is skipped (the listener refused it already).
pub fn expiring(config: &portcullis_config::Config, now: SystemTime) -> Vec<CertificateExpiring> {
    let mut out = Vec::new();
    for l in &config.listeners {
        for pair in l.tls.iter().flat_map(|t| &t.certificates) {
            if let Some(c) = leaf(Path::new(&pair.cert), now) {
                out.push(c);
            }
        }
    }
    out
}

/// The first certificate of a PEM file, if it ends within the warning period.
fn leaf(file: &Path, now: SystemTime) -> Option<CertificateExpiring> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::pem_file_iter(file)
        .ok()?
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let not_after = cert.validity().not_after.timestamp();
    let left = not_after - unix(now);
    if left > i64::try_from(EXPIRY_WARNING.as_secs()).unwrap_or(i64::MAX) {
        return None;
    }
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(CertificateExpiring {
        certificate: file.display().to_string(),
        names,
        not_after: rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64)),
        days_left: left.div_euclid(86_400),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(dir: &Path, days: i64) -> std::path::PathBuf {
        let mut params =
            rcgen::CertificateParams::new(vec!["api.example.test".to_string()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(days);
        let key = rcgen::KeyPair::generate().unwrap();
        let c = params.self_signed(&key).unwrap();
        let f = dir.join(format!("c{days}.pem"));
        std::fs::write(&f, c.pem()).unwrap();
        f
    }

    #[test]
    fn a_certificate_is_reported_within_fourteen_days_of_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        assert!(leaf(&cert(dir.path(), 90), now).is_none());
        let c = leaf(&cert(dir.path(), 10), now).unwrap();
        assert!((9..=10).contains(&c.days_left), "{c:?}");
        assert_eq!(c.names, vec!["api.example.test"]);
        assert!(leaf(Path::new("/nonexistent.pem"), now).is_none());
    }
}
