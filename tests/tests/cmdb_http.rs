//! The generic `http` CMDB backend (`[cmdb] kind = "http"`) against a small home-grown CMDB
//! (`fixtures/cmdb_http.py`: one JSON record per VM behind a bearer token): `vmesh identity`
//! reads it and names what is wrong; an agent registers under it in Consul (the test double);
//! a broken answer (HTTP 500, a body that is not JSON) keeps the last good identity; a changed
//! record is followed within one refresh.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::lifecycle::{self, agent_service, meta, passing_ids, CliRun};
use vmesh_tests::{eventually, fixture, free_addr, tools, AgentBuilder, Curl, Process, Upstream, DEFAULT_WAIT};

/// `[cmdb] refresh` and `timeout` of the agents below: a change is seen at the next refresh,
/// whose request may take up to the timeout; the registry write follows within a second.
const REFRESH: Duration = Duration::from_secs(1);
const CMDB_TIMEOUT: Duration = Duration::from_secs(2);
const ONE_REFRESH: Duration = Duration::from_secs(1 + 2 + 3);

const TOKEN: &str = "cmdb-t0ken";

/// The CMDB fixture on a fresh port, killed on drop.
struct HttpCmdb {
    addr: SocketAddr,
    process: Process,
    _dir: tempfile::TempDir,
}

impl HttpCmdb {
    fn spawn() -> HttpCmdb {
        let addr = free_addr();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = tools::python_command(&[]);
        cmd.arg(fixture("cmdb_http.py"))
            .args(["--port", &addr.port().to_string(), "--token", TOKEN]);
        let mut process = Process::spawn("cmdb-http", cmd, dir.path());
        eventually(DEFAULT_WAIT, "the http CMDB to listen", || {
            if let Some(status) = process.try_exit() {
                panic!("cmdb_http.py exited with {status}: {}", process.stderr_tail(30));
            }
            if process.stdout().lines().any(|l| l.trim() == "ready") {
                Ok(())
            } else {
                Err("no `ready` yet".to_string())
            }
        });
        HttpCmdb {
            addr,
            process,
            _dir: dir,
        }
    }

    fn set_record(&self, vm: &str, record: &Value) {
        Curl::get(format!("http://{}/_control/vms/{vm}", self.addr))
            .method("PUT")
            .body(&record.to_string())
            .run()
            .expect_status(200);
    }

    fn set_mode(&self, mode: &str) {
        Curl::get(format!("http://{}/_control/mode?mode={mode}", self.addr))
            .method("POST")
            .run()
            .expect_status(200);
    }

    /// How many times `vm`'s record was asked for.
    fn requests(&self, vm: &str) -> u64 {
        let r = Curl::get(format!("http://{}/_control/requests", self.addr)).run();
        r.expect_status(200);
        r.json()[vm].as_u64().unwrap_or(0)
    }

    /// Waits until the CMDB has answered `vm` at least `n` more times (the agent's refreshes).
    fn wait_asked(&self, vm: &str, n: u64) {
        let from = self.requests(vm);
        eventually(ONE_REFRESH * n as u32, &format!("{n} more CMDB reads of {vm}"), || {
            let now = self.requests(vm);
            if now >= from + n {
                Ok(())
            } else {
                Err(format!("{} reads", now - from))
            }
        });
    }

    fn stderr(&self) -> String {
        self.process.stderr()
    }
}

fn record(environment: &str) -> Value {
    json!({
        "service": "orders", "environment": environment, "zone": "z2", "version": "v7",
        "weight": 60, "colour": "green", "owner": "team-b", "tags": ["pci", {"name": "gold"}],
        "rack": "r12"
    })
}

/// `[cmdb] kind = "http"` for VM `vm`, the token in a file under `dir`.
fn http_cmdb(builder: AgentBuilder, cmdb: &HttpCmdb, dir: &Path, vm: &str) -> AgentBuilder {
    let token_file = dir.join("cmdb-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");
    let url = format!("http://{}/vms/{{vm}}", cmdb.addr);
    vmesh_tests::cmdb::remote(builder, "http", &url, &token_file, vm, REFRESH, CMDB_TIMEOUT)
}

fn identity_cli(cmdb: &HttpCmdb, dir: &Path, vm: &str) -> CliRun {
    let config = http_cmdb(AgentBuilder::new(), cmdb, dir, vm);
    vmesh_tests::cmdb::identity_cli(&config, &dir.join(format!("identity-{vm}.toml")), true)
}

#[test]
fn vmesh_identity_reads_the_http_cmdb_and_names_what_is_wrong() {
    let cmdb = HttpCmdb::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    cmdb.set_record("web-01", &record("prod"));

    let run = identity_cli(&cmdb, dir.path(), "web-01");
    assert_eq!(run.code, 0, "{run}");
    let id: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("--json is not JSON ({e}): {run}"));
    assert_eq!(
        id,
        json!({"service": "orders", "environment": "prod", "zone": "z2", "version": "v7",
               "weight": 60, "colour": "green", "owner": "team-b", "tags": ["pci", "gold"]}),
        "{run}"
    );
    assert!(
        cmdb.stderr().contains("GET /vms/web-01"),
        "the URL's {{vm}} is the VM name: {}",
        cmdb.stderr()
    );

    for (mode, code) in [("500", "CMDB_UNREACHABLE"), ("malformed", "CMDB_BAD_RESPONSE")] {
        cmdb.set_mode(mode);
        let run = identity_cli(&cmdb, dir.path(), "web-01");
        assert_eq!(run.code, 4, "mode {mode}: {run}");
        assert!(run.stderr.contains(code), "mode {mode} must give {code}: {run}");
        assert!(run.stdout.is_empty(), "no identity printed: {run}");
    }
    cmdb.set_mode("ok");

    let run = identity_cli(&cmdb, dir.path(), "no-such-vm");
    assert_eq!(run.code, 4, "{run}");
    assert!(run.stderr.contains("CMDB_VM_NOT_FOUND"), "{run}");

    // A record without its service is refused, naming the field.
    cmdb.set_record("bad-01", &json!({"environment": "prod"}));
    let run = identity_cli(&cmdb, dir.path(), "bad-01");
    assert_eq!(run.code, 4, "{run}");
    assert!(
        run.stderr.contains("CMDB_BAD_FIELD") && run.stderr.contains("service"),
        "{run}"
    );

    // The wrong token.
    std::fs::write(dir.path().join("wrong-token"), "nope\n").expect("write");
    let config = http_cmdb(AgentBuilder::new(), &cmdb, dir.path(), "web-01")
        .cmdb_set("token_file", dir.path().join("wrong-token").display().to_string());
    let run = vmesh_tests::cmdb::identity_cli(&config, &dir.path().join("wrong.toml"), false);
    assert_eq!(run.code, 4, "{run}");
    assert!(run.stderr.contains("CMDB_AUTH"), "{run}");
}

#[test]
fn an_agent_registers_under_the_http_identity_keeps_it_through_broken_answers_and_follows_a_change() {
    let cmdb = HttpCmdb::spawn();
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let app = Upstream::python("app").spawn();
    cmdb.set_record("web-01", &record("prod"));
    let builder = vmesh_tests::cmdb::instance("web-01", app.addr());
    let agent = lifecycle::consul(http_cmdb(builder, &cmdb, dir.path(), "web-01"), &consul).start();

    let registered_env = || vmesh_tests::cmdb::registered_environment(&consul, "orders-web-01");
    eventually(DEFAULT_WAIT, "orders-web-01 registered", registered_env);
    let svc = agent_service(&consul, "orders-web-01").expect("registered");
    for (key, want) in [
        ("vmesh-environment", "prod"),
        ("vmesh-zone", "z2"),
        ("vmesh-version", "v7"),
        ("vmesh-colour", "green"),
        ("vmesh-owner", "team-b"),
        ("vmesh-weight", "60"),
    ] {
        assert_eq!(meta(&svc, key), want, "Meta.{key} from the http CMDB: {svc}");
    }
    assert_eq!(svc["Port"], agent.inbound_addr().port(), "{svc}");
    assert_eq!(svc["Weights"]["Passing"], 60, "{svc}");
    lifecycle::wait_passing(&consul, "orders", &["orders-web-01"], DEFAULT_WAIT);
    assert_eq!(agent.lifecycle()["identity_source"], "cmdb");

    // Broken answers: the agent keeps its identity and its registration, and says why.
    for (mode, code) in [("500", "CMDB_UNREACHABLE"), ("malformed", "CMDB_BAD_RESPONSE")] {
        cmdb.set_mode(mode);
        // Two refreshes that got the broken answer.
        cmdb.wait_asked("web-01", 2);
        let lc = eventually(DEFAULT_WAIT, &format!("/status to show {code}"), || {
            let lc = agent.lifecycle();
            match lc["identity_error"].as_str() {
                Some(e) if e.contains(code) => Ok(lc),
                _ => Err(lc.to_string()),
            }
        });
        assert_eq!(lc["registered"], true, "mode {mode}: {lc}");
        assert_eq!(lc["identity"]["environment"], "prod", "mode {mode}: {lc}");
        assert_eq!(registered_env(), Ok("prod".to_string()), "mode {mode}");
        assert_eq!(passing_ids(&consul, "orders"), ["orders-web-01"], "mode {mode}");
        let errors = agent
            .metric(&format!("vmesh_cmdb_errors_total{{code=\"{code}\"}}"))
            .unwrap_or(0.0);
        assert!(errors >= 1.0, "vmesh_cmdb_errors_total{{code={code}}}: {errors}");
        assert_eq!(agent.admin_get("/ready").status, 200, "still ready in mode {mode}");
    }

    // Good answers again, with a changed environment: re-registered within one refresh.
    cmdb.set_record("web-01", &record("staging"));
    cmdb.set_mode("ok");
    eventually(
        ONE_REFRESH,
        "the registration to follow the changed record",
        || match registered_env()? {
            env if env == "staging" => Ok(()),
            env => Err(format!("vmesh-environment {env}")),
        },
    );
    let lc = agent.lifecycle();
    assert_eq!(lc["identity"]["environment"], "staging", "{lc}");
    assert!(
        lc["identity_error"].is_null(),
        "the error clears with a good answer: {lc}"
    );
    vmesh_tests::cmdb::assert_followed_in_place(&agent, &consul, "orders-web-01");
}
