//! The gRPC health check of the local app (`[inbound] protocol = "grpc"`): the agent asks a real
//! grpcio server's `grpc.health.v1.Health/Check` (grpcio-health-checking) and the registration
//! in Consul (the test double) follows SERVING / NOT_SERVING. A NOT_SERVING server still
//! accepts connections, so only a real gRPC check can see it.

use std::net::SocketAddr;
use std::path::Path;

use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::lifecycle::{self, check, passing_ids, Identity};
use vmesh_tests::{eventually, grpc_client, Agent, AgentBuilder, Inbound, RunningUpstream, Upstream, DEFAULT_WAIT};

const ID: &str = "orders-web-01";

/// An instance of "orders" in front of the gRPC app at `app`, checked every 300 ms (asking
/// about `grpc_service`, `""` for the whole server), registering in `consul`.
fn instance(identity: &Path, app: SocketAddr, grpc_service: &str, consul: &ConsulDouble) -> Agent {
    let builder = AgentBuilder::new()
        .agent_set("node", "web-01")
        .agent_set("drain_grace", "1s")
        .cmdb_file(identity)
        .inbound(
            Inbound::new(app, "grpc")
                .section_set("health", "interval", "300ms")
                .section_set("health", "grpc_service", grpc_service)
                .ramp("0s"),
        );
    lifecycle::consul(builder, consul).start()
}

/// Waits until the Consul check of the instance is `status` (`passing`, `critical`).
fn wait_check(consul: &ConsulDouble, status: &str) {
    eventually(DEFAULT_WAIT, &format!("the check of {ID} to be {status}"), || {
        let c = check(consul, "orders", ID, &format!("service:{ID}")).ok_or("no check")?;
        if c["Status"] == status {
            Ok(())
        } else {
            Err(c.to_string())
        }
    });
}

/// A registry, an identity file, a gRPC app with a health service and the agent of
/// [`instance`] in front of it; destructure in this order so that they drop in reverse.
struct Setup {
    consul: ConsulDouble,
    _dir: tempfile::TempDir,
    app: RunningUpstream,
    agent: Agent,
}

impl Setup {
    fn start(grpc_service: &str) -> Setup {
        let consul = ConsulDouble::spawn();
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = Identity::orders().write_in(dir.path());
        let app = Upstream::grpc("gapp").grpc_health().spawn();
        let agent = instance(&identity, app.addr(), grpc_service, &consul);
        Setup {
            consul,
            _dir: dir,
            app,
            agent,
        }
    }
}

#[test]
fn the_registration_follows_the_app_s_grpc_serving_status() {
    let Setup {
        consul,
        _dir,
        app,
        agent,
    } = Setup::start("");

    wait_check(&consul, "passing");
    assert_eq!(passing_ids(&consul, "orders"), [ID]);
    assert_eq!(agent.lifecycle()["app"]["healthy"], true);
    // The registered port serves gRPC.
    let run = grpc_client(agent.inbound_addr(), &["--call", "unary"]);
    assert!(run.success, "a gRPC call through the inbound port: {}", run.output);

    // NOT_SERVING: the check turns critical and the instance leaves the passing results.
    app.set_grpc_health("", "NOT_SERVING");
    wait_check(&consul, "critical");
    assert!(passing_ids(&consul, "orders").is_empty(), "NOT_SERVING must not pass");
    let lc = agent.lifecycle();
    assert_eq!(lc["app"]["healthy"], false, "{lc}");
    assert!(
        lc["app"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("not SERVING"),
        "/status says why: {lc}"
    );
    assert_eq!(agent.admin_get("/ready").status, 503);

    // SERVING again: back in.
    app.set_grpc_health("", "SERVING");
    wait_check(&consul, "passing");
    assert_eq!(passing_ids(&consul, "orders"), [ID]);
    eventually(DEFAULT_WAIT, "/ready to answer 200 again", || {
        match agent.admin_get("/ready").status {
            200 => Ok(()),
            s => Err(format!("{s}")),
        }
    });
}

#[test]
fn grpc_service_names_the_service_whose_status_counts() {
    let Setup {
        consul,
        _dir,
        app,
        agent,
    } = Setup::start("echo.Echo");
    wait_check(&consul, "passing");

    // The whole server NOT_SERVING, echo.Echo SERVING: the agent asks about echo.Echo only.
    app.set_grpc_health("", "NOT_SERVING");
    let checks = agent.lifecycle()["app"]["checks"].as_u64().unwrap_or(0);
    eventually(DEFAULT_WAIT, "three more health checks", || {
        let now = agent.lifecycle()["app"]["checks"].as_u64().unwrap_or(0);
        if now >= checks + 3 {
            Ok(())
        } else {
            Err(format!("{} checks", now - checks))
        }
    });
    wait_check(&consul, "passing");
    assert_eq!(agent.lifecycle()["app"]["healthy"], true);

    // echo.Echo NOT_SERVING: critical.
    app.set_grpc_health("echo.Echo", "NOT_SERVING");
    wait_check(&consul, "critical");
    assert!(passing_ids(&consul, "orders").is_empty());
    app.set_grpc_health("echo.Echo", "SERVING");
    wait_check(&consul, "passing");
}
