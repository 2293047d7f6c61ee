//! The admin API refuses what a browser can send on a page's behalf: a `Host` that names
//! another domain (DNS rebinding) and a mutating call from a foreign `Origin` (a page posting
//! `/drain`, which needs no preflight), while curl, Prometheus and the console keep working.

use vmesh_tests::http::Curl;
use vmesh_tests::{AgentBuilder, Outbound, Upstream};

#[test]
fn foreign_hosts_and_origins_are_refused_and_the_agent_keeps_serving() {
    let app = Upstream::nginx("a").spawn();
    let agent = AgentBuilder::new()
        .outbound(Outbound::new("web").endpoint(app.addr()))
        .start();
    let admin = agent.admin_addr();

    // A rebinding page: its requests carry its own domain as Host.
    let r = Curl::get(agent.admin_url("/status")).header("Host: evil.example").run();
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("ADMIN_HOST_REFUSED"), "{}", r.text());

    // A page elsewhere posting a drain.
    let r = Curl::get(agent.admin_url("/drain"))
        .method("POST")
        .header("Origin: http://evil.example")
        .run();
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("ADMIN_FOREIGN_ORIGIN"), "{}", r.text());
    assert_eq!(
        agent.status_json()["draining"],
        false,
        "the refused drain changed nothing"
    );
    Curl::get(agent.outbound_url("web", "/")).run().expect_status(200);

    // What stays allowed: an IP or localhost Host, and the console's own origin.
    Curl::get(agent.admin_url("/status")).run().expect_status(200);
    Curl::get(agent.admin_url("/metrics"))
        .header(&format!("Host: localhost:{}", admin.port()))
        .run()
        .expect_status(200);
    let r = Curl::get(agent.admin_url("/drain"))
        .method("POST")
        .header(&format!("Origin: http://{admin}"))
        .run();
    assert_eq!(r.status, 202, "the console's own origin may drain: {}", r.text());
}
