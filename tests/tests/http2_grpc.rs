//! HTTP/2 (prior knowledge) and gRPC through vmesh: h2 clients, h2c upstreams, h2load, grpcio
//! unary and streaming calls, statuses in trailers, and `grpc-status` on proxy errors.

use std::time::{Duration, Instant};

use vmesh_tests::{grpc_client, h2load, Agent, Curl, Inbound, Outbound, Upstream};

#[test]
fn h2_client_and_h1_client_share_a_port_to_an_http1_upstream() {
    let up = Upstream::nginx("ng-h1").spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("web").protocol("http").endpoint(up.addr()))
        .start();
    let url = agent.outbound_url("web", "/");

    let r = Curl::get(url.clone()).http2().run();
    r.expect_status(200);
    assert!(r.status_line.starts_with("HTTP/2"), "client side must be h2: {r}");
    assert_eq!(r.text(), "hello from ng-h1\n");
    assert_eq!(
        r.header("x-upstream-proto"),
        Some("HTTP/1.1"),
        "protocol = http speaks HTTP/1.1 upstream"
    );

    let r = Curl::get(url).run();
    r.expect_status(200);
    assert!(r.status_line.starts_with("HTTP/1.1"), "{r}");
    assert_eq!(r.header("x-upstream-proto"), Some("HTTP/1.1"));
}

#[test]
fn http2_outbound_speaks_h2c_to_the_upstream() {
    let up = Upstream::nginx_h2c("ng-h2").spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("web2").protocol("http2").endpoint(up.addr()))
        .start();
    let url = agent.outbound_url("web2", "/");
    for (client, r) in [
        ("h2", Curl::get(url.clone()).http2().run()),
        ("http/1.1", Curl::get(url.clone()).run()),
    ] {
        r.expect_status(200);
        assert_eq!(r.text(), "hello from ng-h2\n", "{client}");
        assert_eq!(
            r.header("x-upstream-proto"),
            Some("HTTP/2.0"),
            "{client}: protocol = http2 must reach the upstream over h2c: {r}"
        );
    }
}

#[test]
fn h2load_multiplexed_streams_all_succeed() {
    let h1 = Upstream::nginx("ng-load-h1").spawn();
    let h2 = Upstream::nginx_h2c("ng-load-h2").spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("load1").protocol("http").endpoint(h1.addr()))
        .outbound(Outbound::new("load2").protocol("http2").endpoint(h2.addr()))
        .start();
    for service in ["load1", "load2"] {
        let s = h2load(&agent.outbound_url(service, "/"), &["-n", "400", "-c", "4", "-m", "16"]);
        assert_eq!(s.succeeded, 400, "{service}: h2load:\n{}", s.output);
        assert_eq!(s.failed, 0, "{service}: h2load:\n{}", s.output);
        assert_eq!(s.status_2xx, 400, "{service}: h2load:\n{}", s.output);
    }
}

#[test]
fn h2_request_body_reaches_an_http1_upstream() {
    let up = Upstream::python("py-h2").spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("py").endpoint(up.addr()))
        .start();
    let body = "x".repeat(100_000);
    let r = Curl::get(agent.outbound_url("py", "/echo")).http2().body(&body).run();
    r.expect_status(200);
    assert!(r.status_line.starts_with("HTTP/2"), "{r}");
    assert_eq!(r.text(), body);
}

fn grpc_agent() -> (Agent, vmesh_tests::RunningUpstream) {
    let up = Upstream::grpc("grpc-a").spawn();
    let agent = Agent::builder()
        .shared_outbound()
        .inbound(Inbound::new(up.addr(), "grpc"))
        .outbound(Outbound::new("echo").protocol("grpc").endpoint(up.addr()))
        .start();
    (agent, up)
}

#[test]
fn grpc_unary_and_streaming_calls_through_outbound() {
    let (agent, _up) = grpc_agent();
    let run = grpc_client(agent.outbound_addr("echo"), &["--call", "all", "--count", "20"]);
    assert!(run.success, "gRPC calls through the outbound port:\n{}", run.output);
    let results = &run.report["results"];
    assert_eq!(
        results["unary"]["upstream"], "grpc-a",
        "initial metadata passes: {}",
        run.output
    );
    assert_eq!(
        results["unary"]["trailer"], "unary-done",
        "trailing metadata passes: {}",
        run.output
    );
    assert_eq!(results["server-stream"]["messages"].as_array().map(Vec::len), Some(20));
    assert_eq!(results["bidi"]["messages"].as_array().map(Vec::len), Some(20));
}

#[test]
fn grpc_through_inbound_and_shared_port() {
    let (agent, _up) = grpc_agent();
    let run = grpc_client(agent.inbound_addr(), &["--call", "all"]);
    assert!(run.success, "gRPC through the inbound listener:\n{}", run.output);
    let run = grpc_client(agent.shared_addr(), &["--call", "all", "--authority", "echo"]);
    assert!(
        run.success,
        "gRPC through the shared port with :authority echo:\n{}",
        run.output
    );
}

#[test]
fn grpc_error_status_and_message_pass_through_in_trailers() {
    let (agent, _up) = grpc_agent();
    for fail in [
        "PERMISSION_DENIED:you shall not pass",
        "NOT_FOUND:no order 42",
        "INTERNAL:boom",
    ] {
        let run = grpc_client(agent.outbound_addr("echo"), &["--call", "fail", "--fail-with", fail]);
        assert!(
            run.success,
            "status {fail} must reach the client unchanged:\n{}",
            run.output
        );
    }
}

#[test]
fn grpc_upstream_down_gives_unavailable() {
    let (agent, mut up) = grpc_agent();
    let run = grpc_client(agent.outbound_addr("echo"), &["--call", "unary"]);
    assert!(run.success, "{}", run.output);
    up.kill();

    let run = grpc_client(
        agent.outbound_addr("echo"),
        &["--call", "unary", "--expect-code", "UNAVAILABLE"],
    );
    assert!(
        run.success,
        "with the upstream down the client must get UNAVAILABLE:\n{}",
        run.output
    );

    // On the wire: HTTP 200, trailers-only `grpc-status: 14` with a `grpc-message`.
    let dir = tempfile::tempdir().expect("tempdir");
    let empty_message = dir.path().join("grpc-frame");
    std::fs::write(&empty_message, [0u8; 5]).expect("write grpc frame");
    let r = Curl::get(agent.outbound_url("echo", "/echo.Echo/Unary"))
        .http2()
        .header("Content-Type: application/grpc")
        .header("TE: trailers")
        .body_file(&empty_message)
        .run();
    r.expect_status(200);
    assert_eq!(r.header("grpc-status"), Some("14"), "{r}");
    assert!(r.header("grpc-message").is_some_and(|m| !m.is_empty()), "{r}");
}

#[test]
fn grpc_slow_upstream_gives_deadline_exceeded() {
    let up = Upstream::grpc("grpc-slow").spawn();
    let agent = Agent::builder()
        .outbound(
            Outbound::new("slow")
                .protocol("grpc")
                .timeout("500ms")
                .endpoint(up.addr()),
        )
        .start();
    let started = Instant::now();
    // The client's own deadline is 10 s: DEADLINE_EXCEEDED well before that is vmesh's answer.
    let run = grpc_client(
        agent.outbound_addr("slow"),
        &[
            "--call",
            "slow",
            "--slow-ms",
            "5000",
            "--expect-code",
            "DEADLINE_EXCEEDED",
        ],
    );
    let took = started.elapsed();
    assert!(run.success, "{}", run.output);
    assert!(took < Duration::from_secs(4), "vmesh's 500ms timeout took {took:?}");
}
