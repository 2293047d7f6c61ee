//! The observability kit in `packaging/observability/`: the alert rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`), the scrape config passes `promtool check
//! config`, every metric the rules, tests, dashboard and scrape config name is one a real agent
//! exports and docs/metrics.md documents, every dashboard query is valid PromQL, and a real
//! Prometheus with the shipped scrape job and rules, scraping a real agent under traffic, loads
//! the rules, fires none of them, and answers every dashboard query (the core ones with data).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use vmesh_tests::agent::toml_table;
use vmesh_tests::process::Process;
use vmesh_tests::shift::KeepAlive;
use vmesh_tests::{eventually, free_addr, tools, workspace_root, Agent, Curl, Outbound, Upstream};

/// The Prometheus that the real-server check starts may take this long to load and scrape.
const PROMETHEUS_WAIT: Duration = Duration::from_secs(30);
/// Requests sent through the agent before the dashboard queries run.
const REQUESTS: usize = 100;

fn kit() -> PathBuf {
    workspace_root().join("packaging").join("observability")
}

fn read(name: &str) -> String {
    let path = kit().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs promtool with `args` in `dir`; panics with its output unless it succeeds.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let out: Output = tools::command("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {} failed:\n{text}", args.join(" "));
    text
}

/// The alert names of a rules file (`- alert: Name` lines).
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

/// Every `vmesh_...` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("vmesh_") {
        let start = i + at;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start + "vmesh_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase() || bytes[end].is_ascii_digit() || bytes[end] == b'_')
        {
            end += 1;
        }
        if boundary {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

/// The sample names of a family: a histogram's `_bucket`, `_sum`, `_count` and its own name.
fn samples_of(name: &str, kind: &str, into: &mut BTreeSet<String>) {
    into.insert(name.to_string());
    if kind == "histogram" {
        for suffix in ["_bucket", "_sum", "_count"] {
            into.insert(format!("{name}{suffix}"));
        }
    }
}

/// The metric names a real agent exports: its `# TYPE` lines (every family is declared, also
/// those without a series yet).
fn exported_names() -> BTreeSet<String> {
    let agent = Agent::builder().start();
    let mut names = BTreeSet::new();
    for line in agent.metrics_text().lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                samples_of(name, kind, &mut names);
            }
        }
    }
    assert!(names.len() > 20, "the agent declared only {names:?}");
    names
}

/// The metric names of docs/metrics.md's reference table (`| \`vmesh_x\` | type | ...`).
fn documented_names() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(workspace_root().join("docs").join("metrics.md")).expect("read docs/metrics.md");
    let mut names = BTreeSet::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let [_, name, kind, ..] = cells.as_slice() {
            if let Some(name) = name.strip_prefix('`').and_then(|n| n.strip_suffix('`')) {
                if name.starts_with("vmesh_") {
                    samples_of(name, kind, &mut names);
                }
            }
        }
    }
    assert!(names.len() > 20, "docs/metrics.md lists only {names:?}");
    names
}

/// Every panel of the dashboard that is not a row, with its title and queries.
fn dashboard_panels(dashboard: &Value) -> Vec<(String, Vec<String>)> {
    dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] != "row")
        .map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            let exprs = p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["expr"].as_str().map(str::to_string))
                .collect();
            (title, exprs)
        })
        .collect()
}

/// A dashboard query with Grafana's variables filled in as they would be for service `web`.
fn instantiate(expr: &str, rate_interval: &str) -> String {
    expr.replace("$__rate_interval", rate_interval)
        .replace("$job", "vmesh")
        .replace("$instance", ".*")
        .replace("$direction", ".*")
        .replace("$service", "web")
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests_cover_every_alert() {
    let out = promtool(&kit(), &["check", "rules", "vmesh-alerts.yml"]);
    eprintln!("{out}");
    let out = promtool(&kit(), &["test", "rules", "vmesh-alerts.test.yml"]);
    eprintln!("{out}");
    let out = promtool(&kit(), &["check", "config", "prometheus.yml"]);
    eprintln!("{out}");

    let rules = read("vmesh-alerts.yml");
    let tests = read("vmesh-alerts.test.yml");
    let alerts = alert_names(&rules);
    for required in [
        "VmeshHighErrorRate",
        "VmeshCircuitBreakerOpen",
        "VmeshDiscoveryStale",
        "VmeshRampSuspended",
        "VmeshRegistrationLost",
    ] {
        assert!(
            alerts.iter().any(|a| a == required),
            "no alert {required} in {alerts:?}"
        );
    }
    // An alert without a unit test that sees it fire is an alert nobody knows fires.
    for alert in &alerts {
        assert!(
            tests.contains(&format!(
                "alertname: {alert}\n        exp_alerts:\n          - exp_labels:"
            )),
            "vmesh-alerts.test.yml has no case where {alert} fires"
        );
    }
    assert!(
        rules
            .lines()
            .filter(|l| l.trim_start().starts_with("severity:"))
            .count()
            == alerts.len(),
        "every alert has a severity"
    );
}

#[test]
fn the_kit_names_only_metrics_the_agent_exports_and_the_docs_describe() {
    let exported = exported_names();
    let documented = documented_names();
    let dashboard: Value = serde_json::from_str(&read("grafana-dashboard.json")).expect("the dashboard is JSON");
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in [
        "vmesh-alerts.yml",
        "vmesh-alerts.test.yml",
        "prometheus.yml",
        "grafana-dashboard.json",
    ] {
        for name in metric_names(&read(file)) {
            used.entry(name).or_default().insert(file.to_string());
        }
    }
    eprintln!("metrics used by the kit: {:?}", used.keys().collect::<Vec<_>>());
    let unknown: Vec<String> = used
        .iter()
        .filter(|(name, _)| !exported.contains(*name) || !documented.contains(*name))
        .map(|(name, files)| {
            format!(
                "{name} (in {files:?}; exported: {}, documented: {})",
                exported.contains(name),
                documented.contains(name)
            )
        })
        .collect();
    assert!(unknown.is_empty(), "metrics that do not exist: {unknown:#?}");

    // The dashboard: importable, on a chosen data source, one row per service, the panels the
    // operators asked for.
    assert_eq!(dashboard["uid"], "vmesh-services");
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["datasource", "job", "instance", "direction", "service"] {
        assert!(vars.contains(&v), "no variable {v} in {vars:?}");
    }
    let rows: Vec<&Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] == "row")
        .collect();
    assert!(
        rows.iter().any(|r| r["repeat"] == "service"),
        "a row repeated per service"
    );
    let mut ids = BTreeSet::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        assert!(ids.insert(p["id"].as_u64().unwrap_or(0)), "duplicate panel id: {p}");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap_or(99), g["w"].as_u64().unwrap_or(99));
        assert!(x + w <= 24, "panel {} is wider than the grid", p["title"]);
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel {} has a fixed data source",
                p["title"]
            );
        }
    }
    let panels = dashboard_panels(&dashboard);
    let titles: Vec<&str> = panels.iter().map(|(t, _)| t.as_str()).collect();
    for want in [
        "Request rate",
        "Errors by code",
        "Latency",
        "Proxy overhead",
        "Env split",
        "Ramp weight",
        "Circuit breaker",
        "Ejections and fallbacks",
    ] {
        assert!(titles.contains(&want), "no panel {want:?} in {titles:?}");
    }

    // Every query is PromQL that Prometheus parses: as recording rules, checked by promtool.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for (title, exprs) in &panels {
        assert!(!exprs.is_empty(), "panel {title:?} has no query");
        for expr in exprs {
            n += 1;
            let expr = serde_json::to_string(&instantiate(expr, "5m")).expect("a string serializes");
            rules.push_str(&format!("      - record: dashboard:query_{n}\n        expr: {expr}\n"));
        }
    }
    std::fs::write(dir.path().join("dashboard-queries.yml"), &rules).expect("write the queries");
    let out = promtool(dir.path(), &["check", "rules", "dashboard-queries.yml"]);
    eprintln!("{n} dashboard queries: {out}");
}

/// `GET <prometheus>/api/v1/query?query=<expr>`: the `data.result` array, or the error.
fn query(prometheus: &str, expr: &str) -> Result<Vec<Value>, String> {
    let r = Curl::get(format!("{prometheus}/api/v1/query"))
        .args(["-G", "--data-urlencode", &format!("query={expr}")])
        .run();
    if r.exit_code != 0 {
        return Err(format!("curl exit {}: {}", r.exit_code, r.verbose));
    }
    let doc: Value = serde_json::from_slice(&r.body).map_err(|e| format!("{e}: {}", r.text()))?;
    if doc["status"] != "success" {
        return Err(format!("{expr}: {doc}"));
    }
    Ok(doc["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// The value of the series of `result` whose `label` is `value`.
fn value_where(result: &[Value], label: &str, value: &str) -> Option<f64> {
    result
        .iter()
        .find(|s| s["metric"][label] == value)
        .and_then(|s| s["value"][1].as_str())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_real_prometheus_with_the_shipped_job_and_rules_answers_every_dashboard_query() {
    // The agent: one outbound service on a vm and a k8s endpoint at 80/20, with a breaker.
    let vm = Upstream::nginx("vm-1").spawn();
    let k8s = Upstream::nginx("k8s-1").spawn();
    let agent = Agent::builder()
        .outbound(
            Outbound::new("web")
                .balancer("round-robin")
                .labelled_endpoint(vm.addr(), &[("env", "vm")])
                .labelled_endpoint(k8s.addr(), &[("env", "k8s")])
                .set("shift", toml::Value::Table(toml_table("vm = 80\nk8s = 20")))
                .set("breaker", toml::Value::Table(toml_table(""))),
        )
        .start();

    // The shipped scrape job and rules, pointed at this agent, scraping every second.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = read("prometheus.yml");
    for (from, to) in [
        (
            "          - web-01.example.internal:9901\n          - web-02.example.internal:9901\n",
            format!("          - {}\n", agent.admin_addr()),
        ),
        (
            "  scrape_interval: 15s\n  evaluation_interval: 15s\n",
            "  scrape_interval: 1s\n  evaluation_interval: 1s\n".to_string(),
        ),
        (
            "    scrape_interval: 15s\n    scrape_timeout: 5s\n",
            "    scrape_interval: 1s\n    scrape_timeout: 1s\n".to_string(),
        ),
    ] {
        assert!(
            config.contains(from),
            "prometheus.yml no longer contains {from:?}: update this test"
        );
        config = config.replace(from, &to);
    }
    std::fs::write(dir.path().join("prometheus.yml"), &config).expect("write prometheus.yml");
    std::fs::write(dir.path().join("vmesh-alerts.yml"), read("vmesh-alerts.yml")).expect("write the rules");
    let listen = free_addr();
    let prometheus = format!("http://{listen}");
    let mut cmd = tools::command("prometheus");
    cmd.arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address={listen}"))
        .arg("--log.level=warn");
    let mut server = Process::spawn("prometheus", cmd, dir.path());
    eventually(PROMETHEUS_WAIT, "Prometheus to scrape the agent", || {
        if let Some(status) = server.try_exit() {
            panic!("prometheus exited with {status}: {}", server.stderr_tail(30));
        }
        let up = query(&prometheus, "up{job=\"vmesh\"}")?;
        match value_where(&up, "job", "vmesh") {
            Some(1.0) => Ok(()),
            other => Err(format!("up = {other:?}")),
        }
    });

    // The rules load, evaluate without error, and a healthy agent fires none of them.
    let alerts = alert_names(&read("vmesh-alerts.yml"));
    eventually(PROMETHEUS_WAIT, "every rule evaluated", || {
        let r = Curl::get(format!("{prometheus}/api/v1/rules")).run();
        let doc: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
        let rules: Vec<&Value> = doc["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let names: BTreeSet<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
        let missing: Vec<&String> = alerts.iter().filter(|a| !names.contains(a.as_str())).collect();
        let unhealthy: Vec<String> = rules
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if missing.is_empty() && unhealthy.is_empty() {
            Ok(())
        } else {
            Err(format!("missing {missing:?}, not ok {unhealthy:?}"))
        }
    });

    let mut client = KeepAlive::new(agent.outbound_addr("web"));
    for i in 0..REQUESTS {
        let r = client.get("/").unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200, "request {i}");
    }
    eventually(PROMETHEUS_WAIT, "Prometheus to see the requests", || {
        let r = query(&prometheus, "sum(vmesh_requests_total{job=\"vmesh\",service=\"web\"})")?;
        match r
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok())
        {
            Some(n) if n >= REQUESTS as f64 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // Every dashboard query evaluates; those of the traffic this agent has return data.
    let dashboard: Value = serde_json::from_str(&read("grafana-dashboard.json")).expect("the dashboard is JSON");
    let mut answers: BTreeMap<String, Vec<Vec<Value>>> = BTreeMap::new();
    for (title, exprs) in dashboard_panels(&dashboard) {
        for expr in exprs {
            let expr = instantiate(&expr, "1m");
            let result = query(&prometheus, &expr).unwrap_or_else(|e| panic!("panel {title:?}: {e}"));
            answers.entry(title.clone()).or_default().push(result);
        }
    }
    let summary: Vec<String> = answers
        .iter()
        .map(|(t, rs)| format!("{t}: {:?}", rs.iter().map(Vec::len).collect::<Vec<_>>()))
        .collect();
    eprintln!("series per dashboard query:\n  {}", summary.join("\n  "));
    for title in [
        "Agents up",
        "Requests per service",
        "Request rate",
        "Latency",
        "Proxy overhead",
        "Env split",
        "Circuit breaker",
        "Discovery",
        "Retries",
        "Ramp weight",
        "Registration",
        "Connections",
    ] {
        let results = answers.get(title).unwrap_or_else(|| panic!("no panel {title:?}"));
        assert!(
            results.iter().all(|r| !r.is_empty()),
            "panel {title:?} shows no data for a live agent: {results:?}"
        );
    }
    // The env split panel: the policy (80/20) and the requests the agent sent by it.
    let split = &answers["Env split"];
    let (observed, policy) = (&split[0], &split[1]);
    assert_eq!(value_where(policy, "env", "vm"), Some(80.0), "{policy:?}");
    let vm_share = value_where(observed, "env", "vm").unwrap_or(0.0);
    assert!(
        (60.0..=95.0).contains(&vm_share),
        "observed vm share {vm_share}: {observed:?}"
    );
    // A closed breaker reads 0.
    let breaker = &answers["Circuit breaker"][0];
    assert_eq!(breaker[0]["value"][1], "0", "{breaker:?}");

    // Nothing fires (or is pending) for a healthy agent.
    let firing = query(&prometheus, "ALERTS").unwrap_or_else(|e| panic!("{e}"));
    assert!(firing.is_empty(), "alerts on a healthy agent: {firing:?}");
    server.kill();
}
