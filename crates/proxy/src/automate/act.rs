//! The proxy's [`Control`] for automation: each action of a firing becomes a
//! [`Command`] applied by [`control::apply`] as the trigger's principal, so it is validated,
//! audited and logged like an operator's command. `emit` publishes on the bus, `webhook` POSTs
//! the firing, and the actions this build does not run (`revoke_sessions`,
//! `start_workflow`, refused by `portcullis check` anyway) fail.
//!
//! `execute` is synchronous: it runs on a blocking thread, and each async step is driven
//! there with the runtime's handle.

use super::{BlockEnd, Firings, Hops};
use crate::control::{self, Command, Principal, PrincipalKind};
use crate::state::AdminState;
use crate::Runtime;
use parking_lot::Mutex;
use portcullis_automation::{Action, ActionError, Control, Firing, ServerState, ServerView};
use portcullis_events::Event;
use std::sync::Arc;

/// The control path, for one firing.
pub struct ProxyControl {
    rt: Arc<Runtime>,
    handle: tokio::runtime::Handle,
    hops: Arc<Mutex<Hops>>,
    store: Arc<Firings>,
    /// Blocks this firing started: (due, store key, what to end).
    pub block_ends: Vec<(i64, String, BlockEnd)>,
}

impl ProxyControl {
    pub fn new(
        rt: Arc<Runtime>,
        handle: tokio::runtime::Handle,
        hops: Arc<Mutex<Hops>>,
        store: Arc<Firings>,
    ) -> ProxyControl {
        ProxyControl {
            rt,
            handle,
            hops,
            store,
            block_ends: Vec::new(),
        }
    }

    fn command(&self, firing: &Firing, cmd: Command) -> Result<serde_json::Value, ActionError> {
        let by = Principal::automation(firing.trigger.clone(), PrincipalKind::Trigger);
        self.handle
            .block_on(control::apply(&self.rt, &by, cmd))
            .map_err(|e| match e {
                // Refused by `admin.policies`: recorded by the control path, not run.
                control::ControlError::Forbidden(why) => ActionError::Denied(why),
                e => ActionError::Failed(e.to_string()),
            })
    }
}

fn admin_state(s: ServerState) -> AdminState {
    match s {
        ServerState::Ready => AdminState::Ready,
        ServerState::Drain => AdminState::Drain,
        ServerState::Maint => AdminState::Maint,
    }
}

fn server_state(s: AdminState) -> ServerState {
    match s {
        AdminState::Ready => ServerState::Ready,
        AdminState::Drain => ServerState::Drain,
        AdminState::Maint => ServerState::Maint,
    }
}

/// The servers of `backend` as the guard rails see them (for triggers and workflows).
pub fn server_views(rt: &Runtime, backend: &str) -> Option<Vec<ServerView>> {
    let snap = rt.shared.snapshot.load();
    let b = control::find_backend(&snap, backend).ok()?;
    Some(
        b.servers
            .iter()
            .zip(&b.slots)
            .map(|(s, slot)| ServerView {
                name: s.name.clone(),
                state: server_state(slot.state.admin_state()),
                healthy: slot.state.healthy() && !slot.state.ejected(),
            })
            .collect(),
    )
}

impl Control for ProxyControl {
    fn servers(&mut self, backend: &str) -> Option<Vec<ServerView>> {
        server_views(&self.rt, backend)
    }

    fn apply(&mut self, firing: &Firing, action: &Action) -> Result<(), ActionError> {
        let cmd = match action {
            Action::SetServerState(a) => Command::SetServerState {
                backend: a.backend.clone(),
                server: a.server.clone(),
                state: admin_state(a.state),
            },
            Action::SetServerWeight(a) => Command::SetServerWeight {
                backend: a.backend.clone(),
                server: a.server.clone(),
                weight: a.weight,
            },
            Action::SwitchRoute(a) => Command::SwitchRoute {
                route: a.route.clone(),
                backend: a.backend.clone(),
            },
            Action::RestoreRoute(a) => Command::RestoreRoute {
                route: a.route.clone(),
            },
            Action::SetTable(a) => match (&a.tag, a.gpc0) {
                (Some(tag), _) => Command::SetTableTag {
                    table: a.table.clone(),
                    key: a.key.clone(),
                    tag: tag.clone(),
                },
                (None, gpc0) => Command::SetTableGpc {
                    table: a.table.clone(),
                    key: a.key.clone(),
                    value: gpc0.unwrap_or(0),
                },
            },
            Action::ClearTable(a) => Command::ClearTableKey {
                table: a.table.clone(),
                key: a.key.clone(),
            },
            Action::Block(a) => return self.block(firing, a),
            Action::Reload(_) => Command::Reload,
            Action::Emit(e) => {
                let mut ev = Event::new(
                    self.rt.shared.events.source.as_str(),
                    e.type_.clone(),
                    e.data.clone(),
                )
                .caused_by(firing.cause_event_id.clone());
                ev.subject = e.subject.clone();
                self.hops.lock().note(ev.id.clone(), firing.hop);
                self.rt.shared.events.emit(ev);
                return Ok(());
            }
            Action::Webhook(w) => return self.webhook(firing, &w.url),
            Action::StartWorkflow(w) => return self.start_workflow(firing, w),
            Action::RevokeSessions(r) => Command::RevokeSessions {
                principal: r.principal.clone(),
            },
        };
        self.command(firing, cmd).map(drop)
    }
}

impl ProxyControl {
    /// Starts an execution of the workflow, named after the firing (so a firing run again
    /// finds the same execution), as the trigger's principal.
    fn start_workflow(
        &mut self,
        firing: &Firing,
        w: &portcullis_automation::config::StartWorkflow,
    ) -> Result<(), ActionError> {
        let Some(svc) = self.rt.workflows.service().cloned() else {
            return Err(ActionError::Failed(
                "no workflows are configured (add `workflows:`)".into(),
            ));
        };
        let by = Principal::automation(firing.trigger.clone(), PrincipalKind::Trigger);
        let args = serde_json::json!({ "workflow": w.name });
        let allowed = self
            .handle
            .block_on(control::authorize_start(&self.rt, &by, &w.name, args));
        if let Err(e) = allowed {
            return Err(match e {
                control::ControlError::Forbidden(why) => ActionError::Denied(why),
                e => ActionError::Failed(e.to_string()),
            });
        }
        let digest = <sha2::Sha256 as sha2::Digest>::digest(firing.idempotency_key.as_bytes());
        let name: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        let input = if w.input.is_null() {
            serde_json::json!({ "trigger": firing.trigger, "event": firing.cause_event_id, "group": firing.group })
        } else {
            w.input.clone()
        };
        let by = portcullis_automation::workflow::runner::Starter {
            principal: format!("Portcullis::Trigger::\"{}\"", firing.trigger),
            parent: None,
            parent_key: None,
            hops: firing.hop,
        };
        let started = self
            .handle
            .block_on(svc.start(&self.rt, &w.name, Some(name), input, by));
        match started {
            Ok(_) => Ok(()),
            Err(portcullis_automation::workflow::runner::StartError::AlreadyExists { .. }) => {
                Ok(())
            }
            Err(e) => Err(ActionError::Failed(e.to_string())),
        }
    }

    /// `gpc0 = 1` now, and `gpc0 = 0` after `for` (recorded in the store first, so a restart
    /// still ends the block).
    fn block(
        &mut self,
        firing: &Firing,
        a: &portcullis_automation::config::Block,
    ) -> Result<(), ActionError> {
        let out = self.command(
            firing,
            Command::SetTableGpc {
                table: a.table.clone(),
                key: a.key.clone(),
                value: 1,
            },
        )?;
        // The key as the control path wrote it (canonical), so the end finds the same entry.
        let key = out
            .get("key")
            .and_then(|k| k.as_str())
            .unwrap_or(&a.key)
            .to_string();
        let due =
            super::now_ms().saturating_add(i64::try_from(a.for_.0.as_millis()).unwrap_or(i64::MAX));
        let store_key = format!("{}#block{}", firing.idempotency_key, self.block_ends.len());
        let end = BlockEnd {
            trigger: firing.trigger.clone(),
            table: a.table.clone(),
            key,
            cause: firing.cause_event_id.clone(),
            firing: firing.idempotency_key.clone(),
        };
        self.store.follow_up(
            &store_key,
            due,
            &serde_json::to_value(&end).unwrap_or_default(),
        );
        self.block_ends.push((due, store_key, end));
        Ok(())
    }

    /// POSTs the firing, signed with the proxy's assertion key (see [`super::webhook`]).
    fn webhook(&mut self, firing: &Firing, url: &str) -> Result<(), ActionError> {
        let snap = self.rt.shared.snapshot.load();
        let identity = portcullis_identity::Identity {
            provider: "automation".into(),
            method: portcullis_identity::AuthMethod::ApiKey,
            subject: firing.principal.clone(),
            user: firing.trigger.clone(),
            email: None,
            groups: Vec::new(),
            claims: serde_json::Value::Null,
            expires_at: None,
        };
        let mut headers = Vec::new();
        match snap.identity.signer.sign(&identity, url) {
            Ok(jwt) => {
                if let Ok(v) = http::HeaderValue::from_str(&jwt) {
                    headers.push((crate::snapshot::ASSERTION_HEADER.clone(), v));
                }
            }
            Err(e) => {
                return Err(ActionError::Failed(format!(
                    "the automation's assertion could not be signed: {e}"
                )))
            }
        }
        let n = firing
            .actions
            .iter()
            .position(|a| matches!(a, Action::Webhook(w) if w.url == url))
            .unwrap_or(0);
        if let Ok(v) = http::HeaderValue::from_str(&format!("{}#{n}", firing.idempotency_key)) {
            headers.push((http::HeaderName::from_static("idempotency-key"), v));
        }
        let body = serde_json::to_vec(firing).unwrap_or_default();
        let status = self
            .handle
            .block_on(super::webhook::post(
                url,
                headers,
                body,
                super::webhook::TIMEOUT,
            ))
            .map_err(ActionError::Failed)?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(ActionError::Failed(format!(
                "the webhook answered {status}"
            )))
        }
    }
}
