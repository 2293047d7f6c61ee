//! The etcd source's full read of `/vmesh/` at start: more keys than one page (1,000 keys) and
//! more bytes than one gRPC message carries by default (4 MiB) are all read, the keys that sort
//! last included, and the watch goes on from the revision of that read.

use std::net::SocketAddr;

use serde_json::json;
use vmesh_tests::etcd::Etcd;
use vmesh_tests::lifecycle::{self, etcd_key, wait_discovered};
use vmesh_tests::shift::{etcd_meta, etcd_put_instance, etcd_value};
use vmesh_tests::{assert_eventually, AgentBuilder, Curl, Outbound};

/// Filler services of 10 instances each: 2,500 small keys, two and a half pages.
const FILLER: usize = 250;
/// Instances of "big" with a 60 KB value each (a valid record is at most 64 KiB): 4.8 MB.
const BIG: usize = 80;

#[test]
fn a_prefix_of_several_pages_and_over_4_mib_is_read_whole_at_start() {
    let etcd = Etcd::spawn();
    // "big" sorts first, so the first page alone is over 4 MiB; "web" and the shift policy
    // sort last, on the last page.
    let big: Vec<(String, String)> = (0..BIG)
        .map(|i| {
            let meta = json!({"env": "vm", "pad": "x".repeat(60_000)});
            (
                etcd_key("big", &format!("big-{i:02}")),
                etcd_value(addr(20_000 + i), 100, meta),
            )
        })
        .collect();
    put_all(&etcd, &big, 16);
    let filler: Vec<(String, String)> = (0..FILLER * 10)
        .map(|i| {
            let key = etcd_key(&format!("fill-{:03}", i / 10), &format!("i-{}", i % 10));
            (key, etcd_value(addr(30_000 + i), 100, etcd_meta("vm")))
        })
        .collect();
    put_all(&etcd, &filler, 128);
    etcd_put_instance(&etcd, "web", "web-1", addr(40_001), "vm");
    etcd.put("/vmesh/shift/web", r#"{"vm":80,"k8s":20}"#);
    let total = etcd.keys("/vmesh/").len();
    assert!(total > 2_500, "{total} keys");

    let caller = lifecycle::etcd(AgentBuilder::new().agent_set("node", "caller"), &etcd)
        .outbound(Outbound::new("web").no_listen())
        .outbound(Outbound::new("big").no_listen())
        .outbound(Outbound::new("fill-000").no_listen())
        .shared_outbound()
        .start();
    wait_discovered(&caller, "web", &[addr(40_001)]);
    let big_addrs: Vec<SocketAddr> = (0..BIG).map(|i| addr(20_000 + i)).collect();
    wait_discovered(&caller, "big", &big_addrs);
    let fill: Vec<SocketAddr> = (0..10).map(|i| addr(30_000 + i)).collect();
    wait_discovered(&caller, "fill-000", &fill);
    assert_eventually!(
        caller.admin_json("/shift/web")["shift"]["source"] == "central",
        "the shift policy on the last page to be in force"
    );
    assert_eq!(
        caller.admin_json("/shift/web")["shift"]["policy"],
        json!({"vm": 80, "k8s": 20})
    );

    // The watch started right after the read's revision: later writes arrive.
    etcd_put_instance(&etcd, "web", "web-2", addr(40_002), "vm");
    wait_discovered(&caller, "web", &[addr(40_001), addr(40_002)]);
    let log = caller.stderr();
    assert!(!log.contains("decoded message length too large"), "{log}");
}

fn addr(port: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).expect("a port")))
}

/// Puts `kvs` through etcd's JSON gateway (`POST /v3/kv/txn`), `per_txn` puts per transaction
/// (etcd allows 128 operations and 1.5 MiB per request).
fn put_all(etcd: &Etcd, kvs: &[(String, String)], per_txn: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let body = dir.path().join("txn.json");
    for batch in kvs.chunks(per_txn) {
        let ops: Vec<serde_json::Value> = batch
            .iter()
            .map(|(k, v)| json!({"requestPut": {"key": base64(k.as_bytes()), "value": base64(v.as_bytes())}}))
            .collect();
        std::fs::write(&body, json!({ "success": ops }).to_string()).expect("write the txn body");
        let r = Curl::get(format!("{}/v3/kv/txn", etcd.url())).body_file(&body).run();
        assert_eq!(r.status, 200, "txn of {} puts: {}", batch.len(), r.text());
        assert_eq!(r.json()["succeeded"], json!(true), "{}", r.text());
    }
}

/// Standard base64 with padding (the gateway's encoding of bytes fields).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
