//! Unit tests of the Consul source: health answers, KV answers.

use super::*;
use serde_json::json;

#[test]
fn health_entries_map_to_labelled_endpoints() {
    let (tx, rx) = watch::channel(View::default());
    let body = json!([
        {"Node": {"Address": "127.0.0.5"}, "Service": {"Address": "", "Port": 80, "Meta": {"vmesh-weight": "100", "vmesh-zone": "z1", "vmesh-version": "v2", "vmesh-colour": "blue", "vmesh-ramp-start": "100", "vmesh-ramp-window": "60"}, "Weights": {"Passing": 10, "Warning": 1}}},
        {"Node": {"Address": "127.0.0.5"}, "Service": {"Address": "127.0.0.6", "Port": 81, "Meta": {"external-source": "kubernetes"}, "Weights": {"Passing": 1}}},
        {"Node": {"Address": "127.0.0.5"}, "Service": {"Address": "not-an-ip", "Port": 82}},
        {"Node": {}, "Service": {"Port": 83}},
        {"Service": "junk"},
        {"Node": {"Address": "127.0.0.7"}, "Service": {"Port": 70000}},
        {"Node": {"Address": "127.0.0.8"}, "Service": {"Port": 84, "Meta": {"vmesh-env": "ecs"}}},
    ])
    .to_string();
    apply_answer(&tx, "web", body.as_bytes(), true, false);
    let v = rx.borrow().clone();
    let eps = v.endpoints.unwrap();
    assert_eq!(eps.len(), 3, "malformed entries are skipped: {eps:?}");
    assert_eq!(eps[0].address.to_string(), "127.0.0.5:80");
    assert_eq!(
        (eps[0].weight, &*eps[0].zone, &*eps[0].version, &*eps[0].colour),
        (10, "z1", "v2", "blue")
    );
    assert_eq!(eps[0].ramp.map(|r| (r.start, r.window, r.target)), Some((100, 60, 100)));
    assert_eq!(
        (eps[1].address.to_string().as_str(), eps[1].env.as_str(), eps[1].weight),
        ("127.0.0.6:81", "k8s", 100)
    );
    assert_eq!(eps[2].env, "ecs", "mapped to `other` when labelled");
}

#[test]
fn instances_in_maintenance_are_not_endpoints_even_with_passing_only_off() {
    let (tx, rx) = watch::channel(View::default());
    let body = json!([
        {"Node": {"Address": "127.0.0.5"}, "Service": {"Port": 80},
         "Checks": [{"CheckID": "service:web-1", "Status": "critical"}]},
        {"Node": {"Address": "127.0.0.5"}, "Service": {"Port": 81},
         "Checks": [{"CheckID": "service:web-2", "Status": "passing"}, {"CheckID": "_service_maintenance:web-2", "Status": "critical"}]},
        {"Node": {"Address": "127.0.0.6"}, "Service": {"Port": 82},
         "Checks": [{"CheckID": "_node_maintenance", "Status": "critical"}]},
        {"Node": {"Address": "127.0.0.7"}, "Service": {"Port": 83}, "Checks": "junk"},
        {"Node": {"Address": "127.0.0.8"}, "Service": {"Port": 84}, "Checks": [7, {"CheckID": 3}]},
    ])
    .to_string();
    apply_answer(&tx, "web", body.as_bytes(), true, false);
    let eps = rx.borrow().endpoints.clone().unwrap();
    let addrs: Vec<String> = eps.iter().map(|e| e.address.to_string()).collect();
    assert_eq!(
        addrs,
        ["127.0.0.5:80", "127.0.0.7:83", "127.0.0.8:84"],
        "a failing check alone keeps the instance (passing_only off); maintenance removes it"
    );
}

#[test]
fn bad_answers_keep_the_last_set() {
    let (tx, rx) = watch::channel(View::default());
    let good = json!([{"Node": {"Address": "127.0.0.5"}, "Service": {"Port": 80}}]).to_string();
    apply_answer(&tx, "web", good.as_bytes(), true, false);
    apply_answer(&tx, "web", b"{\"not\": \"an array\"}", true, false);
    assert_eq!(rx.borrow().endpoints.as_ref().map(|e| e.len()), Some(1));
    assert!(rx
        .borrow()
        .error
        .as_deref()
        .is_some_and(|e| e.contains("not a JSON array")));
    apply_answer(&tx, "web", b"[]", true, true);
    assert_eq!(rx.borrow().endpoints.as_ref().map(|e| e.len()), Some(1));
    assert!(rx.borrow().error.as_deref().is_some_and(|e| e.contains("ACL")));
    apply_answer(&tx, "web", b"[]", true, false);
    assert_eq!(
        rx.borrow().endpoints.as_ref().map(|e| e.len()),
        Some(0),
        "a real empty answer empties"
    );
    assert_eq!(rx.borrow().error, None);
}

#[test]
fn kv_answers_become_policies() {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut p = Policies::default();
    let body = json!([
        {"Key": "vmesh/shift/web", "Value": b64(r#"{"vm": 80, "k8s": 20}"#), "ModifyIndex": 7},
        {"Key": "vmesh/shift/api", "Value": b64("junk"), "ModifyIndex": 8},
        {"Key": "vmesh/shift/", "Value": null, "ModifyIndex": 3},
    ])
    .to_string();
    apply_kv(&mut p, body.as_bytes(), true).unwrap();
    assert_eq!(p.by_service["web"].policy, Some(Policy { vm: 80, k8s: 20 }));
    assert_eq!(p.by_service["web"].index, 7);
    assert!(p.by_service["api"].error.is_some());
    apply_kv(&mut p, b"", false).unwrap();
    assert!(p.by_service.is_empty(), "a 404 (no keys) forgets every policy");
    assert!(apply_kv(&mut p, b"<html>", true).is_err());
}

#[test]
fn unchanged_policies_wake_nobody() {
    let (tx, mut rx) = watch::channel(Arc::new(Policies::default()));
    rx.borrow_and_update();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let body =
        json!([{"Key": "vmesh/shift/web", "Value": b64(r#"{"vm": 80, "k8s": 20}"#), "ModifyIndex": 7}]).to_string();
    let read = |tx: &watch::Sender<Arc<Policies>>| {
        let mut p = (**tx.borrow()).clone();
        apply_kv(&mut p, body.as_bytes(), true).unwrap();
        p.synced = true;
        publish(tx, p);
    };
    read(&tx);
    assert!(rx.has_changed().unwrap(), "the first read publishes");
    rx.borrow_and_update();
    read(&tx);
    assert!(!rx.has_changed().unwrap(), "the same answer again wakes nobody");
}
