//! Prometheus Alertmanager's webhook payload (version 4), read natively: each alert in it
//! becomes one event.
//!
//! * `type`: `dev.portcullis.alert.firing` or `dev.portcullis.alert.resolved`, from the
//!   alert's own `status`;
//! * `source`: the payload's `externalURL` (the Alertmanager), or `alertmanager`;
//! * `subject`: the `alertname` label, then `/` and the `instance` label when it has one;
//! * `time`: `startsAt` when firing, `endsAt` when resolved;
//! * `id`: `am-` and 32 hex digits of SHA-256 over the alert's fingerprint, `startsAt` and
//!   status. Alertmanager resends a group on every `repeat_interval` and retries failed
//!   posts: the same alert in the same state has the same id, so it deduplicates;
//! * `data`: `{ alertname, status, labels, annotations, startsAt, endsAt, generatorURL,
//!   fingerprint, receiver, groupKey, externalURL }`.

use crate::error::ParseError;
use crate::event::{parse_rfc3339, Event};
use crate::types::{ALERT_FIRING, ALERT_RESOLVED};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The payload Alertmanager posts to a webhook receiver.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Payload {
    pub version: String,
    #[serde(default)]
    pub group_key: String,
    #[serde(default)]
    pub truncated_alerts: u64,
    pub status: String,
    pub receiver: String,
    #[serde(default)]
    pub group_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub common_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub common_annotations: BTreeMap<String, String>,
    #[serde(default, rename = "externalURL")]
    pub external_url: String,
    pub alerts: Vec<Alert>,
}

/// One alert of a [`Payload`].
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub status: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    pub starts_at: String,
    #[serde(default)]
    pub ends_at: String,
    #[serde(default, rename = "generatorURL")]
    pub generator_url: String,
    #[serde(default)]
    pub fingerprint: String,
}

/// Reads an Alertmanager webhook body into one event per alert.
pub fn parse(body: &[u8]) -> Result<Vec<Event>, ParseError> {
    let payload: Payload = serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ParseError::NotJson {
                what: "the body",
                reason: e.to_string(),
            }
        } else {
            ParseError::Alertmanager(e.to_string())
        }
    })?;
    events(&payload)
}

/// The events of a parsed payload.
pub fn events(payload: &Payload) -> Result<Vec<Event>, ParseError> {
    if payload.version != "4" {
        return Err(ParseError::Alertmanager(format!(
            "version `{}`: portcullis reads version 4 (Alertmanager 0.16 and later)",
            payload.version
        )));
    }
    // Alertmanager notifies only with alerts; a payload without any would be accepted as
    // nothing at all, so it is refused, as an empty batch of events is.
    if payload.alerts.is_empty() {
        return Err(ParseError::Alertmanager(
            "`alerts` is empty: a notification carries at least one alert".into(),
        ));
    }
    let source = if payload.external_url.is_empty() {
        "alertmanager".to_owned()
    } else {
        payload.external_url.clone()
    };
    payload
        .alerts
        .iter()
        .enumerate()
        .map(|(i, alert)| alert_event(payload, &source, i, alert))
        .collect()
}

fn alert_event(
    payload: &Payload,
    source: &str,
    index: usize,
    alert: &Alert,
) -> Result<Event, ParseError> {
    let at = |field: &str| format!("alerts[{index}].{field}");
    let (type_, time_field, time_value) = match alert.status.as_str() {
        "firing" => (ALERT_FIRING, "startsAt", &alert.starts_at),
        "resolved" => (ALERT_RESOLVED, "endsAt", &alert.ends_at),
        other => {
            return Err(ParseError::Alertmanager(format!(
                "{} is `{other}`, not `firing` or `resolved`",
                at("status")
            )))
        }
    };
    let time = parse_rfc3339(&at(time_field), time_value)?;
    parse_rfc3339(&at("startsAt"), &alert.starts_at)?;
    let alertname = alert.labels.get("alertname").cloned().unwrap_or_default();
    let mut subject = if alertname.is_empty() {
        "alert".to_owned()
    } else {
        alertname.clone()
    };
    if let Some(instance) = alert.labels.get("instance") {
        subject.push('/');
        subject.push_str(instance);
    }
    // Alertmanager always sends a fingerprint (a hash of the labels); without one, hash the
    // labels ourselves so the id is still stable.
    let fingerprint = if alert.fingerprint.is_empty() {
        let labels = serde_json::to_string(&alert.labels).unwrap_or_default();
        hex(&Sha256::digest(labels.as_bytes()))[..16].to_owned()
    } else {
        alert.fingerprint.clone()
    };
    let digest = Sha256::digest(format!(
        "{fingerprint}\n{}\n{}",
        alert.starts_at, alert.status
    ));
    let data: Value = json!({
        "alertname": alertname,
        "status": alert.status,
        "labels": alert.labels,
        "annotations": alert.annotations,
        "startsAt": alert.starts_at,
        "endsAt": alert.ends_at,
        "generatorURL": alert.generator_url,
        "fingerprint": fingerprint,
        "receiver": payload.receiver,
        "groupKey": payload.group_key,
        "externalURL": payload.external_url,
    });
    Ok(Event {
        id: format!("am-{}", &hex(&digest)[..32]),
        source: source.to_owned(),
        type_: type_.to_owned(),
        time,
        subject: Some(subject),
        data,
        causedby: None,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
