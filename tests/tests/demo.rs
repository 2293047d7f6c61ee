//! `vmesh demo`, the README's first command, end to end: the real binary on its embedded
//! quickstart (identity from the embedded `VMESH_ID_*` defaults, the in-process `memory`
//! registry, demo upstreams), driven with the real CLI as the README tells a user to:
//! `vmesh status` shows the identity, the registration and the weight climbing 1 -> 100;
//! `vmesh drain` takes the instance out (and out of `vmesh clusters`), `vmesh undrain` brings
//! it back on a new ramp; requests pass through the demo's outbound ports; SIGTERM exits 0.
//!
//! The demo's ports are fixed in the quickstart; the test moves all of them together with
//! `VMESH_DEMO_PORT_OFFSET` to ports free at run time, and shortens the ramp with the ordinary
//! `VMESH_INBOUND__RAMP__WINDOW` override.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use vmesh_tests::agent::vmesh_command;
use vmesh_tests::{eventually, Curl, Process, Signal};

/// The quickstart's ports (agent/config/quickstart.toml): admin, shared outbound, outbound
/// `hello`, outbound `local-app`, inbound, and the demo upstreams local-app, hello-1, hello-2.
const ADMIN: u16 = 9901;
const SHARED: u16 = 15000;
const HELLO: u16 = 15001;
const LOCAL_APP: u16 = 15002;
const INBOUND: u16 = 15006;
const QUICKSTART_PORTS: [u16; 8] = [ADMIN, SHARED, HELLO, LOCAL_APP, INBOUND, 18080, 18081, 18082];

/// The ramp of the test run (the quickstart's is 60 s): long enough to see several steps
/// between polls on a loaded machine, short enough to reach 100 in the test.
const RAMP: &str = "20s";

/// A running `vmesh demo`, killed on drop (its logs printed when the test fails).
struct Demo {
    process: Process,
    offset: u16,
    _dir: tempfile::TempDir,
}

impl Demo {
    fn start() -> Demo {
        let dir = tempfile::tempdir().expect("tempdir for the demo's logs");
        let offset = free_offset();
        let mut cmd = vmesh_command();
        cmd.arg("demo")
            .env("VMESH_DEMO_PORT_OFFSET", offset.to_string())
            .env("VMESH_INBOUND__RAMP__WINDOW", RAMP);
        if let Ok(filter) = std::env::var("VMESH_TEST_LOG") {
            cmd.env("VMESH_AGENT__LOG_LEVEL", filter);
        }
        let process = Process::spawn("vmesh-demo", cmd, dir.path());
        Demo {
            process,
            offset,
            _dir: dir,
        }
    }

    fn addr(&self, quickstart_port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], quickstart_port + self.offset))
    }

    fn url(&self, quickstart_port: u16, path: &str) -> String {
        format!("http://{}{path}", self.addr(quickstart_port))
    }

    /// `vmesh <args> --admin <the demo's admin address>`.
    fn cli(&self, args: &[&str]) -> Output {
        vmesh_command()
            .args(args)
            .arg("--admin")
            .arg(self.addr(ADMIN).to_string())
            .output()
            .expect("run vmesh")
    }

    /// `vmesh status --json`, or why not.
    fn status(&self) -> Result<Value, String> {
        json_of(&self.cli(&["status", "--json"]))
    }

    /// The endpoints of outbound service `service` in `vmesh clusters --json`.
    fn endpoints(&self, service: &str) -> Result<Vec<Value>, String> {
        let v = json_of(&self.cli(&["clusters", "--json"]))?;
        let cluster = v["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["direction"] == "outbound" && c["service"] == service)
            .ok_or_else(|| format!("no outbound cluster {service}: {v}"))?;
        Ok(cluster["endpoints"].as_array().cloned().unwrap_or_default())
    }

    /// The demo's state directory (`<temp dir>/vmesh-demo-<pid>`).
    fn state_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("vmesh-demo-{}", self.process.pid()))
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "=== vmesh demo (offset {}) stderr (tail) ===\n{}\n=== stdout (tail) ===\n{}",
                self.offset,
                self.process.stderr_tail(60),
                self.process.stdout_tail(10)
            );
        }
        let killed = self.process.try_exit().is_none();
        self.process.kill();
        if killed {
            // A killed demo cannot remove its state directory itself.
            let _ = std::fs::remove_dir_all(self.state_dir());
        }
    }
}

fn json_of(out: &Output) -> Result<Value, String> {
    if !out.status.success() {
        return Err(format!(
            "exit {:?}: {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// An offset that puts every quickstart port on a free loopback port, below the ephemeral
/// range (32768 and up) where the other tests' ports come from.
fn free_offset() -> u16 {
    for _ in 0..200 {
        let draw = RandomState::new().build_hasher().finish();
        let offset = 1000 + u16::try_from(draw % 13_000).expect("below 13000");
        let free = QUICKSTART_PORTS
            .iter()
            .all(|p| TcpListener::bind(("127.0.0.1", p + offset)).is_ok());
        if free {
            return offset;
        }
    }
    panic!("no offset with all of the quickstart's ports {QUICKSTART_PORTS:?} free after 200 draws");
}

fn weight(status: &Value) -> u64 {
    status["lifecycle"]["weight"].as_u64().unwrap_or(0)
}

/// Polls `vmesh status --json` until the advertised weight reaches 100, returning every
/// distinct weight seen on the way, in order.
fn ramp_to_100(demo: &Demo, within: Duration) -> Vec<u64> {
    let mut seen: Vec<u64> = Vec::new();
    eventually(within, "the advertised weight reaching 100", || {
        let s = demo.status()?;
        let w = weight(&s);
        if seen.last() != Some(&w) {
            seen.push(w);
        }
        if w == 100 {
            Ok(())
        } else {
            Err(format!("weights so far {seen:?}; status {}", s["lifecycle"]))
        }
    });
    seen
}

fn assert_rises(seen: &[u64], what: &str) {
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "{what}: the weight only rises: {seen:?}"
    );
    assert!(
        seen.len() >= 3 && seen[0] < 50,
        "{what}: the weight was seen climbing from low through steps to 100: {seen:?}"
    );
}

#[test]
fn demo_shows_identity_registration_ramp_drain_and_proxies() {
    let mut demo = Demo::start();

    // Identity and registration, from nothing installed.
    let status = eventually(Duration::from_secs(30), "the demo registered", || {
        let s = demo.status()?;
        let l = &s["lifecycle"];
        if l["registered"] == true && weight(&s) >= 1 {
            Ok(s)
        } else {
            Err(format!("{l}"))
        }
    });
    let l = &status["lifecycle"];
    assert_eq!(l["identity"]["service"], "local-app", "{l}");
    assert_eq!(l["identity"]["environment"], "demo", "{l}");
    assert_eq!(l["identity_source"], "cmdb", "{l}");
    assert_eq!(l["registry"], "memory (in-process)", "{l}");
    assert_eq!(l["registration_id"], "local-app-quickstart", "{l}");
    assert_eq!(l["drain"], "serving", "{l}");

    // The weight climbs 1 -> 100 over the ramp.
    let first_ramp = ramp_to_100(&demo, Duration::from_secs(60));
    eprintln!("advertised weights seen: {first_ramp:?}");
    assert_rises(&first_ramp, "first ramp");

    // Requests through the demo's outbound ports: to the static `hello` upstreams, and to the
    // registered instance itself, found in the memory registry (outbound -> inbound -> app).
    let hello = Curl::get(demo.url(HELLO, "/")).run();
    assert_eq!(hello.status, 200, "{}", hello.verbose);
    assert!(hello.text().starts_with("hello from hello-"), "{}", hello.text());
    let eps = eventually(Duration::from_secs(10), "local-app discovered", || {
        let eps = demo.endpoints("local-app")?;
        if eps.len() == 1 {
            Ok(eps)
        } else {
            Err(format!("{eps:?}"))
        }
    });
    assert_eq!(eps[0]["address"], demo.addr(INBOUND).to_string(), "{eps:?}");
    assert_eq!(eps[0]["source"], "memory", "{eps:?}");
    let own = Curl::get(demo.url(LOCAL_APP, "/through-the-mesh")).run();
    assert_eq!(own.status, 200, "{}", own.verbose);
    assert_eq!(own.text(), "hello from local-app (GET /through-the-mesh)\n");
    let shared = Curl::get(demo.url(SHARED, "/")).header("Host: local-app").run();
    assert_eq!(shared.status, 200, "{}", shared.verbose);
    assert!(shared.text().starts_with("hello from local-app"), "{}", shared.text());

    // Drain: out of the registry, so out of discovery.
    let drain = demo.cli(&["drain", "--timeout", "30s"]);
    assert_eq!(drain.status.code(), Some(0), "vmesh drain: {drain:?}");
    let s = demo.status().unwrap();
    assert_eq!(s["lifecycle"]["drain"], "drained", "{}", s["lifecycle"]);
    let eps = eventually(Duration::from_secs(10), "local-app gone from clusters", || {
        let eps = demo.endpoints("local-app")?;
        if eps.is_empty() {
            Ok(eps)
        } else {
            Err(format!("{eps:?}"))
        }
    });
    assert!(eps.is_empty());
    let refused = Curl::get(demo.url(LOCAL_APP, "/")).run();
    assert_eq!(refused.status, 503, "{}", refused.verbose);
    assert_eq!(refused.header("x-vmesh-error"), Some("NO_HEALTHY_ENDPOINT"));

    // Undrain: back in, on a new ramp from the bottom.
    let undrain = demo.cli(&["undrain", "--timeout", "30s"]);
    assert_eq!(undrain.status.code(), Some(0), "vmesh undrain: {undrain:?}");
    let s = demo.status().unwrap();
    assert_eq!(s["lifecycle"]["drain"], "serving", "{}", s["lifecycle"]);
    assert_eq!(s["lifecycle"]["registered"], true, "{}", s["lifecycle"]);
    let second_ramp = ramp_to_100(&demo, Duration::from_secs(60));
    eprintln!("advertised weights seen after undrain: {second_ramp:?}");
    assert_rises(&second_ramp, "ramp after undrain");
    let eps = demo.endpoints("local-app").unwrap();
    assert_eq!(eps.len(), 1, "back in clusters: {eps:?}");
    let back = Curl::get(demo.url(LOCAL_APP, "/")).run();
    assert_eq!(back.status, 200, "{}", back.verbose);

    // SIGTERM: a clean exit, and the demo's state directory is gone.
    let state = demo.state_dir();
    assert!(state.is_dir(), "{} exists while the demo runs", state.display());
    demo.process.signal(Signal::SIGTERM);
    let exit = demo.process.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "exit status after SIGTERM");
    assert!(!state.exists(), "{} removed at exit", state.display());
}
