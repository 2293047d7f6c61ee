use super::*;

fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
    vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn read(fields: FieldMap, vars: &[(&str, &str)]) -> Result<ServiceIdentity, CmdbError> {
    EnvCmdb::new(fields, &env(vars))?.read("web-7f9c")
}

/// Variables of one table row.
type Vars = &'static [(&'static str, &'static str)];

const REQUIRED: [(&str, &str); 2] = [("VMESH_ID_SERVICE", "orders"), ("VMESH_ID_ENVIRONMENT", "prod")];

#[test]
fn reads_every_field_and_defaults_the_optional_ones() {
    let all: Vars = &[
        ("VMESH_ID_SERVICE", "orders"),
        ("VMESH_ID_ENVIRONMENT", "prod"),
        ("VMESH_ID_ZONE", "eu-west-1a"),
        ("VMESH_ID_VERSION", "3"),
        ("VMESH_ID_WEIGHT", "40"),
        ("VMESH_ID_COLOUR", "blue"),
        ("VMESH_ID_OWNER", "team-a"),
        ("VMESH_ID_TAGS", "pci, ,gold"),
        // Config overrides and other variables in the same map are not identity.
        ("VMESH_AGENT__NODE", "orders-7f9c"),
        ("VMESH_SERVICE", "billing"),
    ];
    let table: [(&str, Vars, ServiceIdentity); 3] = [
        (
            "all fields",
            all,
            ServiceIdentity {
                service: "orders".into(),
                environment: "prod".into(),
                zone: "eu-west-1a".into(),
                version: "3".into(),
                weight: 40,
                colour: "blue".into(),
                owner: "team-a".into(),
                tags: vec!["pci".into(), "gold".into()],
            },
        ),
        ("defaults", &REQUIRED, defaults()),
        (
            "blank optional fields count as unset, values are trimmed",
            &[
                ("VMESH_ID_SERVICE", " orders\n"),
                ("VMESH_ID_ENVIRONMENT", "prod"),
                ("VMESH_ID_ZONE", ""),
                ("VMESH_ID_WEIGHT", "  "),
                ("VMESH_ID_TAGS", ""),
            ],
            defaults(),
        ),
    ];
    for (case, vars, want) in table {
        assert_eq!(
            read(FieldMap::default(), vars).unwrap_or_else(|e| panic!("{case}: {e}")),
            want,
            "{case}"
        );
    }
}

fn defaults() -> ServiceIdentity {
    ServiceIdentity {
        service: "orders".into(),
        environment: "prod".into(),
        zone: String::new(),
        version: String::new(),
        weight: 100,
        colour: String::new(),
        owner: String::new(),
        tags: vec![],
    }
}

/// The `(vm, field, problem)` of a `CMDB_BAD_FIELD` error, which keeps the cache.
fn bad_field(case: &str, got: Result<ServiceIdentity, CmdbError>) -> (String, String, String) {
    match got {
        Err(e @ CmdbError::Field { .. }) => {
            assert_eq!((e.code(), e.keeps_cache()), ("CMDB_BAD_FIELD", true), "{case}");
            let CmdbError::Field { vm, field, problem } = e else {
                unreachable!()
            };
            (vm, field, problem)
        }
        other => panic!("{case}: {other:?}"),
    }
}

#[test]
fn bad_records_name_the_field_and_the_variable() {
    let table: [(&str, Vars, &str, &str); 5] = [
        (
            "missing service",
            &[REQUIRED[1]],
            "service",
            "VMESH_ID_SERVICE is not set",
        ),
        (
            "empty service (a downward API reference to a missing label)",
            &[("VMESH_ID_SERVICE", ""), REQUIRED[1]],
            "service",
            "VMESH_ID_SERVICE is empty",
        ),
        (
            "blank service",
            &[("VMESH_ID_SERVICE", "  "), REQUIRED[1]],
            "service",
            "VMESH_ID_SERVICE is empty",
        ),
        (
            "bad service name",
            &[("VMESH_ID_SERVICE", "or ders"), REQUIRED[1]],
            "service",
            "VMESH_ID_SERVICE: \"or ders\" is not a valid service name",
        ),
        (
            "missing environment",
            &[REQUIRED[0]],
            "environment",
            "VMESH_ID_ENVIRONMENT is not set",
        ),
    ];
    for (case, vars, field, problem) in table {
        let got = bad_field(case, read(FieldMap::default(), vars));
        assert_eq!(got, ("web-7f9c".into(), field.into(), problem.into()), "{case}");
    }
    let e = read(FieldMap::default(), &[REQUIRED[1]]).unwrap_err();
    assert_eq!(e.to_string(), "vm web-7f9c: field service: VMESH_ID_SERVICE is not set");
}

#[test]
fn weight_is_an_integer_from_1_to_100() {
    for (value, want) in [("1", 1), ("100", 100), (" 55 ", 55), ("+7", 7)] {
        let id = read(
            FieldMap::default(),
            &[REQUIRED[0], REQUIRED[1], ("VMESH_ID_WEIGHT", value)],
        );
        assert_eq!(
            id.map(|id| id.weight).unwrap_or_else(|e| panic!("{value:?}: {e}")),
            want
        );
    }
    for junk in ["heavy", "0", "101", "-5", "2.5", "1e2", "4294967296", "50%"] {
        let got = read(
            FieldMap::default(),
            &[REQUIRED[0], REQUIRED[1], ("VMESH_ID_WEIGHT", junk)],
        );
        let (_, field, problem) = bad_field(junk, got);
        assert_eq!(field, "weight");
        assert_eq!(problem, format!("VMESH_ID_WEIGHT = {junk:?} is not an integer 1..=100"));
    }
}

#[test]
fn mapped_names_fall_back_in_order_and_keep_the_other_defaults() {
    let fields: FieldMap =
        toml::from_str("service = \"VMESH_APP\"\nzone = [\"VMESH_ID_ZONE\", \"VMESH_NODE_ZONE\"]\n").unwrap();
    let table: [(&str, Vars, &str); 3] = [
        (
            "first name set",
            &[("VMESH_ID_ZONE", "z1"), ("VMESH_NODE_ZONE", "z2")],
            "z1",
        ),
        (
            "first name blank",
            &[("VMESH_ID_ZONE", ""), ("VMESH_NODE_ZONE", "z2")],
            "z2",
        ),
        ("none set", &[], ""),
    ];
    for (case, vars, zone) in table {
        let mut all = env(&[("VMESH_APP", "orders"), REQUIRED[1]]);
        all.extend(env(vars));
        let id = EnvCmdb::new(fields.clone(), &all)
            .unwrap()
            .read("v")
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(
            (id.service.as_str(), id.environment.as_str(), id.zone.as_str()),
            ("orders", "prod", zone),
            "{case}"
        );
    }
    // The mapped name replaces the default one; it does not add to it.
    let got = EnvCmdb::new(fields, &env(&REQUIRED)).unwrap().read("v");
    assert_eq!(bad_field("replaced", got).2, "VMESH_APP is not set");
}

#[test]
fn names_vmesh_cannot_see_or_that_are_overrides_are_refused_at_once() {
    // The defaults pass the same rules: they could never be taken for config overrides.
    assert!(EnvCmdb::new(FieldMap::default(), &HashMap::new()).is_ok());
    for names in super::named(&EnvCmdb::default_fields()).map(|(_, n)| n.clone()) {
        assert!(
            names
                .iter()
                .all(|n| n.starts_with(EnvCmdb::PREFIX) && !n.contains("__")),
            "{names:?}"
        );
    }
    let fields: FieldMap = toml::from_str(
        "service = \"APP_NAME\"\nzone = [\"VMESH_ID_ZONE\", \"VMESH_AGENT__ZONE\"]\nstatus = \"VMESH_ID_STATUS\"\n",
    )
    .unwrap();
    let e = EnvCmdb::new(fields, &HashMap::new()).unwrap_err();
    assert_eq!(e.code(), "CMDB_CONFIG");
    assert_eq!(
        e.to_string(),
        "cmdb configuration: cmdb.fields.service: \"APP_NAME\" does not start with VMESH_ (the only variables vmesh \
         reads); cmdb.fields.zone: \"VMESH_AGENT__ZONE\" contains \"__\", so it would be read as a config override; \
         cmdb.fields.status: kind = \"env\" has no status to check; leave it out"
    );
}

#[tokio::test]
async fn serves_as_a_cmdb() {
    let cmdb: Box<dyn Cmdb> = Box::new(EnvCmdb::new(FieldMap::default(), &env(&REQUIRED)).unwrap());
    assert_eq!(cmdb.identity("orders-7f9c").await.unwrap(), defaults());
    assert_eq!(cmdb.describe(), "env VMESH_ID_SERVICE");
}
