//! The YAML model users write (DESIGN.md §3). Every struct rejects unknown keys, and every
//! default lives here, next to the field it belongs to, so `docs/configuration.md` can be
//! checked against one place.

use crate::units::{Dur, Rate, Size};
use ipnet::IpNet;
use serde::{de, Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::time::Duration;

/// The root config file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RootFile {
    /// Worker threads; default one per CPU core.
    pub workers: Option<usize>,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    pub admin: Option<Admin>,
    #[serde(default)]
    pub access_log: AccessLog,
    /// Peers whose `X-Forwarded-*` and `X-Request-Id` headers are trusted.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// How long in-flight requests may take to finish on shutdown.
    #[serde(default = "secs::<30>")]
    pub shutdown_grace: Dur,
    #[serde(default)]
    pub identity: Identity,
    /// Global Cedar policy files (globs), applied to every route that requires identity.
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default)]
    pub policy: PolicySettings,
    /// External decision functions, used by routes with `authorize_with`.
    #[serde(default)]
    pub authorizers: Vec<AuthorizerCfg>,
    #[serde(default)]
    pub audit: AuditCfg,
    /// The embedded store's directory (quota use, daily usage); default `state` beside the
    /// root file.
    #[serde(default = "state_dir")]
    pub state_dir: String,
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub routes: Vec<Route>,
    pub apps: Option<Apps>,
    /// Where limit counters live.
    #[serde(default)]
    pub limits: LimitsCfg,
    /// Per-key counters that routes track and their rules read (HAProxy's stick tables).
    #[serde(default)]
    pub stick_tables: Vec<StickTable>,
    /// Rate and burst per caller (API Gateway's usage plans).
    #[serde(default)]
    pub usage_plans: Vec<UsagePlan>,
    /// Where events go (sinks). Validated by the events engine (`portcullis check` runs it).
    pub events: Option<serde_yaml_ng::Value>,
    /// Rules over events that act on the proxy. Validated by the automation engine.
    pub triggers: Option<serde_yaml_ng::Value>,
    /// Durable workflows (Amazon States Language): definition files and inline definitions.
    pub workflows: Option<WorkflowsCfg>,
}

/// `workflows:`: where the definitions are, and how long closed executions are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowsCfg {
    /// Globs of definition files, relative to the root file: `workflows/*.asl.json` (or
    /// `.asl.yaml`). A file's workflow is named after it, without `.asl.json`.
    #[serde(default)]
    pub include: Vec<String>,
    /// Definitions written inline, by workflow name.
    #[serde(default)]
    pub definitions: std::collections::BTreeMap<String, serde_yaml_ng::Value>,
    /// How long a closed execution and its history are kept (Step Functions: 90 days).
    #[serde(default = "days_90")]
    pub retention: Dur,
}

fn days_90() -> Dur {
    Dur(Duration::from_secs(90 * 86_400))
}

/// Where limit counters live, what a check does when the shared store fails, and how plans
/// are assigned.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsCfg {
    /// `local` (in process, the default) or `{ redis: { url, ... } }` (shared by a fleet).
    #[serde(default)]
    pub store: LimitStore,
    /// What a check does when the Redis store does not answer within its timeout.
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// How often quota use and daily usage are written to the embedded store (at most this
    /// much counting is lost by a crash).
    #[serde(default = "secs::<1>")]
    pub sync_interval: Dur,
    /// A claim whose string value names the caller's usage plan (like `plan` or `tier`).
    pub plan_claim: Option<String>,
}

impl Default for LimitsCfg {
    fn default() -> Self {
        LimitsCfg {
            store: LimitStore::Local,
            on_store_error: OnStoreError::Local,
            sync_interval: secs::<1>(),
            plan_claim: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LimitStore {
    #[default]
    Local,
    Redis(RedisStoreCfg),
}

/// A Redis server shared by every replica: counters, buckets and quotas are global.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedisStoreCfg {
    /// `redis://host:port/db` (a password as `redis://:${env:REDIS_PASSWORD}@host:port`).
    pub url: String,
    /// The longest a check waits for Redis before `on_store_error` applies.
    #[serde(default = "millis::<5>")]
    pub timeout: Dur,
    /// Connections to Redis (each multiplexes many checks).
    #[serde(default = "count::<2>")]
    pub connections: usize,
    /// The prefix of every Redis key portcullis writes.
    #[serde(default = "redis_prefix")]
    pub prefix: String,
    /// How often errors and bytes counted at the end of responses are sent to Redis.
    #[serde(default = "millis::<50>")]
    pub sync_interval: Dur,
    /// Local batching: absent (the default), every check is one round trip; an interval
    /// (like `100ms`) answers hot keys in the process and syncs them that often, within the
    /// bounds docs/limits.md documents.
    #[serde(default)]
    pub batch: Option<Dur>,
}

impl<'de> Deserialize<'de> for LimitStore {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// `local`, or `{ redis: { url, ... } }`.
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = LimitStore;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`local` or `{ redis: { url: redis://127.0.0.1:6379 } }`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LimitStore, E> {
                match v {
                    "local" => Ok(LimitStore::Local),
                    _ => Err(E::custom(format!(
                        "unknown limit store `{v}`: write `local` (the default) or `{{ redis: {{ url: redis://127.0.0.1:6379 }} }}`"
                    ))),
                }
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<LimitStore, A::Error> {
                let Some(k) = m.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "an empty limit store: write `local` or `{ redis: { url: redis://127.0.0.1:6379 } }`",
                    ));
                };
                if k != "redis" {
                    return Err(de::Error::custom(format!(
                        "unknown limit store `{k}`: write `local` (the default) or `{{ redis: {{ url: redis://127.0.0.1:6379 }} }}`"
                    )));
                }
                let cfg: RedisStoreCfg = m.next_value()?;
                if m.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom(
                        "a limit store is one of `local` or `redis`, not both",
                    ));
                }
                Ok(LimitStore::Redis(cfg))
            }
        }
        d.deserialize_any(V)
    }
}

/// What a check does when the shared store fails or is slower than its timeout.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Let the request through, unlimited.
    Allow,
    /// Refuse the request with 429 and `Retry-After: 1` (never a 5xx).
    Deny,
    /// Count in this process alone until the store answers again.
    #[default]
    Local,
}

/// A stick table: counters per key, bounded by `size` (least recently used entries go
/// first) and `expire` (idle entries go).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StickTable {
    pub name: String,
    /// What an entry is keyed by: `src` (the client IP), `src/24` or `src/64` (its
    /// prefix), `principal`, `api_key`, `route`, `header:<name>`, `claim:<path>`, or a list
    /// of these (a tuple).
    pub key: TableKey,
    /// Most entries.
    pub size: usize,
    /// An entry idle this long goes.
    #[serde(default = "mins::<10>")]
    pub expire: Dur,
    /// Counters: `http_req_rate(10s)`, `http_req_cnt`, `http_err_rate(1m)`, `http_err_cnt`,
    /// `conn_cur`, `bytes_in_rate(1m)`, `bytes_out_rate(1m)`, `gpc0`.
    pub store: Vec<String>,
}

/// A table key: one part, or a tuple of parts.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TableKey {
    One(String),
    Tuple(Vec<String>),
}

impl TableKey {
    pub fn parts(&self) -> &[String] {
        match self {
            TableKey::One(p) => std::slice::from_ref(p),
            TableKey::Tuple(v) => v,
        }
    }
}

/// A usage plan: a steady rate and a burst per caller (a token bucket), and a quota.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsagePlan {
    pub name: String,
    /// Steady rate, like `10/s` or `600/m`.
    pub rate: Rate,
    /// Requests allowed at once above the steady rate; default the rate's count.
    pub burst: Option<u32>,
    /// Requests per day, week or month, kept across restarts.
    pub quota: Option<QuotaCfg>,
    /// A different rate and burst on some routes or methods (their own buckets).
    #[serde(default)]
    pub overrides: Vec<PlanOverride>,
    /// Principals and groups on this plan, whatever their route's default.
    #[serde(default)]
    pub assign: PlanAssign,
}

/// A quota: `limit` requests per `per`, starting again at `reset` (UTC).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuotaCfg {
    pub limit: u64,
    pub per: QuotaPer,
    /// When a period starts: `"HH:MM UTC"`. Weeks start on Monday, months on the 1st.
    #[serde(default = "midnight_utc")]
    pub reset: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPer {
    Day,
    Week,
    Month,
}

/// A plan's rate and burst for some routes and/or methods.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanOverride {
    /// Route names (or ids); empty means every route.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Methods, like `[POST, DELETE]`; empty means every method.
    #[serde(default)]
    pub methods: Vec<String>,
    pub rate: Rate,
    pub burst: Option<u32>,
}

/// Who is on a plan, besides API keys that name it and callers whose `plan_claim` names it.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PlanAssign {
    /// `provider/subject`, like `agents/deploy-bot-1`.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// What a route counts and limits.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RouteLimits {
    /// Stick tables this route's requests are counted in.
    #[serde(default)]
    pub track: Vec<String>,
    /// Rules over those tables' counters, in order; the first that matches acts.
    #[serde(default)]
    pub rules: Vec<LimitRule>,
    /// The usage plan a caller of the route gets unless one is assigned to it (keyed by
    /// principal, or by client IP on a public route).
    pub plan: Option<String>,
}

/// A rule: when `table`'s `counter` for this request's key is above `above`, act.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRule {
    pub table: String,
    pub counter: String,
    pub above: u64,
    #[serde(default)]
    pub action: LimitAction,
    /// The status of a deny or a tarpit; default 429.
    pub status: Option<u16>,
    /// How long a tarpit holds the request before it answers.
    pub delay: Option<Dur>,
    /// The header `mark` adds to the request for the origin (value `1`).
    pub header: Option<String>,
    /// How long `queue` holds a request for the counter to fall back before it refuses it.
    pub max_wait: Option<Dur>,
    /// How many requests `queue` holds at once; more are refused at once.
    #[serde(default = "count::<1024>")]
    pub max_queue: usize,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LimitAction {
    /// Answer now (429, with `Retry-After`).
    #[default]
    Deny,
    /// Hold the request for `delay`, then answer as deny does.
    Tarpit,
    /// Let it through with `header` set for the origin.
    Mark,
    /// Hold the request until the counter is back at its threshold (at most `max_wait`),
    /// then let it through, or answer as deny does.
    Queue,
}

/// Identity providers and browser sessions.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    #[serde(default)]
    pub providers: Vec<Provider>,
    #[serde(default)]
    pub session: Session,
    /// Signing of the assertion JWT sent to origins (`headers.assertion`).
    #[serde(default)]
    pub assertion: AssertionCfg,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Oidc,
    Jwt,
    ApiKey,
    Mtls,
    DevIssuer,
}

/// Which parts of a claim set make up the identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimMap {
    #[serde(default = "claim_user")]
    pub user: String,
    #[serde(default = "claim_email")]
    pub email: String,
    /// Dotted path, e.g. `realm_access.roles`; an array or a space-separated string.
    #[serde(default = "claim_groups")]
    pub groups: String,
}

impl Default for ClaimMap {
    fn default() -> Self {
        ClaimMap {
            user: claim_user(),
            email: claim_email(),
            groups: claim_groups(),
        }
    }
}

/// One identity provider. Which keys apply depends on `kind`; validation says which are
/// missing or out of place.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    /// `oidc`, `jwt`, `dev_issuer`: the exact `iss` expected.
    pub issuer: Option<String>,
    /// `oidc`, `jwt`, `dev_issuer`: `aud` must contain one of these.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accepted JWS algorithms; default: the asymmetric ones the issuer advertises
    /// (RS256, ES256 and friends for `jwt`).
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// Shared secret enabling HS256/384/512 for this provider only.
    pub hs_secret: Option<String>,
    #[serde(default = "secs::<60>")]
    pub clock_skew: Dur,
    #[serde(default = "yes")]
    pub require_exp: bool,
    #[serde(default = "kib::<16>")]
    pub max_token_size: Size,
    /// `jwt`: where the keys come from (exactly one of these three).
    pub jwks_uri: Option<String>,
    pub jwks_file: Option<String>,
    pub keys: Option<Vec<serde_json::Value>>,
    /// Fallback JWKS refresh period when the IdP sends no Cache-Control.
    #[serde(default = "hours::<1>")]
    pub jwks_refresh: Dur,
    #[serde(default)]
    pub claims: ClaimMap,
    /// Verified tokens cached at most this long (and never past `exp`).
    #[serde(default = "mins::<5>")]
    pub cache_ttl: Dur,
    #[serde(default = "count::<10_000>")]
    pub cache_size: usize,
    /// `oidc`: browser login client.
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// `oidc`: fixed callback URL; default `https://<request host>/.portcullis/callback`.
    pub redirect_url: Option<String>,
    /// `api_key`: YAML file of hashed keys, re-read when it changes.
    pub keys_file: Option<String>,
    /// `mtls`: where the identity comes from, in order: `uri` (SPIFFE), `dns`, `cn`.
    #[serde(default = "default_mtls_from")]
    pub identity_from: Vec<String>,
    /// `dev_issuer`: PKCS#8 PEM ES256 key, created if missing.
    pub key_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Session {
    #[serde(default = "session_cookie")]
    pub cookie: String,
    /// Base64 (standard or URL-safe) 32-byte keys; the first encrypts, all decrypt.
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default = "hours::<12>")]
    pub ttl: Dur,
    /// Set the cookie's `Secure` attribute. Only turn off for plain-HTTP local testing.
    #[serde(default = "yes")]
    pub secure: bool,
}

impl Default for Session {
    fn default() -> Self {
        Session {
            cookie: session_cookie(),
            keys: Vec::new(),
            ttl: hours::<12>(),
            secure: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssertionCfg {
    /// Issuer (`iss`) of assertions.
    #[serde(default = "assertion_issuer")]
    pub issuer: String,
    #[serde(default = "secs::<60>")]
    pub ttl: Dur,
    /// How often the signing key rotates; the previous key stays published for one period.
    #[serde(default = "hours::<12>")]
    pub rotate_every: Dur,
}

impl Default for AssertionCfg {
    fn default() -> Self {
        AssertionCfg {
            issuer: assertion_issuer(),
            ttl: secs::<60>(),
            rotate_every: hours::<12>(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Apps {
    #[serde(default)]
    pub include: Vec<String>,
}

/// An app bundle: one file of backends and routes, namespaced by `name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppFile {
    pub name: String,
    /// Cedar policy files (globs) applied to every route of this app.
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub bind: String,
    pub tls: Option<ListenerTls>,
    /// Largest request header section; larger gets 431.
    #[serde(default = "kib::<64>")]
    pub max_header_size: Size,
    /// Most request headers; more gets 431.
    #[serde(default = "count::<100>")]
    pub max_headers: usize,
    /// Most client connections open at once; more wait in the kernel's accept queue until
    /// one closes (HAProxy's `maxconn`). None: no limit.
    #[serde(default)]
    pub max_connections: Option<usize>,
    #[serde(default)]
    pub timeouts: ListenerTimeouts,
    /// Protocols offered: `http1`, `http2`. Default both.
    #[serde(default = "both_protocols")]
    pub protocols: Vec<Protocol>,
    /// How each request target is put into its one canonical form before routing.
    #[serde(default)]
    pub normalize: Normalize,
    /// What to do with `X-HTTP-Method-Override` and its kin. Routes may override it.
    #[serde(default)]
    pub method_override: MethodOverride,
    /// Upgrade protocols forwarded (`Upgrade:`); `h2c` never is. Routes may override it.
    #[serde(default = "websocket_only")]
    pub upgrades: Vec<String>,
    /// What a request header whose name has an underscore, or another byte than a letter, a
    /// digit or `-` (`X_User`, `Transfer_Encoding`, `X.User`), gets.
    #[serde(default)]
    pub underscores_in_headers: UnderscoresInHeaders,
}

/// What a request header whose name has an underscore (or another byte than a letter, a digit
/// or `-`) gets. Origin frameworks that follow CGI (WSGI, Rack, PHP) read `X_User` as
/// `X-User`, lighttpd's CGI gateways `X.User` too, and some servers read `Transfer_Encoding`
/// as `Transfer-Encoding`, so such a name can carry a header that portcullis removes or sets
/// itself past it. nginx and Envoy drop them by default too.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoresInHeaders {
    /// Removed before routing: no route, policy or origin sees them.
    #[default]
    Drop,
    /// 400.
    Reject,
    /// Kept and forwarded (identity header lookalikes are still removed).
    Allow,
}

/// A listener's canonicalization settings (docs/security.md, "Canonical requests").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalize {
    /// Merge repeated slashes (`//admin` is `/admin`).
    #[serde(default = "yes")]
    pub merge_slashes: bool,
    /// Encoded slashes and backslashes (`%2F`, `%5C`) in a path.
    #[serde(default)]
    pub escaped_slashes: EscapedSlashes,
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize {
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::Reject,
        }
    }
}

/// What an encoded slash or backslash (`%2F`, `%5C`) in a path gets.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    /// 400.
    #[default]
    Reject,
    /// Kept encoded, as part of its segment (opaque to prefix matching).
    Keep,
    /// Decoded to `/` before the path is matched.
    Decode,
}

/// What a method-override header (`X-HTTP-Method-Override`, `X-HTTP-Method`,
/// `X-Method-Override`) gets.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "snake_case")]
pub enum MethodOverride {
    /// Removed before the request is forwarded.
    #[default]
    Strip,
    /// 400.
    Reject,
    /// Believed: policy, limits and audit see the overridden method, and the header is
    /// forwarded.
    Honor,
}

/// What a `GET`, `HEAD` or `TRACE` request with a body gets. Such a body has no defined
/// meaning (RFC 9110 §9.3.1, §9.3.2, §9.3.8), and many origins answer the request without
/// reading it, then read it as the next request on the connection: a request portcullis never
/// routed nor authorized, with whatever identity headers it spells.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "snake_case")]
pub enum GetBody {
    /// 400, before anything reaches the origin.
    #[default]
    Reject,
    /// Sent to the origin (for APIs that search with a `GET` body), on a connection that is
    /// closed after the answer.
    Forward,
}

/// A route's canonicalization overrides.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RouteNormalize {
    pub escaped_slashes: Option<EscapedSlashes>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTimeouts {
    /// Time allowed to receive a complete request header section (slowloris guard).
    #[serde(default = "secs::<10>")]
    pub client_header: Dur,
    /// How long an idle client keep-alive connection is kept open.
    #[serde(default = "secs::<60>")]
    pub idle: Dur,
    /// The longest a client may send nothing while its request body is read (slow POST
    /// guard); then 408.
    #[serde(default = "secs::<30>")]
    pub client_body: Dur,
}

impl Default for ListenerTimeouts {
    fn default() -> Self {
        ListenerTimeouts {
            client_header: secs::<10>(),
            idle: secs::<60>(),
            client_body: secs::<30>(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Http1,
    Http2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    pub certificates: Vec<CertPair>,
    pub client_auth: Option<ClientAuth>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    pub ca: String,
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default = "admin_bind")]
    pub bind: String,
    /// Bearer tokens accepted by the admin API (break-glass and scripts): each either its
    /// SHA-256 (`sha256:<hex>`, from `portcullis admin hash-token`) or, with a warning, the
    /// token itself (use `${file:...}` or `${env:...}`).
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Identity providers whose credentials (bearer JWTs, API keys) the admin API accepts
    /// besides the static tokens. Such callers are authorized per call by `policies`.
    #[serde(default)]
    pub auth: Vec<String>,
    /// Cedar policy files (globs) that authorize control commands made by triggers and
    /// workflows (`Portcullis::Trigger::"name"`, `Portcullis::Workflow::"name"`). When set,
    /// such a command runs only if a policy permits it.
    #[serde(default)]
    pub policies: Vec<String>,
    /// TLS for the admin listener (the console and the API), with optional client
    /// certificates: an `mtls` provider listed in `auth` then identifies callers by them.
    pub tls: Option<ListenerTls>,
    /// The console's OIDC callback, as registered with the identity provider; default
    /// `<scheme>://<host the browser used>/login/callback`.
    pub login_redirect_url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// `stdout`, `off`, or a file path.
    #[serde(default = "stdout")]
    pub path: String,
    /// The line layout: `json` (default), `clf` or `haproxy`.
    #[serde(default)]
    pub format: AccessLogFormat,
    /// The fraction of successful requests (status below 400, no error) that are logged,
    /// from 0 to 1; errors are always logged. Checked to be in [0, 1] by validation.
    #[serde(default = "one")]
    pub sample: f64,
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog {
            path: stdout(),
            format: AccessLogFormat::default(),
            sample: 1.0,
        }
    }
}

/// The layout of an access log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// NCSA Combined Log Format (Apache's and nginx's `combined`).
    Clf,
    /// HAProxy's `option httplog` layout.
    Haproxy,
}

impl<'de> Deserialize<'de> for AccessLogFormat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// The error is raised inside the visitor, so the parser locates it at the value.
        struct V;
        impl de::Visitor<'_> for V {
            type Value = AccessLogFormat;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`json`, `clf` or `haproxy`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AccessLogFormat, E> {
                match v {
                    "json" => Ok(AccessLogFormat::Json),
                    "clf" => Ok(AccessLogFormat::Clf),
                    "haproxy" => Ok(AccessLogFormat::Haproxy),
                    _ => Err(E::custom(format!(
                        "unknown access log format `{v}`: write `json` (the default), `clf` (Combined Log Format) or `haproxy` (HAProxy's httplog)"
                    ))),
                }
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: String,
    #[serde(default)]
    pub balance: Balance,
    /// Cookie stickiness: the server is remembered in this cookie.
    pub sticky: Option<Sticky>,
    pub servers: Vec<Server>,
    /// Upstream protocol: `http1` (default) or `http2` (needed for gRPC).
    #[serde(default = "http1")]
    pub protocol: Protocol,
    /// Host header sent upstream; default keeps the client's.
    pub host: Option<String>,
    pub health_check: Option<HealthCheck>,
    pub outlier: Option<Outlier>,
    #[serde(default)]
    pub retries: Retries,
    #[serde(default)]
    pub timeouts: BackendTimeouts,
    /// How long a request may wait for a server slot when every server is at `max_connections`.
    #[serde(default = "secs::<5>")]
    pub queue_timeout: Dur,
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
    Random,
    Hash(HashOn),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(String),
    Cookie(String),
    ClientIp,
    Path,
}

impl<'de> Deserialize<'de> for Balance {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Hash { hash: String },
        }
        let msg = "balance must be `round_robin`, `least_conn`, `random` or `{ hash: header:NAME | cookie:NAME | client_ip | path }`";
        match Raw::deserialize(d).map_err(|_| de::Error::custom(msg))? {
            Raw::Name(n) => match n.as_str() {
                "round_robin" => Ok(Balance::RoundRobin),
                "least_conn" => Ok(Balance::LeastConn),
                "random" => Ok(Balance::Random),
                _ => Err(de::Error::custom(format!("unknown balance `{n}`: {msg}"))),
            },
            Raw::Hash { hash } => {
                let on = match hash.split_once(':') {
                    Some(("header", h)) if !h.is_empty() => HashOn::Header(h.to_ascii_lowercase()),
                    Some(("cookie", c)) if !c.is_empty() => HashOn::Cookie(c.to_string()),
                    None if hash == "client_ip" => HashOn::ClientIp,
                    None if hash == "path" => HashOn::Path,
                    _ => {
                        return Err(de::Error::custom(format!(
                            "unknown hash key `{hash}`: {msg}"
                        )))
                    }
                };
                Ok(Balance::Hash(on))
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    #[serde(default = "sticky_cookie")]
    pub cookie: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Stable name used by the admin API and metrics; default is the address.
    pub name: Option<String>,
    /// `host:port`, or `builtin:echo` for the built-in echo origin.
    pub address: String,
    #[serde(default = "int::<1>")]
    pub weight: u32,
    /// Most concurrent requests sent to this server; more wait in the backend queue.
    pub max_connections: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub http: Option<HttpCheck>,
    #[serde(default)]
    pub tcp: bool,
    #[serde(default = "secs::<2>")]
    pub interval: Dur,
    #[serde(default = "secs::<1>")]
    pub timeout: Dur,
    #[serde(default = "int::<2>")]
    pub rise: u32,
    #[serde(default = "int::<3>")]
    pub fall: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    #[serde(default = "slash")]
    pub path: String,
    #[serde(default)]
    pub expect: StatusRange,
    pub host: Option<String>,
}

/// A status (`200`) or an inclusive range (`"200-399"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub lo: u16,
    pub hi: u16,
}

impl Default for StatusRange {
    fn default() -> Self {
        StatusRange { lo: 200, hi: 399 }
    }
}

impl StatusRange {
    pub fn contains(&self, s: u16) -> bool {
        (self.lo..=self.hi).contains(&s)
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u16),
            S(String),
        }
        let msg = "expect must be a status like `200` or a range like `\"200-399\"`";
        let r = match Raw::deserialize(d).map_err(|_| de::Error::custom(msg))? {
            Raw::N(n) => StatusRange { lo: n, hi: n },
            Raw::S(s) => {
                let (a, b) = s.split_once('-').unwrap_or((&s, &s));
                let lo = a.trim().parse().map_err(|_| de::Error::custom(msg))?;
                let hi = b.trim().parse().map_err(|_| de::Error::custom(msg))?;
                StatusRange { lo, hi }
            }
        };
        if r.lo < 100 || r.hi > 599 || r.lo > r.hi {
            return Err(de::Error::custom(msg));
        }
        Ok(r)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    #[serde(default = "int::<5>")]
    pub consecutive_5xx: u32,
    #[serde(default = "int::<5>")]
    pub consecutive_connect_failures: u32,
    #[serde(default = "secs::<30>")]
    pub eject_for: Dur,
    #[serde(default = "int::<50>")]
    pub max_ejected_percent: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Extra attempts after the first.
    #[serde(default = "int::<2>")]
    pub attempts: u32,
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOn>,
    /// Retries may add at most this percentage of the backend's requests in flight.
    #[serde(default = "int::<20>")]
    pub budget_percent: u32,
    /// Retries always allowed regardless of the budget, so a quiet backend can still retry.
    #[serde(default = "int::<3>")]
    pub min_retries_in_flight: u32,
    pub per_try_timeout: Option<Dur>,
    #[serde(default = "millis::<25>")]
    pub backoff_base: Dur,
    #[serde(default = "millis::<250>")]
    pub backoff_max: Dur,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: 2,
            on: default_retry_on(),
            budget_percent: 20,
            min_retries_in_flight: 3,
            per_try_timeout: None,
            backoff_base: millis::<25>(),
            backoff_max: millis::<250>(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    ConnectFailure,
    Status(u16),
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u16),
            S(String),
        }
        let msg = "retries.on entries are `connect_failure` or a status such as 502, 503, 504";
        match Raw::deserialize(d).map_err(|_| de::Error::custom(msg))? {
            Raw::N(n) if (500..=599).contains(&n) || n == 429 => Ok(RetryOn::Status(n)),
            Raw::S(s) if s == "connect_failure" => Ok(RetryOn::ConnectFailure),
            _ => Err(de::Error::custom(msg)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTimeouts {
    #[serde(default = "secs::<1>")]
    pub connect: Dur,
    /// Time from sending the request to receiving the response headers.
    #[serde(default = "secs::<30>")]
    pub response: Dur,
    /// How long an idle pooled upstream connection is kept.
    #[serde(default = "secs::<60>")]
    pub idle: Dur,
}

impl Default for BackendTimeouts {
    fn default() -> Self {
        BackendTimeouts {
            connect: secs::<1>(),
            response: secs::<30>(),
            idle: secs::<60>(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    #[serde(default = "yes")]
    pub verify: bool,
    /// CA bundle; default is the Mozilla root set.
    pub ca: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    /// Server name to send and verify; default is the server's host.
    pub sni: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: Match,
    /// Listeners the route belongs to; default all.
    pub listeners: Option<Vec<String>>,
    pub backend: String,
    /// Largest request body; larger gets 413. Default unlimited.
    pub max_body_size: Option<Size>,
    /// Whole-request deadline, from the request's arrival to the end of the response headers.
    pub timeout: Option<Dur>,
    /// Allow status-based retries of non-idempotent methods (POST, PATCH).
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Identity providers accepted on this route (any of them).
    #[serde(default)]
    pub auth: Vec<String>,
    /// No identity needed. A route must say `public: true` or list `auth` providers.
    #[serde(default)]
    pub public: bool,
    /// Who may use the route: shorthand rules compiled to Cedar `permit` policies. Deny
    /// wins, and with no rule and no policy nobody is allowed.
    #[serde(default)]
    pub allow: Vec<AllowRule>,
    /// Shorthand rules compiled to Cedar `forbid` policies.
    #[serde(default)]
    pub deny: Vec<AllowRule>,
    /// Cedar policy files (globs) for this route only.
    #[serde(default)]
    pub policies: Vec<String>,
    /// `false` is shadow mode: decisions are evaluated and recorded (`would_deny`) but not
    /// enforced.
    #[serde(default = "yes")]
    pub enforce: bool,
    /// External decision functions to ask after the policies allow; all must allow.
    #[serde(default)]
    pub authorize_with: Vec<String>,
    /// For `mtls` providers: is a client certificate `required` or `optional`?
    pub client_cert: Option<CertMode>,
    #[serde(default)]
    pub headers: RouteHeaders,
    /// Overrides of the listener's canonicalization (`escaped_slashes` only).
    #[serde(default)]
    pub normalize: RouteNormalize,
    /// Overrides the listener's `method_override`.
    pub method_override: Option<MethodOverride>,
    /// Overrides the listener's `upgrades`.
    pub upgrades: Option<Vec<String>>,
    /// Forward the client's request trailers (gRPC requests always keep theirs). Trailers
    /// named like identity headers are dropped either way.
    #[serde(default)]
    pub request_trailers: bool,
    /// What a `GET`, `HEAD` or `TRACE` request with a body gets.
    #[serde(default)]
    pub get_body: GetBody,
    /// Counting and limiting (stick tables, rules, a usage plan).
    #[serde(default)]
    pub limits: RouteLimits,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CertMode {
    Required,
    Optional,
}

/// A shorthand allow rule: every listed condition must hold.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// The caller is in any of these groups.
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub emails: Vec<String>,
    #[serde(default)]
    pub providers: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path globs (`*` within a segment, `**` across segments).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Client address ranges.
    #[serde(default)]
    pub cidrs: Vec<ipnet::IpNet>,
    /// Claim name to the exact (string) value it must have.
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Request headers (lower-cased) exposed to policies as `context.headers.<name>`.
    #[serde(default)]
    pub context_headers: Vec<String>,
    /// Claims exposed to policies as principal tags (`principal.getTag("dept")`); string values.
    #[serde(default)]
    pub claims: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Deny,
    Allow,
}

/// An external decision function (the "Lambda authorizer" pattern).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizerCfg {
    pub name: String,
    pub url: String,
    #[serde(default = "millis::<200>")]
    pub timeout: Dur,
    /// Request headers sent along (lower-cased names).
    #[serde(default)]
    pub send: Vec<String>,
    /// The headers its answers may set for the origin. When given, a client's own values of
    /// them are removed on every route (as identity headers are), and any other header of an
    /// answer is dropped. Empty: any header portcullis does not own is taken, and a client's
    /// value stands when the answer sets none.
    #[serde(default)]
    pub upstream_headers: Vec<String>,
    #[serde(default)]
    pub cache: AuthorizerCache,
    #[serde(default)]
    pub on_error: OnError,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizerCache {
    #[serde(default = "secs::<30>")]
    pub allow_ttl: Dur,
    #[serde(default = "secs::<5>")]
    pub deny_ttl: Dur,
    #[serde(default = "count::<10_000>")]
    pub max_entries: usize,
    /// Extra attributes in the cache key: `header:NAME`, `query:NAME` or `claim:PATH`.
    #[serde(default)]
    pub key: Vec<String>,
}

impl Default for AuthorizerCache {
    fn default() -> Self {
        AuthorizerCache {
            allow_ttl: secs::<30>(),
            deny_ttl: secs::<5>(),
            max_entries: count::<10_000>(),
            key: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    EveryRecord,
    #[default]
    Interval,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Overload {
    /// The request waits for room in the queue.
    #[default]
    Wait,
    /// The request is refused (503) rather than go unrecorded.
    FailClosed,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuditSink {
    #[default]
    File,
    Stdout,
    Off,
}

/// The tamper-evident audit trail.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditCfg {
    #[serde(default)]
    pub sink: AuditSink,
    /// Directory of the audit files (`audit-<n>.jsonl`).
    #[serde(default = "audit_dir")]
    pub dir: String,
    #[serde(default)]
    pub fsync: Fsync,
    #[serde(default = "millis::<100>")]
    pub fsync_interval: Dur,
    #[serde(default = "mib::<100>")]
    pub rotate_size: Size,
    #[serde(default = "hours::<24>")]
    pub rotate_age: Dur,
    #[serde(default = "count::<10_000>")]
    pub queue: usize,
    #[serde(default)]
    pub on_overload: Overload,
    /// Record allowed decisions too (denials, failures, admin actions and reloads are always
    /// recorded).
    #[serde(default = "yes")]
    pub record_allows: bool,
}

impl Default for AuditCfg {
    fn default() -> Self {
        AuditCfg {
            sink: AuditSink::File,
            dir: audit_dir(),
            fsync: Fsync::Interval,
            fsync_interval: millis::<100>(),
            rotate_size: mib::<100>(),
            rotate_age: hours::<24>(),
            queue: count::<10_000>(),
            on_overload: Overload::Wait,
            record_allows: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RouteHeaders {
    /// Header name → template with `{identity.user}`, `{identity.email}`,
    /// `{identity.groups}`, `{identity.provider}` and `{claims.<path>}`.
    #[serde(default)]
    pub upstream: BTreeMap<String, String>,
    /// Send a signed, short-lived assertion JWT as `X-Portcullis-Assertion`.
    #[serde(default)]
    pub assertion: bool,
    /// Pass the caller's bearer token upstream as `Authorization: Bearer`.
    #[serde(default)]
    pub pass_token: bool,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Exact host (`api.example.com`) or wildcard (`*.example.com`).
    pub host: Option<String>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub path_regex: Option<String>,
    pub methods: Option<Vec<String>>,
    /// Header name to exact value; `"*"` means present with any value.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Match `path` and `path_prefix` (and `path_regex`) with case. By default they match
    /// case-insensitively, so a protected prefix covers its case variants.
    #[serde(default)]
    pub case_sensitive: bool,
}

// Defaults for numbers, durations and sizes, written where they are used:
// `#[serde(default = "secs::<30>")]`, `ttl: hours::<12>()`.
fn millis<const N: u64>() -> Dur {
    Dur(Duration::from_millis(N))
}
fn secs<const N: u64>() -> Dur {
    Dur(Duration::from_secs(N))
}
fn mins<const N: u64>() -> Dur {
    Dur(Duration::from_secs(N * 60))
}
fn hours<const N: u64>() -> Dur {
    Dur(Duration::from_secs(N * 3600))
}
fn kib<const N: u64>() -> Size {
    Size(N * 1024)
}
fn mib<const N: u64>() -> Size {
    Size(N * 1024 * 1024)
}
fn int<const N: u32>() -> u32 {
    N
}
fn count<const N: usize>() -> usize {
    N
}
fn yes() -> bool {
    true
}
fn state_dir() -> String {
    "state".into()
}
fn redis_prefix() -> String {
    "portcullis".into()
}
fn midnight_utc() -> String {
    "00:00 UTC".into()
}
fn audit_dir() -> String {
    "audit".into()
}
fn claim_user() -> String {
    "sub".into()
}
fn claim_email() -> String {
    "email".into()
}
fn claim_groups() -> String {
    "groups".into()
}
fn default_scopes() -> Vec<String> {
    vec!["openid".into(), "email".into(), "profile".into()]
}
fn default_mtls_from() -> Vec<String> {
    vec!["uri".into(), "dns".into(), "cn".into()]
}
fn session_cookie() -> String {
    "portcullis_session".into()
}
fn assertion_issuer() -> String {
    "portcullis".into()
}
fn slash() -> String {
    "/".into()
}
fn stdout() -> String {
    "stdout".into()
}
fn one() -> f64 {
    1.0
}
fn sticky_cookie() -> String {
    "portcullis_server".into()
}
fn admin_bind() -> String {
    "127.0.0.1:9901".into()
}
fn http1() -> Protocol {
    Protocol::Http1
}
fn websocket_only() -> Vec<String> {
    vec!["websocket".into()]
}
fn both_protocols() -> Vec<Protocol> {
    vec![Protocol::Http1, Protocol::Http2]
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::Status(502),
        RetryOn::Status(503),
        RetryOn::Status(504),
    ]
}
