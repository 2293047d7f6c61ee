//! A killed agent recovers from its state store (sled, under `agent.data_dir`): no duplicate or
//! stale registration, the drain flag kept, the ramp not restarted, an identity changed between
//! runs cleaned up, a corrupt store moved aside and rebuilt, and a lost store whose drain flag
//! and ramp come back from the registry. Consul is the test double;
//! every kill is a `kill -9`, so the agent gets no chance to tidy up.

use serde_json::Value;
use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::lifecycle::{
    self, agent_service, all_instances, check, meta, passing_ids, CliRun, Identity, PassingWatcher,
};
use vmesh_tests::{eventually, Agent, Upstream, DEFAULT_WAIT};

fn pair(service: &str, id: &str) -> (String, String) {
    (service.to_string(), id.to_string())
}

fn wait_passing(consul: &ConsulDouble, service: &str, want: &[&str]) {
    eventually(
        DEFAULT_WAIT,
        &format!("passing instances of {service} to be {want:?}"),
        || {
            let ids = passing_ids(consul, service);
            if ids == want {
                Ok(())
            } else {
                Err(format!("{ids:?}"))
            }
        },
    );
}

fn registers(consul: &ConsulDouble) -> u64 {
    consul.writes()["register"].as_u64().unwrap_or(0)
}

fn cli(agent: &Agent, args: &[&str]) -> CliRun {
    agent.run_cli(args).into()
}

fn maintenance_check(consul: &ConsulDouble, id: &str) -> Option<Value> {
    check(consul, "orders", id, &format!("_service_maintenance:{id}"))
}

#[test]
fn kill9_while_registered_then_restart_adopts_the_registration_and_keeps_the_ramp() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    // A 20 s ramp: weight 10 after ~1.8 s, 33 after ~6.5 s.
    let mut agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "20s"), &consul).start();
    wait_passing(&consul, "orders", &["orders-web-01"]);
    let first = agent_service(&consul, "orders-web-01").expect("registered");
    let ramp_start: u64 = meta(&first, "vmesh-ramp-start").parse().expect("ramp start");
    // Far enough into the ramp that a restarted one would show (weight back to 1, a later start).
    let before_kill = eventually(DEFAULT_WAIT, "the ramp to reach weight 10", || {
        let svc = agent_service(&consul, "orders-web-01").ok_or("gone")?;
        let w = svc["Weights"]["Passing"].as_u64().unwrap_or(0);
        if w >= 10 && lifecycle::unix_now() >= ramp_start + 2 {
            Ok(w)
        } else {
            Err(format!("weight {w}"))
        }
    });

    agent.kill9();
    let registered_before = registers(&consul);
    agent.restart();
    eventually(DEFAULT_WAIT, "the restarted agent to write its registration", || {
        if registers(&consul) > registered_before {
            Ok(())
        } else {
            Err(consul.writes().to_string())
        }
    });
    wait_passing(&consul, "orders", &["orders-web-01"]);
    assert_eq!(
        all_instances(&consul),
        [pair("orders", "orders-web-01")],
        "exactly one instance after the restart: no duplicate, no stale one"
    );
    let svc = agent_service(&consul, "orders-web-01").expect("registered");
    assert_eq!(
        meta(&svc, "vmesh-ramp-start"),
        ramp_start.to_string(),
        "the ramp must continue, not restart: {svc}"
    );
    let w = svc["Weights"]["Passing"].as_u64().unwrap_or(0);
    assert!(
        w >= before_kill,
        "the weight after the restart ({w}) is below the one before the kill ({before_kill}): the ramp restarted"
    );
    let lc = agent.lifecycle();
    assert_eq!(lc["ramp"]["start"], ramp_start, "{lc}");
    assert_eq!(lc["registered"], true, "{lc}");
    assert_eq!(lc["registration_id"], "orders-web-01", "{lc}");
    assert!(
        agent.stderr().contains("adopting the registration of an earlier run"),
        "the restart should say it adopts the earlier registration:\n{}",
        agent.stderr()
    );
}

#[test]
fn kill9_while_drained_or_draining_keeps_the_drain_flag_across_the_restart() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let mut agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "0s"), &consul).start();
    wait_passing(&consul, "orders", &["orders-web-01"]);

    // 1. Drained (`vmesh drain` returned 0), then kill -9.
    let drained = cli(&agent, &["drain", "--timeout", "30s"]);
    assert_eq!(drained.code, 0, "{drained}");
    agent.kill9();
    agent.restart();
    let expect_drained = |agent: &Agent, when: &str| {
        eventually(
            DEFAULT_WAIT,
            &format!("the restarted agent to register ({when})"),
            || match agent.lifecycle()["registered"].as_bool() {
                Some(true) => Ok(()),
                other => Err(format!("registered {other:?}")),
            },
        );
        let lc = agent.lifecycle();
        assert_eq!(
            lc["drain"], "drained",
            "{when}: the drain flag must survive kill -9: {lc}"
        );
        let ready = agent.admin_get("/ready");
        assert_eq!(
            ready.status,
            503,
            "{when}: /ready of a drained instance: {}",
            ready.text()
        );
        assert!(
            passing_ids(&consul, "orders").is_empty(),
            "{when}: a drained instance must not be passing"
        );
        let m = maintenance_check(&consul, "orders-web-01")
            .unwrap_or_else(|| panic!("{when}: no maintenance check on the drained instance"));
        assert_eq!(m["Status"], "critical", "{when}: {m}");
        assert_eq!(all_instances(&consul), [pair("orders", "orders-web-01")], "{when}");
    };
    expect_drained(&agent, "after kill -9 while drained");

    let undrained = cli(&agent, &["undrain", "--timeout", "30s"]);
    assert_eq!(undrained.code, 0, "undrain after the restart: {undrained}");
    wait_passing(&consul, "orders", &["orders-web-01"]);
    assert_eq!(agent.lifecycle()["drain"], "serving");
    assert!(maintenance_check(&consul, "orders-web-01").is_none());
    assert_eq!(agent.admin_get("/ready").status, 200);

    // 2. Still draining (a request in flight outlives `drain --timeout 1s`), then kill -9.
    let url = agent.inbound_url("/slow?ms=5000");
    let slow = std::thread::spawn(move || vmesh_tests::Curl::get(url).run());
    eventually(DEFAULT_WAIT, "the slow request to be in flight", || {
        match agent.lifecycle()["in_flight"].as_u64() {
            Some(1) => Ok(()),
            other => Err(format!("in_flight {other:?}")),
        }
    });
    let draining = cli(&agent, &["drain", "--timeout", "1s"]);
    assert_eq!(draining.code, 1, "{draining}");
    assert_eq!(agent.lifecycle()["drain"], "draining");
    agent.kill9();
    let _ = slow.join();
    agent.restart();
    expect_drained(&agent, "after kill -9 while draining");
    let undrained = cli(&agent, &["undrain", "--timeout", "30s"]);
    assert_eq!(undrained.code, 0, "{undrained}");
    wait_passing(&consul, "orders", &["orders-web-01"]);
}

#[test]
fn a_drained_instance_never_shows_as_passing_while_the_agent_restarts() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let mut agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "0s"), &consul).start();
    wait_passing(&consul, "orders", &["orders-web-01"]);
    let drained = cli(&agent, &["drain", "--timeout", "30s"]);
    assert_eq!(drained.code, 0, "{drained}");
    agent.kill9();
    assert!(passing_ids(&consul, "orders").is_empty());

    // A caller's blocking query on the passing instances sees every write; a registry that is
    // slow to answer one maintenance call (500 ms) makes a short-lived state easier to see.
    consul.control("delay?ms=500&count=1&path=/v1/agent/service/maintenance");
    let watcher = PassingWatcher::start(&consul, "orders");
    agent.restart();
    eventually(DEFAULT_WAIT, "the restarted agent to register", || {
        match agent.lifecycle()["registered"].as_bool() {
            Some(true) => Ok(()),
            other => Err(format!("registered {other:?}")),
        }
    });
    // Watch until the agent has finished its writes (the maintenance check is back).
    eventually(
        DEFAULT_WAIT,
        "the maintenance check to be back",
        || match maintenance_check(&consul, "orders-web-01") {
            Some(c) if c["Status"] == "critical" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let seen = watcher.stop();
    assert_eq!(agent.lifecycle()["drain"], "drained");
    assert!(
        seen.is_empty(),
        "a drained instance was passing (visible to callers) while its agent restarted: {} answers listed {:?}",
        seen.len(),
        seen.first()
    );
}

#[test]
fn an_identity_changed_between_runs_replaces_the_old_registration() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity_path = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let mut agent = lifecycle::consul(lifecycle::instance("web-01", &identity_path, app.addr(), "0s"), &consul).start();
    wait_passing(&consul, "orders", &["orders-web-01"]);

    // While the agent is dead, the CMDB renames the service.
    agent.kill9();
    Identity::orders().set("service", "billing").write(&identity_path);
    agent.restart();
    wait_passing(&consul, "billing", &["billing-web-01"]);
    eventually(DEFAULT_WAIT, "only the new registration to be left", || {
        let all = all_instances(&consul);
        if all == [pair("billing", "billing-web-01")] {
            Ok(())
        } else {
            Err(format!("{all:?}"))
        }
    });
    let lc = agent.lifecycle();
    assert_eq!(lc["registration_id"], "billing-web-01", "{lc}");
    assert!(
        agent.stderr().contains("removing the registration of an earlier run"),
        "{}",
        agent.stderr()
    );

    // And while it runs: the next refresh (2 s) moves the registration back.
    Identity::orders().write(&identity_path);
    eventually(DEFAULT_WAIT, "the registration to follow the identity file", || {
        let all = all_instances(&consul);
        if all == [pair("orders", "orders-web-01")] {
            Ok(())
        } else {
            Err(format!("{all:?}"))
        }
    });
    wait_passing(&consul, "orders", &["orders-web-01"]);

    // A restart after that must not resurrect or remove anything.
    agent.kill9();
    agent.restart();
    wait_passing(&consul, "orders", &["orders-web-01"]);
    assert_eq!(all_instances(&consul), [pair("orders", "orders-web-01")]);
}

#[test]
fn a_corrupt_state_store_is_moved_aside_and_the_agent_registers() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let mut agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "0s"), &consul).start();
    wait_passing(&consul, "orders", &["orders-web-01"]);
    agent.kill9();

    // Garbage where sled keeps its config and data.
    let state = agent.data_dir().join("state");
    assert!(
        state.join("conf").is_file() && state.join("db").is_file(),
        "sled files in {state:?}"
    );
    std::fs::write(state.join("conf"), b"\xff\xfe this is not a sled config \x00\x01").expect("write conf");
    std::fs::write(state.join("db"), vec![0xAB_u8; 64 * 1024]).expect("write db");

    agent.restart();
    eventually(
        DEFAULT_WAIT,
        "the agent to register on a rebuilt store",
        || match agent.lifecycle()["registered"].as_bool() {
            Some(true) => Ok(()),
            other => Err(format!("registered {other:?}")),
        },
    );
    wait_passing(&consul, "orders", &["orders-web-01"]);
    assert_eq!(all_instances(&consul), [pair("orders", "orders-web-01")]);
    let log = agent.stderr();
    assert!(
        log.contains("STORE_CORRUPT") && log.contains("moved aside"),
        "the agent must log that it moved the store aside:\n{log}"
    );
    let aside: Vec<String> = std::fs::read_dir(agent.data_dir())
        .expect("read data_dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("state.corrupt-"))
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "one quarantined store expected in {:?}",
        agent.data_dir()
    );
    assert!(
        log.contains(&aside[0]),
        "the log line should name where the store went ({})",
        aside[0]
    );

    // The rebuilt store works: kill -9 again and the restart adopts the registration.
    agent.kill9();
    agent.restart();
    wait_passing(&consul, "orders", &["orders-web-01"]);
    assert!(
        agent.stderr().contains("adopting the registration"),
        "{}",
        agent.stderr()
    );
    assert_eq!(all_instances(&consul), [pair("orders", "orders-web-01")]);
}

#[test]
fn a_lost_store_takes_the_drain_flag_and_the_ramp_back_from_the_registry() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let mut agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "60s"), &consul).start();
    wait_passing(&consul, "orders", &["orders-web-01"]);
    let first = agent_service(&consul, "orders-web-01").expect("registered");
    let ramp_start: u64 = meta(&first, "vmesh-ramp-start").parse().expect("ramp start");
    let drained = cli(&agent, &["drain", "--timeout", "30s"]);
    assert_eq!(drained.code, 0, "{drained}");

    // kill -9, and the whole store is gone (a wiped data_dir, a replaced disk).
    agent.kill9();
    std::fs::remove_dir_all(agent.data_dir().join("state")).expect("remove the store");
    agent.restart();
    let registered = |agent: &Agent| {
        eventually(DEFAULT_WAIT, "the restarted agent to register", || {
            match agent.lifecycle()["registered"].as_bool() {
                Some(true) => Ok(()),
                other => Err(format!("registered {other:?}")),
            }
        })
    };
    registered(&agent);
    let lc = agent.lifecycle();
    assert_eq!(
        lc["drain"], "drained",
        "an instance drained in Consul must stay drained when its store is lost: {lc}"
    );
    assert_eq!(
        lc["ramp"]["start"], ramp_start,
        "the ramp start comes back from Meta: {lc}"
    );
    assert!(passing_ids(&consul, "orders").is_empty(), "not passing while drained");
    let m = maintenance_check(&consul, "orders-web-01").expect("maintenance check kept");
    assert_eq!(m["Status"], "critical", "{m}");
    assert_eq!(all_instances(&consul), [pair("orders", "orders-web-01")]);
    assert!(
        agent.stderr().contains("taking its state from the registry"),
        "the recovery is logged:\n{}",
        agent.stderr()
    );

    // The recovered flag is in the new store: another kill -9 keeps it without asking Consul.
    agent.kill9();
    agent.restart();
    registered(&agent);
    assert_eq!(agent.lifecycle()["drain"], "drained");
    let undrained = cli(&agent, &["undrain", "--timeout", "30s"]);
    assert_eq!(undrained.code, 0, "{undrained}");
    wait_passing(&consul, "orders", &["orders-web-01"]);
}
