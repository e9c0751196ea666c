//! `portcullis ctl login`, the OIDC device authorization grant (RFC 8628), against the real
//! OpenID Provider (`tests/idp`, panva's `oidc-provider`) and the real binary.
//!
//! The CLI prints the verification URL on stderr; the test plays the person's browser on the
//! provider's own device pages (a cookie jar, redirects and HTML forms over reqwest: the
//! user code confirmation, the development login form, the consent). Then: the token file
//! (mode 0600, a JWT), `ctl servers` and `ctl drain` as alice (group `eng`), a second login as
//! bob (group `sales`, saved in the default place and found there) whose drain the admin
//! policies forbid, a sign-in the person aborts (exit 1, "denied"), and a saved sign-in that
//! has expired (exit 1, never sent).

mod common;

use common::idp::{Idp, Ttls, CLIENT_ID, CLIENT_SECRET};
use common::{Origin, Proxy, ADMIN_TOKEN};
use regex::Regex;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::Url;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const SESSION_KEY: &str = "Y29uc29sZS1zZXNzaW9uLWtleS0wMTIzNDU2Nzg5YWI=";

const POLICY: &str = r#"
// Engineers see the backends and drain servers.
permit(principal in Portcullis::Group::"eng",
       action in [Portcullis::Admin::Action::"backends.read", Portcullis::Admin::Action::"server.set_state"],
       resource);
// Sales may only look.
permit(principal in Portcullis::Group::"sales",
       action == Portcullis::Admin::Action::"backends.read",
       resource);
"#;

fn config(idp: &Idp, a: &str, b: &str) -> String {
    format!(
        r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
audit: {{ dir: "{{dir}}/audit", fsync: every_record }}
identity:
  providers:
    - name: corp
      kind: oidc
      issuer: "{issuer}"
      client_id: {CLIENT_ID}
      client_secret: {CLIENT_SECRET}
      scopes: [openid, email, groups]
      claims: {{ user: sub, email: email, groups: groups }}
  session: {{ keys: ["{SESSION_KEY}"], secure: false }}
backends:
  - {{ name: web, servers: [{{ name: a, address: "{a}" }}, {{ name: b, address: "{b}" }}] }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, backend: web, public: true }}
admin:
  bind: "127.0.0.1:{{admin_port}}"
  tokens: ["{ADMIN_TOKEN}"]
  auth: [corp]
  policies: [admin.cedar]
"#,
        issuer = idp.issuer,
    )
}

// ---------------------------------------------------------------------------------------
// The person's browser

/// Just enough of a browser for the provider's device pages: a cookie jar (by name; the
/// provider's cookies are all for one host), redirects, and HTML forms.
struct Browser {
    http: reqwest::Client,
    cookies: BTreeMap<String, String>,
}

/// A form of a page: its id, method, action and fields (hidden or not, with their values).
#[derive(Debug)]
struct Form {
    id: String,
    method: String,
    action: String,
    fields: Vec<(String, String)>,
}

fn attr(tag: &str, name: &str) -> Option<String> {
    Regex::new(&format!(r#"\s{name}="([^"]*)""#))
        .unwrap()
        .captures(tag)
        .map(|c| c[1].replace("&amp;", "&"))
}

/// The first form of `html`.
fn first_form(html: &str) -> Option<Form> {
    let form = Regex::new(r"(?s)(<form\b[^>]*>)(.*?)</form>").unwrap();
    let c = form.captures(html)?;
    let (tag, inner) = (&c[1], &c[2]);
    let fields = Regex::new(r"<input\b[^>]*>")
        .unwrap()
        .find_iter(inner)
        .filter_map(|i| {
            let name = attr(i.as_str(), "name")?;
            Some((name, attr(i.as_str(), "value").unwrap_or_default()))
        })
        .collect();
    Some(Form {
        id: attr(tag, "id").unwrap_or_default(),
        method: attr(tag, "method").unwrap_or_else(|| "get".into()),
        action: attr(tag, "action").unwrap_or_default(),
        fields,
    })
}

impl Browser {
    fn new() -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: BTreeMap::new(),
        }
    }

    /// Loads `url` (POSTing `form` when given), following redirects: the page's URL and HTML.
    async fn go(&mut self, url: &str, form: Option<&[(String, String)]>) -> (String, String) {
        let mut url = Url::parse(url).unwrap();
        let mut form = form;
        for _ in 0..10 {
            let mut req = match form {
                Some(f) => self.http.post(url.clone()).form(f),
                None => self.http.get(url.clone()),
            };
            if !self.cookies.is_empty() {
                let jar: Vec<String> = self
                    .cookies
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                req = req.header(COOKIE, jar.join("; "));
            }
            let resp = req.send().await.unwrap();
            for c in resp.headers().get_all(SET_COOKIE) {
                let pair = c.to_str().unwrap().split(';').next().unwrap_or_default();
                if let Some((k, v)) = pair.split_once('=') {
                    if v.is_empty() {
                        self.cookies.remove(k.trim());
                    } else {
                        self.cookies.insert(k.trim().to_string(), v.to_string());
                    }
                }
            }
            if resp.status().is_redirection() {
                let to = resp.headers()[LOCATION].to_str().unwrap().to_string();
                url = url.join(&to).unwrap();
                form = None;
                continue;
            }
            let status = resp.status();
            let text = resp.text().await.unwrap();
            assert!(status.is_success(), "{url}: {status}\n{text}");
            return (url.to_string(), text);
        }
        panic!("more than 10 redirects from {url}");
    }
}

/// What the person does on the provider's pages.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    /// Confirms the code, signs in as this user, consents.
    SignIn(&'static str),
    /// Clicks "[ Abort ]" on the code's confirmation page.
    Abort,
}

/// Opens the verification URL and goes through the provider's pages: the last page's HTML.
async fn complete_in_browser(verification_url: &str, answer: Answer) -> String {
    let mut b = Browser::new();
    let (mut at, mut page) = b.go(verification_url, None).await;
    for _ in 0..8 {
        if page.contains("Sign-in Success") || page.contains("was interrupted") {
            return page;
        }
        let form = first_form(&page).unwrap_or_else(|| panic!("no form on {at}:\n{page}"));
        let mut fields = form.fields.clone();
        for (k, v) in &mut fields {
            match (k.as_str(), answer) {
                ("login", Answer::SignIn(user)) => *v = user.to_string(),
                ("password", _) => *v = "any".into(),
                _ => {}
            }
        }
        if form.id == "op.deviceConfirmForm" && answer == Answer::Abort {
            fields.push(("abort".into(), "yes".into()));
        }
        assert_eq!(form.method.to_lowercase(), "post", "{form:?}");
        let action = Url::parse(&at).unwrap().join(&form.action).unwrap();
        (at, page) = b.go(action.as_str(), Some(&fields)).await;
    }
    panic!("the provider's pages did not end at a success or an abort; last {at}:\n{page}");
}

// ---------------------------------------------------------------------------------------
// The CLI

/// `portcullis ctl login` started: the child, and the verification URL it printed.
struct Login {
    child: Child,
    url: String,
    stderr: tokio::task::JoinHandle<String>,
}

/// Starts `portcullis ctl login` at `idp` with `extra` arguments and `xdg` as
/// XDG_CONFIG_HOME, and reads the verification URL from its stderr.
async fn start_login(idp: &Idp, secret_file: &Path, xdg: &Path, extra: &[&str]) -> Login {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "ctl",
            "login",
            "--issuer",
            &idp.issuer,
            "--client-id",
            CLIENT_ID,
        ])
        .arg("--client-secret-file")
        .arg(secret_file)
        .args(extra)
        .env_remove("PORTCULLIS_ADMIN_TOKEN")
        .env("XDG_CONFIG_HOME", xdg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run portcullis ctl login");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push_str(&line);
            seen.push('\n');
            if let Some(rest) = line.strip_prefix("To sign in, open ") {
                // "To sign in, open COMPLETE (or URI and enter CODE)"
                assert!(
                    rest.contains(" (or ") && rest.contains(" and enter "),
                    "{line}"
                );
                return Some(rest.split_whitespace().next().unwrap().to_string());
            }
        }
        None
    })
    .await
    .expect("ctl login prints the URL within 30s")
    .unwrap_or_else(|| panic!("ctl login printed no URL:\n{seen}\n{}", idp.log_text()));
    let stderr = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
        }
        seen
    });
    Login { child, url, stderr }
}

impl Login {
    /// Waits for the CLI to end: its exit code, stdout and stderr.
    async fn finish(mut self) -> (i32, String, String) {
        let mut out = String::new();
        let mut stdout = self.child.stdout.take().unwrap();
        let status = tokio::time::timeout(Duration::from_secs(60), async {
            use tokio::io::AsyncReadExt;
            stdout.read_to_string(&mut out).await.unwrap();
            self.child.wait().await.unwrap()
        })
        .await
        .expect("ctl login ends within 60s of the sign-in");
        let err = self.stderr.await.unwrap();
        (status.code().unwrap_or(-1), out, err)
    }
}

/// `portcullis ctl --admin … ARGS` with XDG_CONFIG_HOME = `xdg`: exit code, stdout, stderr.
fn ctl(p: &Proxy, xdg: &Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["ctl", "--admin", &p.admin_url("")])
        .args(args)
        .env_remove("PORTCULLIS_ADMIN_TOKEN")
        .env("XDG_CONFIG_HOME", xdg)
        .output()
        .expect("run portcullis ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn payload(jwt: &str) -> serde_json::Value {
    use base64::Engine;
    let p = jwt.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p)
            .unwrap(),
    )
    .unwrap()
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_sign_in_with_the_device_flow_and_the_admin_policies_decide_for_them() {
    let idp = Idp::start(Ttls::default()).await;
    let (a, b) = (Origin::named("a").await, Origin::named("b").await);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.cedar"), POLICY).unwrap();
    let p = Proxy::start_in(dir, &config(&idp, &a.address(), &b.address())).await;
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("client.secret");
    std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
    // Nothing is saved in the default place yet: `ctl` says how to sign in.
    let xdg = work.path().join("config");
    let (code, _, err) = ctl(&p, &xdg, &["servers"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no credentials") && err.contains("ctl login"),
        "{err}"
    );

    // Alice signs in, the token saved where --out says.
    let alice_file = work.path().join("alice").join("ctl.jwt");
    let login = start_login(
        &idp,
        &secret,
        &xdg,
        &["--out", alice_file.to_str().unwrap()],
    )
    .await;
    assert!(
        login
            .url
            .starts_with(&format!("{}/device?user_code=", idp.issuer)),
        "{}",
        login.url
    );
    let page = complete_in_browser(&login.url, Answer::SignIn("alice")).await;
    assert!(page.contains("Sign-in Success"), "{page}");
    let (code, out, err) = login.finish().await;
    assert_eq!(code, 0, "ctl login: {err}{out}\n{}", idp.log_text());
    assert!(
        out.contains("Signed in as alice <alice@example.com>"),
        "{out}"
    );
    let token = std::fs::read_to_string(&alice_file).unwrap();
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT");
    assert!(
        !out.contains(token) && !err.contains(token),
        "the token is never printed"
    );
    let claims = payload(token);
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert_eq!(claims["aud"], CLIENT_ID, "{claims}");
    assert_eq!(claims["groups"], serde_json::json!(["eng"]), "{claims}");
    #[cfg(unix)]
    {
        assert_eq!(mode(&alice_file), 0o600);
        assert_eq!(mode(alice_file.parent().unwrap()), 0o700);
    }
    assert!(
        !xdg.exists(),
        "with --out, nothing is written in the default place"
    );

    // Alice's calls: she may list the servers and drain one.
    let bearer = ["--bearer-file", alice_file.to_str().unwrap()];
    let (code, out, err) = ctl(&p, &xdg, &[&bearer[..], &["servers"]].concat());
    assert_eq!(code, 0, "{err}{out}");
    assert!(out.contains("default/web") && out.contains(" a "), "{out}");
    let (code, out, err) = ctl(&p, &xdg, &[&bearer[..], &["drain", "web/b"]].concat());
    assert_eq!(code, 0, "{err}{out}");
    assert_eq!(out, "default/web/b: drain\n");
    let v = p.backends().await;
    assert_eq!(v["backends"][0]["servers"][1]["state"], "drain", "{v}");

    // Bob signs in without --out: the token goes to $XDG_CONFIG_HOME/portcullis/ctl.jwt, and
    // later calls without any credential flag use it.
    let login = start_login(&idp, &secret, &xdg, &[]).await;
    complete_in_browser(&login.url, Answer::SignIn("bob")).await;
    let (code, out, err) = login.finish().await;
    assert_eq!(code, 0, "ctl login: {err}{out}");
    assert!(out.contains("Signed in as bob <bob@example.com>"), "{out}");
    let saved = xdg.join("portcullis").join("ctl.jwt");
    assert!(out.contains(saved.to_str().unwrap()), "{out}");
    #[cfg(unix)]
    {
        assert_eq!(mode(&saved), 0o600);
        assert_eq!(mode(saved.parent().unwrap()), 0o700);
    }
    assert_eq!(
        payload(std::fs::read_to_string(&saved).unwrap().trim())["sub"],
        "bob"
    );
    let (code, out, err) = ctl(&p, &xdg, &["servers"]);
    assert_eq!(code, 0, "bob may look: {err}{out}");
    assert!(out.contains("default/web"), "{out}");
    let (code, out, err) = ctl(&p, &xdg, &["ready", "web/b"]);
    assert_eq!(code, 1, "{err}{out}");
    assert!(err.contains("forbidden") && err.contains("(403)"), "{err}");
    // The same with the file named.
    let (code, _, err) = ctl(
        &p,
        &xdg,
        &["--bearer-file", saved.to_str().unwrap(), "drain", "web/a"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("forbidden"), "{err}");
    let v = p.backends().await;
    assert_eq!(v["backends"][0]["servers"][0]["state"], "ready", "{v}");
    assert_eq!(v["backends"][0]["servers"][1]["state"], "drain", "{v}");
    // A credential given explicitly wins over the saved sign-in.
    let (code, out, err) = ctl(&p, &xdg, &[&bearer[..], &["ready", "web/b"]].concat());
    assert_eq!(code, 0, "{err}{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_the_person_aborts_ends_with_exit_1() {
    let idp = Idp::start(Ttls::default()).await;
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("client.secret");
    std::fs::write(&secret, CLIENT_SECRET).unwrap();
    let out_file = work.path().join("ctl.jwt");
    let login = start_login(
        &idp,
        &secret,
        work.path(),
        &["--out", out_file.to_str().unwrap()],
    )
    .await;
    let page = complete_in_browser(&login.url, Answer::Abort).await;
    assert!(page.contains("was interrupted"), "{page}");
    let (code, out, err) = login.finish().await;
    assert_eq!(code, 1, "{err}{out}");
    assert!(
        err.contains("error: the sign-in was denied at the identity provider"),
        "{err}"
    );
    assert!(!out_file.exists(), "nothing is saved");

    // A client the provider does not know is refused at once, with the provider's reason.
    let (code, _, err) = {
        let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args([
                "ctl",
                "login",
                "--issuer",
                &idp.issuer,
                "--client-id",
                "nobody",
            ])
            .arg("--out")
            .arg(&out_file)
            .output()
            .await
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("refused to start the sign-in") && err.contains("invalid_client"),
        "{err}"
    );
}

#[test]
fn an_expired_sign_in_is_not_sent() {
    use base64::Engine;
    let enc = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let xdg = tempfile::tempdir().unwrap();
    let dir = xdg.path().join("portcullis");
    std::fs::create_dir_all(&dir).unwrap();
    let jwt = format!(
        "{}.{}.c2ln",
        enc(serde_json::json!({ "alg": "RS256" })),
        enc(serde_json::json!({ "sub": "alice", "exp": 1_600_000_000u64 }))
    );
    std::fs::write(dir.join("ctl.jwt"), jwt).unwrap();
    // An admin address nobody listens on: the CLI must stop before calling it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "ctl",
            "--admin",
            &format!("http://{}", common::dead_address()),
        ])
        .arg("servers")
        .env_remove("PORTCULLIS_ADMIN_TOKEN")
        .env("XDG_CONFIG_HOME", xdg.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("your ctl login has expired: run `portcullis ctl login` again"),
        "{err}"
    );
}
