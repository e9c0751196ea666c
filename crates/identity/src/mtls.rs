//! Identity from a verified client certificate (the listener's `client_auth` already checked
//! the chain): the first present of SAN URI (SPIFFE IDs), SAN DNS name or subject CN, in the
//! provider's `identity_from` order.

use crate::{AuthError, AuthMethod, Identity};
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::*;

pub fn identity(provider: &str, from: &[String], der: &[u8]) -> Result<Identity, AuthError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|_| AuthError::new("client certificate cannot be parsed"))?;
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            // An empty name names no one (as an empty token subject does): the next field
            // of `identity_from` is asked instead.
            match n {
                GeneralName::URI(u) if !u.trim().is_empty() => uris.push(u.to_string()),
                GeneralName::DNSName(d) if !d.trim().is_empty() => dns.push(d.to_string()),
                _ => {}
            }
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .filter(|c| !c.trim().is_empty())
        .map(String::from);
    let chosen = from.iter().find_map(|f| match f.as_str() {
        "uri" => uris.first().cloned(),
        "dns" => dns.first().cloned(),
        "cn" => cn.clone(),
        _ => None,
    });
    let subject = chosen.ok_or_else(|| {
        AuthError::new("client certificate has none of the configured identity fields")
    })?;
    let fingerprint = crate::dev::hex(&Sha256::digest(der));
    let spiffe = uris.iter().find(|u| u.starts_with("spiffe://")).cloned();
    Ok(Identity {
        provider: provider.to_string(),
        method: AuthMethod::Mtls,
        user: subject.clone(),
        email: None,
        groups: Vec::new(),
        claims: serde_json::json!({
            "sub": subject, "uris": uris, "dns": dns, "cn": cn, "spiffe_id": spiffe,
            "fingerprint_sha256": fingerprint, "serial": cert.raw_serial_as_string(),
        }),
        expires_at: Some(cert.validity().not_after.timestamp().max(0) as u64),
        subject,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_uri_then_dns_then_cn() {
        let mut p = rcgen::CertificateParams::new(vec!["svc.internal".to_string()]).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.org/ns/prod/sa/billing"
                .try_into()
                .unwrap(),
        ));
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "billing");
        let kp = rcgen::KeyPair::generate().unwrap();
        let c = p.self_signed(&kp).unwrap();
        let all = ["uri".to_string(), "dns".into(), "cn".into()];
        let id = identity("mesh", &all, c.der()).unwrap();
        assert_eq!(id.subject, "spiffe://example.org/ns/prod/sa/billing");
        assert_eq!(
            id.claims["spiffe_id"],
            "spiffe://example.org/ns/prod/sa/billing"
        );
        assert_eq!(
            identity("mesh", &["dns".into()], c.der()).unwrap().subject,
            "svc.internal"
        );
        assert_eq!(
            identity("mesh", &["cn".into()], c.der()).unwrap().subject,
            "billing"
        );
    }

    /// An empty SAN names no one: the next configured field is used, or none.
    #[test]
    fn an_empty_name_is_skipped() {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names
            .push(rcgen::SanType::DnsName("".try_into().unwrap()));
        p.subject_alt_names
            .push(rcgen::SanType::URI(" ".try_into().unwrap()));
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "fallbackcn");
        let kp = rcgen::KeyPair::generate().unwrap();
        let c = p.self_signed(&kp).unwrap();
        let all = ["uri".to_string(), "dns".into(), "cn".into()];
        assert_eq!(
            identity("mesh", &all, c.der()).unwrap().subject,
            "fallbackcn"
        );
        assert!(identity("mesh", &["dns".into(), "uri".into()], c.der()).is_err());
    }
}
