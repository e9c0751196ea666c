//! Route matching, compiled: routes are bucketed by host (exact names in a hash map,
//! wildcards by suffix, then host-less routes), and inside a bucket by path (exact paths in a
//! hash map, prefixes by length, regexes in one `RegexSet`). A lookup costs a few hash probes,
//! not a scan over every route. The most specific route wins: exact host, then the longest
//! wildcard, then any host; exact path, then the longest prefix, then regex, then no path;
//! then the route with more method and header conditions; then config order.
//!
//! Paths match case-insensitively unless a route says `match.case_sensitive: true`: the
//! tables are keyed by lower-case paths, and a case-sensitive route checks its own spelling
//! against the path as sent. Hosts are canonical (lower-case) before they get here.
//!
//! `route` is a pure function of the compiled table and the request's parts.

use http::{HeaderMap, Method};
use portcullis_config::RouteDef;
use regex::{Regex, RegexSet};
use std::collections::HashMap;

/// One route's conditions beyond host and path.
struct Cond {
    idx: usize,
    methods: Option<Vec<Method>>,
    headers: Vec<(http::HeaderName, Option<String>)>,
    listeners: Option<Vec<String>>,
    regex: Option<Regex>,
    weight: (usize, usize),
    /// A case-sensitive route's exact path or prefix, as written.
    case: Option<Box<str>>,
}

impl Cond {
    fn matches(&self, req: &Req<'_>) -> bool {
        let Req {
            path,
            method,
            headers,
            listener,
            ..
        } = *req;
        if let Some(p) = &self.case {
            if !path.starts_with(&**p) {
                return false;
            }
        }
        if let Some(ms) = &self.methods {
            if !ms.contains(method) {
                return false;
            }
        }
        for (name, want) in &self.headers {
            match (headers.get(name), want) {
                (None, _) => return false,
                (Some(_), None) => {}
                (Some(v), Some(w)) => {
                    if v.as_bytes() != w.as_bytes() {
                        return false;
                    }
                }
            }
        }
        if let Some(ls) = &self.listeners {
            if !ls.iter().any(|l| l == listener) {
                return false;
            }
        }
        true
    }
}

#[derive(Default)]
struct Bucket {
    exact: HashMap<String, Vec<Cond>>,
    /// Prefix lengths present, longest first.
    prefix_lens: Vec<usize>,
    prefix: HashMap<String, Vec<Cond>>,
    regex_set: Option<RegexSet>,
    regex: Vec<Cond>,
    any: Vec<Cond>,
}

impl Bucket {
    fn add(&mut self, r: &RouteDef, c: Cond) {
        let m = &r.spec.matcher;
        if let Some(p) = &m.path {
            self.exact
                .entry(p.to_ascii_lowercase())
                .or_default()
                .push(c);
        } else if let Some(p) = &m.path_prefix {
            if p == "/" {
                self.any.push(c);
            } else {
                self.prefix
                    .entry(p.to_ascii_lowercase())
                    .or_default()
                    .push(c);
            }
        } else if m.path_regex.is_some() {
            self.regex.push(c);
        } else {
            self.any.push(c);
        }
    }

    fn finish(&mut self) {
        let by_weight = |a: &Cond, b: &Cond| {
            b.weight
                .0
                .cmp(&a.weight.0)
                .then(a.weight.1.cmp(&b.weight.1))
        };
        for v in self.exact.values_mut().chain(self.prefix.values_mut()) {
            v.sort_by(by_weight);
        }
        self.any.sort_by(by_weight);
        let mut lens: Vec<usize> = self.prefix.keys().map(String::len).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        self.prefix_lens = lens;
        if !self.regex.is_empty() {
            let pats: Vec<&str> = self
                .regex
                .iter()
                .map(|c| c.regex.as_ref().map(Regex::as_str).unwrap_or(""))
                .collect();
            self.regex_set = RegexSet::new(pats).ok();
        }
    }

    fn lookup(&self, req: &Req<'_>) -> Option<usize> {
        let first = |v: &[Cond], exact: bool| {
            v.iter()
                .find(|c| {
                    (!exact || c.case.is_none() || req.path.len() == len_of(c)) && c.matches(req)
                })
                .map(|c| c.idx)
        };
        let (path, lower) = (req.path, req.lower);
        if let Some(v) = self.exact.get(lower) {
            if let Some(i) = first(v, true) {
                return Some(i);
            }
        }
        for &len in &self.prefix_lens {
            if let Some(p) = lower.get(..len) {
                if let Some(v) = self.prefix.get(p) {
                    if let Some(i) = first(v, false) {
                        return Some(i);
                    }
                }
            }
        }
        if let Some(set) = &self.regex_set {
            for k in set.matches(path).iter() {
                if self.regex[k].matches(req) {
                    return Some(self.regex[k].idx);
                }
            }
        }
        first(&self.any, false)
    }
}

/// The request's parts that routes match, with the path also in lower case.
#[derive(Clone, Copy)]
struct Req<'a> {
    path: &'a str,
    lower: &'a str,
    method: &'a Method,
    headers: &'a HeaderMap,
    listener: &'a str,
}

fn len_of(c: &Cond) -> usize {
    c.case.as_ref().map_or(0, |p| p.len())
}

/// The compiled routing table of one snapshot.
#[derive(Default)]
pub struct Router {
    exact: HashMap<String, Bucket>,
    /// Wildcard suffixes such as `.example.com`, with their label counts, most labels first.
    wildcard: HashMap<String, Bucket>,
    wildcard_dots: Vec<usize>,
    any: Bucket,
}

impl Router {
    pub fn build(routes: &[RouteDef]) -> Router {
        let mut r = Router::default();
        for (idx, def) in routes.iter().enumerate() {
            let m = &def.spec.matcher;
            let methods = m.methods.as_ref().map(|ms| {
                ms.iter()
                    .filter_map(|s| Method::from_bytes(s.as_bytes()).ok())
                    .collect::<Vec<_>>()
            });
            let headers: Vec<_> = m
                .headers
                .iter()
                .filter_map(|(k, v)| {
                    let name =
                        http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).ok()?;
                    Some((name, (v != "*").then(|| v.clone())))
                })
                .collect();
            let cond = Cond {
                idx,
                weight: (
                    methods.is_some() as usize
                        + headers.len()
                        + def.spec.listeners.is_some() as usize,
                    def.order,
                ),
                methods,
                headers,
                listeners: def.spec.listeners.clone(),
                regex: m.path_regex.as_ref().and_then(|p| {
                    let p = if m.case_sensitive {
                        p.clone()
                    } else {
                        format!("(?i:{p})")
                    };
                    Regex::new(&p).ok()
                }),
                case: match (&m.path, &m.path_prefix) {
                    (Some(p), _) | (None, Some(p)) if m.case_sensitive && p != "/" => {
                        Some(p.as_str().into())
                    }
                    _ => None,
                },
            };
            let bucket = match m.host.as_deref().map(str::to_ascii_lowercase) {
                None => &mut r.any,
                Some(h) => match h.strip_prefix('*') {
                    Some(suffix) => r.wildcard.entry(suffix.to_string()).or_default(),
                    None => r.exact.entry(h).or_default(),
                },
            };
            bucket.add(def, cond);
        }
        for b in r.exact.values_mut().chain(r.wildcard.values_mut()) {
            b.finish();
        }
        r.any.finish();
        let mut dots: Vec<usize> = r.wildcard.keys().map(|s| s.matches('.').count()).collect();
        dots.sort_unstable_by(|a, b| b.cmp(a));
        dots.dedup();
        r.wildcard_dots = dots;
        r
    }

    /// Finds the route for a request. `host` must be canonical (`canon::host`) and `path`
    /// the canonical path without parameters (`canon::match_path`).
    pub fn route(
        &self,
        host: &str,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
        listener: &str,
    ) -> Option<usize> {
        let lower = if path.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(path.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(path)
        };
        let req = Req {
            path,
            lower: &lower,
            method,
            headers,
            listener,
        };
        if let Some(b) = self.exact.get(host) {
            if let Some(i) = b.lookup(&req) {
                return Some(i);
            }
        }
        if !self.wildcard.is_empty() {
            // `a.b.example.com` tries `.b.example.com` then `.example.com`, most labels first.
            let dots_in_host = host.matches('.').count();
            for &d in &self.wildcard_dots {
                if d > dots_in_host {
                    continue;
                }
                // The suffix with `d` dots starts at the d-th dot from the right.
                let pos = host.rmatch_indices('.').nth(d - 1).map(|(i, _)| i);
                if let Some(pos) = pos {
                    if pos == 0 {
                        continue;
                    }
                    if let Some(b) = self.wildcard.get(&host[pos..]) {
                        if let Some(i) = b.lookup(&req) {
                            return Some(i);
                        }
                    }
                }
            }
        }
        self.any.lookup(&req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_config::{Match, Route};

    fn def(name: &str, m: Match, order: usize) -> RouteDef {
        RouteDef {
            id: format!("default/{name}"),
            app: "default".into(),
            backend_id: "default/b".into(),
            order,
            policy_files: vec![],
            spec: Route {
                name: name.into(),
                matcher: m,
                listeners: None,
                backend: "b".into(),
                ..Default::default()
            },
        }
    }

    fn m(
        host: Option<&str>,
        exact: Option<&str>,
        prefix: Option<&str>,
        regex: Option<&str>,
    ) -> Match {
        Match {
            host: host.map(String::from),
            path: exact.map(String::from),
            path_prefix: prefix.map(String::from),
            path_regex: regex.map(String::from),
            ..Default::default()
        }
    }

    fn find(
        r: &Router,
        routes: &[RouteDef],
        host: &str,
        path: &str,
        method: Method,
    ) -> Option<String> {
        r.route(host, path, &method, &HeaderMap::new(), "web")
            .map(|i| routes[i].spec.name.clone())
    }

    #[test]
    fn most_specific_route_wins() {
        let routes = vec![
            def("catchall", m(None, None, Some("/"), None), 0),
            def("api", m(None, None, Some("/api/"), None), 1),
            def("api-v2", m(None, None, Some("/api/v2/"), None), 2),
            def("login", m(None, Some("/api/login"), None, None), 3),
            def("wild", m(Some("*.example.com"), None, None, None), 4),
            def(
                "deep-wild",
                m(Some("*.eu.example.com"), None, None, None),
                5,
            ),
            def(
                "exact-host",
                m(Some("app.example.com"), None, Some("/"), None),
                6,
            ),
            def("re", m(None, None, None, Some("^/u/[0-9]+$")), 7),
        ];
        let r = Router::build(&routes);
        let g = |h: &str, p: &str| find(&r, &routes, h, p, Method::GET).unwrap();
        assert_eq!(g("x.org", "/"), "catchall");
        assert_eq!(g("x.org", "/api/x"), "api");
        assert_eq!(g("x.org", "/api/v2/x"), "api-v2");
        assert_eq!(g("x.org", "/api/login"), "login");
        assert_eq!(g("x.org", "/u/12"), "re");
        assert_eq!(g("x.org", "/u/ab"), "catchall");
        assert_eq!(g("a.example.com", "/api/x"), "wild");
        assert_eq!(g("a.eu.example.com", "/"), "deep-wild");
        assert_eq!(g("app.example.com", "/api/"), "exact-host");
        assert_eq!(g("example.com", "/"), "catchall");
    }

    #[test]
    fn methods_headers_and_no_match() {
        let mut post = m(None, None, Some("/x"), None);
        post.methods = Some(vec!["POST".into()]);
        let mut canary = m(None, None, Some("/x"), None);
        canary.headers.insert("X-Canary".into(), "1".into());
        let routes = vec![def("post", post, 0), def("canary", canary, 1)];
        let r = Router::build(&routes);
        assert_eq!(
            find(&r, &routes, "h", "/x", Method::POST).as_deref(),
            Some("post")
        );
        assert_eq!(find(&r, &routes, "h", "/x", Method::GET), None);
        let mut h = HeaderMap::new();
        h.insert("x-canary", "1".parse().unwrap());
        assert_eq!(r.route("h", "/x", &Method::GET, &h, "web"), Some(1));
    }

    #[test]
    fn thousands_of_routes_resolve() {
        let routes: Vec<RouteDef> = (0..5000)
            .map(|i| {
                def(
                    &format!("r{i}"),
                    m(
                        Some(&format!("h{i}.example.com")),
                        None,
                        Some(&format!("/svc{i}/")),
                        None,
                    ),
                    i,
                )
            })
            .collect();
        let r = Router::build(&routes);
        assert_eq!(
            find(&r, &routes, "h4321.example.com", "/svc4321/a", Method::GET).as_deref(),
            Some("r4321")
        );
        assert_eq!(
            find(&r, &routes, "h4321.example.com", "/svc1/a", Method::GET),
            None
        );
    }

    #[test]
    fn paths_match_without_case_unless_told() {
        let mut cs = m(None, None, Some("/Private/"), None);
        cs.case_sensitive = true;
        let mut exact_cs = m(None, Some("/Exact"), None, None);
        exact_cs.case_sensitive = true;
        let routes = vec![
            def("public", m(None, None, Some("/"), None), 0),
            def("admin", m(None, None, Some("/admin"), None), 1),
            def("login", m(None, Some("/Login"), None, None), 2),
            def("re", m(None, None, None, Some("^/api/v[0-9]+$")), 3),
            def("private", cs, 4),
            def("exact", exact_cs, 5),
        ];
        let r = Router::build(&routes);
        let g = |p: &str| find(&r, &routes, "h", p, Method::GET).unwrap();
        assert_eq!(g("/ADMIN"), "admin");
        assert_eq!(g("/Admin/x"), "admin");
        assert_eq!(g("/login"), "login");
        assert_eq!(g("/LOGIN"), "login");
        assert_eq!(g("/API/V2"), "re");
        assert_eq!(g("/Private/x"), "private");
        assert_eq!(g("/private/x"), "public");
        assert_eq!(g("/Exact"), "exact");
        assert_eq!(g("/exact"), "public");
        assert_eq!(g("/Exactly"), "public");
    }
}
