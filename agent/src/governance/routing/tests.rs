use super::*;

fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).map(|r| r.into_parts().0).unwrap()
}

fn rules(toml_text: &str) -> Vec<RouteConfig> {
    #[derive(Deserialize)]
    struct Doc {
        route: Vec<RouteConfig>,
    }
    toml::from_str::<Doc>(toml_text).unwrap().route
}

const TABLE: &str = r#"
[[route]]
name = "beta-users"
match = { service = "orders", headers = [{ name = "x-beta", present = true }] }
split = [{ version = "v2", weight = 100 }]

[[route]]
name = "admin"
match = { service = "orders", path = { prefix = "/admin/" }, methods = ["POST", "PUT"] }
service = "orders-admin"

[[route]]
name = "versioned"
match = { path = { regex = "^/v[0-9]+/items$" }, query = [{ name = "debug", exact = "1" }] }
timeout = "2s"

[[route]]
name = "exact"
match = { service = "orders", path = { exact = "/health" } }
"#;

#[test]
fn first_match_wins_in_order() {
    let compiled = RouteRules::compile(&rules(TABLE), None);
    let orders = compiled.for_service("orders");
    let name = |p: &Parts| select(&orders, p).map(|r| r.name.to_string());
    assert_eq!(
        name(&parts("GET", "/admin/x", &[("x-beta", "1")])).as_deref(),
        Some("beta-users")
    );
    assert_eq!(name(&parts("POST", "/admin/x", &[])).as_deref(), Some("admin"));
    assert_eq!(name(&parts("GET", "/admin/x", &[])), None, "method must match");
    assert_eq!(
        name(&parts("GET", "/v2/items?debug=1", &[])).as_deref(),
        Some("versioned")
    );
    assert_eq!(name(&parts("GET", "/v2/items?debug=0", &[])), None);
    assert_eq!(name(&parts("GET", "/health", &[])).as_deref(), Some("exact"));
    assert_eq!(name(&parts("GET", "/health/x", &[])), None);
}

#[test]
fn rules_are_grouped_by_the_addressed_service() {
    let compiled = RouteRules::compile(&rules(TABLE), None);
    let other = compiled.for_service("payments");
    assert_eq!(other.len(), 1, "only the rule without match.service");
    assert_eq!(compiled.for_service("orders").len(), 4);
    assert!(RouteRules::compile(&[], None).for_service("orders").is_empty());
}

#[test]
fn unchanged_rules_keep_their_limiter_across_a_reload() {
    let text = format!("{TABLE}\n[[route]]\nname = \"limited\"\nmatch = {{ path = {{ prefix = \"/slow\" }} }}\nrate_limit = {{ rate = \"5/s\" }}\n");
    let a = RouteRules::compile(&rules(&text), None);
    let b = RouteRules::compile(&rules(&text), Some(&a));
    let limiter = |r: &RouteRules| {
        r.for_service("payments")
            .iter()
            .find(|r| &*r.name == "limited")
            .and_then(|r| r.rate_limit.clone())
            .unwrap()
    };
    assert!(Arc::ptr_eq(&limiter(&a), &limiter(&b)));
}

#[test]
fn every_problem_is_named() {
    let bad = rules(
        r#"
[[route]]
match = { path = { regex = "(" }, methods = ["get"], headers = [{ name = "bad header", exact = "x", present = true }] }
split = [{ version = "v2", weight = 10 }]

[[route]]
match = { service = "nope" }

[[route]]
match = { service = "orders" }

[[route]]
name = "shadowed"
match = { service = "orders", path = { prefix = "/" } }
"#,
    );
    let p = validate(&bad, Some(&["orders"]));
    let text = format!("{p:#?}");
    for want in [
        "route[0].match.path.regex",
        "route[0].match.methods",
        "route[0].match.headers[0].name",
        "give at most one",
        "route[0].split",
        "sum to 10",
        "route[1].match.service",
        "route[3].match",
        "unreachable",
    ] {
        assert!(text.contains(want), "missing {want:?} in {text}");
    }
    assert!(validate(&rules(TABLE), Some(&["orders", "orders-admin"])).is_empty());
    let regex = p.iter().find(|(k, _)| k == "route[0].match.path.regex").unwrap();
    assert!(!regex.1.contains('\n'), "one line: {:?}", regex.1);
    assert!(regex.1.ends_with("unclosed group"), "{:?}", regex.1);
}

#[test]
fn query_values_are_decoded() {
    assert_eq!(query_param("a=1&b=x%20y&c", "b").as_deref(), Some("x y"));
    assert_eq!(query_param("a=1&b=x+y", "b").as_deref(), Some("x y"));
    assert_eq!(query_param("c", "c").as_deref(), Some(""));
    assert_eq!(query_param("a=%zz", "a").as_deref(), Some("%zz"));
    assert_eq!(query_param("a=%4", "a").as_deref(), Some("%4"));
}

proptest::proptest! {
    /// Matching never panics on any path, query or header value.
    #[test]
    fn matching_is_total(path in "/[ -~]{0,40}", q in "[ -~]{0,40}", h in "[ -~]{0,20}") {
        let compiled = RouteRules::compile(&rules(TABLE), None);
        let uri = format!("{}?{}", path.replace(['#', '?', ' ', '"', '<', '>', '`', '{', '}', '|', '\\', '^'], "_"), q.replace(['#', ' ', '"', '<', '>', '`', '{', '}', '|', '\\', '^'], "_"));
        if let Ok(p) = http::Request::builder().uri(uri).header("x-beta", h.trim()).body(()).map(|r| r.into_parts().0) {
            let _ = select(&compiled.for_service("orders"), &p);
        }
    }
}
