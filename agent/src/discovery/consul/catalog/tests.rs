//! Unit tests of the catalog-mode change detector: fingerprints and explanations.

use super::*;

fn row<'a>(node: &'a str, check: &'a str, service: &'a str, status: &'a str, create: u64, modify: u64) -> CheckRow<'a> {
    CheckRow {
        node: node.into(),
        check_id: check.into(),
        status: status.into(),
        service_id: if service.is_empty() {
            "".into()
        } else {
            format!("{service}-{node}").into()
        },
        service_name: service.into(),
        create_index: create,
        modify_index: modify,
    }
}

fn watched(names: &[&str]) -> HashSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Folds `rows` as one checks answer.
fn apply(d: &mut Detector, watched: &HashSet<String>, prev: u64, index: u64, rows: &[CheckRow]) -> Vec<String> {
    let mut checks = Checks::new(watched, prev, index);
    for r in rows {
        checks.add(r.clone());
    }
    d.fold(checks)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn only_services_whose_checks_changed_are_asked_again() {
    let mut d = Detector::default();
    let w = watched(&["web", "api", "db"]);
    let base = vec![
        row("n1", "serfHealth", "", "passing", 5, 5),
        row("n1", "service:web-n1", "web", "passing", 10, 10),
        row("n2", "service:web-n2", "web", "passing", 11, 11),
        row("n2", "service:api-n2", "api", "passing", 12, 12),
        row("n3", "service:other-n3", "other", "passing", 13, 13),
    ];
    assert!(
        apply(&mut d, &w, 0, 13, &base).is_empty(),
        "the first answer is the baseline"
    );
    assert!(apply(&mut d, &w, 13, 13, &base).is_empty(), "the same checks again");

    // web-n2 fails; an unwatched service changes too.
    let mut next = base.clone();
    next[2] = row("n2", "service:web-n2", "web", "critical", 11, 20);
    next[4] = row("n3", "service:other-n3", "other", "critical", 13, 21);
    assert_eq!(apply(&mut d, &w, 13, 21, &next), ["web"]);

    // n1's node check fails: web has a check on n1, api does not.
    let mut next2 = next.clone();
    next2[0] = row("n1", "serfHealth", "", "critical", 5, 22);
    assert_eq!(apply(&mut d, &w, 21, 22, &next2), ["web"]);

    // db has no check at all, but its answers named n1: n1's node check counts for it.
    d.note_nodes_for_test("db", &["n1"]);
    let mut next3 = next2.clone();
    next3[0] = row("n1", "serfHealth", "", "passing", 5, 23);
    assert_eq!(sorted(apply(&mut d, &w, 22, 23, &next3)), ["db", "web"]);
    // A node without node-level checks joining a service's nodes changes nothing.
    d.note_nodes_for_test("db", &["n9"]);
    assert!(apply(&mut d, &w, 23, 23, &next3).is_empty());
}

#[test]
fn a_catalog_write_is_explained_by_a_check_written_or_deleted_at_its_index() {
    let mut d = Detector::default();
    let w = watched(&["web"]);
    let base = vec![row("n1", "service:web-n1", "web", "passing", 10, 10)];
    apply(&mut d, &w, 0, 10, &base);
    // A new instance with its check at 30 (registration): explained at 30, not at 29 or 31.
    let mut added = base.clone();
    added.push(row("n2", "service:web-n2", "web", "passing", 30, 30));
    assert_eq!(apply(&mut d, &w, 10, 30, &added), ["web"]);
    assert!(d.explained(30));
    assert!(!d.explained(29) && !d.explained(31));
    // The instance leaves at 40: its check disappears; the window (30, 40] holds a deletion.
    assert_eq!(apply(&mut d, &w, 30, 40, &base), ["web"]);
    assert!(d.explained(40) && d.explained(35));
    // A status change at 50 is a check write, yet no deletion: only 50 is explained.
    let failed = vec![row("n1", "service:web-n1", "web", "critical", 10, 50)];
    apply(&mut d, &w, 40, 55, &failed);
    assert!(d.explained(50));
    assert!(
        !d.explained(52),
        "a meta-only write at 52 is not explained by the check at 50"
    );
    // An index reset forgets the windows.
    apply(&mut d, &w, 55, 3, &failed);
    assert!(!d.explained(50));
}

#[test]
fn tags_and_presence_in_the_catalog_are_fingerprinted() {
    let mut d = Detector::default();
    let w = watched(&["web", "api", "new"]);
    let cat = |entries: &[(&str, &[&str])]| -> HashMap<String, Option<Vec<String>>> {
        entries
            .iter()
            .map(|(s, tags)| (s.to_string(), Some(tags.iter().map(|t| t.to_string()).collect())))
            .collect()
    };
    assert!(d
        .apply_catalog(&w, &cat(&[("web", &["a", "b"]), ("api", &[]), ("x", &["y"])]))
        .is_empty());
    // Tag order is not a change; a new tag and a new service are; unwatched ones are not.
    let changed = d.apply_catalog(
        &w,
        &cat(&[("web", &["b", "a"]), ("api", &["v2"]), ("new", &[]), ("x", &[])]),
    );
    assert_eq!(sorted(changed), ["api", "new"]);
    let mut gone = cat(&[("web", &["a", "b"]), ("api", &["v2"])]);
    gone.insert("x".into(), None);
    assert_eq!(d.apply_catalog(&w, &gone), ["new"]);
}

impl Detector {
    fn note_nodes_for_test(&mut self, service: &str, nodes: &[&str]) {
        let set = self.nodes.entry(service.to_owned()).or_default();
        set.extend(nodes.iter().map(|n| n.to_string()));
    }
}

#[test]
fn an_answer_is_folded_as_it_is_read() {
    let mut d = Detector::default();
    let w = watched(&["web"]);
    let body = br#"[{"Node": "n1", "CheckID": "serfHealth", "Status": "passing", "ServiceID": "", "ServiceName": "",
                     "CreateIndex": 5, "ModifyIndex": 5, "Output": "ok", "Definition": {}},
                    {"Node": "n1", "CheckID": "service:web-1", "Status": "passing", "ServiceID": "web-1",
                     "ServiceName": "web", "ServiceTags": [], "CreateIndex": 10, "ModifyIndex": 10}]"#;
    assert!(d.apply_checks(&w, 0, 10, body).unwrap().is_empty());
    let failed = String::from_utf8_lossy(body)
        .replace(
            r#""Status": "passing", "ServiceID": "web-1""#,
            r#""Status": "critical", "ServiceID": "web-1""#,
        )
        .replace(r#""ModifyIndex": 10"#, r#""ModifyIndex": 12"#);
    assert_eq!(d.apply_checks(&w, 10, 12, failed.as_bytes()).unwrap(), ["web"]);
    assert!(d.explained(12));
    assert!(d.apply_checks(&w, 12, 13, br#"{"not": "a list"}"#).is_err());
    assert!(
        d.apply_checks(&w, 12, 13, br#"[{"Node": "n1"}]"#).is_err(),
        "a check without its ID"
    );
}

#[test]
fn a_service_watched_after_an_answer_is_not_new_to_the_next_one() {
    let mut d = Detector::default();
    let rows = vec![
        row("n1", "service:web-n1", "web", "passing", 10, 10),
        row("n1", "service:api-n1", "api", "passing", 11, 11),
    ];
    apply(&mut d, &watched(&["web"]), 0, 11, &rows);
    // api is watched from now on: the same checks are no change for it.
    assert!(apply(&mut d, &watched(&["web", "api"]), 11, 12, &rows).is_empty());
    let cat: HashMap<String, Option<Vec<String>>> = [
        ("web".to_string(), Some(vec![])),
        ("api".to_string(), Some(vec!["v1".to_string()])),
    ]
    .into();
    assert!(d.apply_catalog(&watched(&["web"]), &cat).is_empty());
    assert!(d.apply_catalog(&watched(&["web", "api"]), &cat).is_empty());
    // A watched service whose checks all go away changes.
    assert_eq!(apply(&mut d, &watched(&["web", "api"]), 12, 13, &rows[..1]), ["api"]);
}
