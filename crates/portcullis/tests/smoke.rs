//! The simplest end-to-end check: the binary proxies to a real origin.
mod common;
use common::*;

#[tokio::test]
async fn proxies_to_a_real_origin_and_404s_unrouted() {
    let o = Origin::named("hello").await;
    let p = Proxy::start(&format!(
        "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\" }}]\nbackends:\n  - {{ name: b, servers: [{{ address: \"{}\" }}] }}\nroutes:\n  - {{ name: r, match: {{ path_prefix: /app }}, backend: b, public: true }}\n",
        o.address()
    ))
    .await;
    let c = client();
    let r = c.get(p.url("/app/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(r.text().await.unwrap(), "hello");
    let r = c.get(p.url("/other")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.text().await.unwrap(), "no route\n");
}
