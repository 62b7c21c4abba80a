//! Our generated OpenAPI document against Fly's (tests/data/fly-machines-openapi.json,
//! provenance in the .SOURCE.txt next to it): the operations we implement must have
//! Fly's paths, methods, parameters (with the same `in` and `required`), request body
//! presence and fields, required fields and success status.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

fn fly() -> Value {
    serde_json::from_str(include_str!("data/fly-machines-openapi.json")).unwrap()
}

fn ours() -> Value {
    aloft_api::openapi::document_json()
}

/// Resolves `$ref`, `allOf` and nullable `oneOf` to (properties, required).
fn shape(doc: &Value, s: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        return shape(doc, &doc["components"]["schemas"][name]);
    }
    let mut props = BTreeSet::new();
    let mut req = BTreeSet::new();
    for key in ["allOf", "oneOf", "anyOf"] {
        for sub in s.get(key).and_then(Value::as_array).into_iter().flatten() {
            let (p, r) = shape(doc, sub);
            props.extend(p);
            req.extend(r);
        }
    }
    if let Some(p) = s.get("properties").and_then(Value::as_object) {
        props.extend(p.keys().cloned());
    }
    if let Some(r) = s.get("required").and_then(Value::as_array) {
        req.extend(r.iter().filter_map(Value::as_str).map(str::to_string));
    }
    (props, req)
}

fn params(op: &Value) -> BTreeMap<(String, String), bool> {
    op.get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            (
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["in"].as_str().unwrap().to_string(),
                ),
                p.get("required").and_then(Value::as_bool).unwrap_or(false),
            )
        })
        .collect()
}

/// Fly parameters we do not take, per operation, each for a stated reason.
fn known_missing() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([
        // Roles are not modelled beyond token roles.
        ("Apps_list", &["app_role"][..]),
        // Secrets have one version line; there is no replica lag to wait for.
        ("Secrets_list", &["min_version", "show_secrets"][..]),
        ("Secret_get", &["min_version", "show_secrets"][..]),
        // Agents keep no event cursor yet.
        ("Machines_wait", &["from_event_id"][..]),
        // Volumes carry no bulky fields to leave out.
        ("Volumes_list", &["summary"][..]),
    ])
}

/// Aloft's own operations (not in Fly's Machines API).
const ALOFT_ONLY: &[&str] = &[
    "Logs_list",
    "Releases_list",
    "Releases_create",
    "Releases_show",
    "Releases_update",
    "Releases_rollback",
    "Tokens_list",
    "Tokens_create",
    "Tokens_revoke",
    "Oidc_jwks",
    "Oidc_discovery",
    "Machines_console",
];

/// Response fields we add to Fly's shapes.
const EXTRA_RESPONSE_FIELDS: &[(&str, &str)] = &[
    // Aloft tokens are not macaroons: the verified token's scope replaces the caveats.
    ("Tokens_authenticate", "token"),
    // fly-go (flyctl) reads leases from a `{"status", "data"}` envelope.
    ("Machines_show_lease", "status"),
    ("Machines_show_lease", "data"),
    ("Machines_create_lease", "status"),
    ("Machines_create_lease", "data"),
];

#[test]
fn operations_match_flys_document() {
    let fly = fly();
    let ours = ours();
    let missing = known_missing();
    let mut checked = 0;
    let mut problems = Vec::new();
    for (path, item) in ours["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap_or("?");
            if ALOFT_ONLY.contains(&id) {
                continue;
            }
            let Some(fop) = fly["paths"].get(path).and_then(|i| i.get(method)) else {
                problems.push(format!("{method} {path}: not in Fly's document"));
                continue;
            };
            checked += 1;
            if fop["operationId"] != op["operationId"] {
                problems.push(format!(
                    "{method} {path}: operationId {id} vs {}",
                    fop["operationId"]
                ));
            }
            let (ours_p, fly_p) = (params(op), params(fop));
            for (k, req) in &ours_p {
                match fly_p.get(k) {
                    None => problems.push(format!("{id}: parameter {k:?} is not Fly's")),
                    Some(fr) if fr != req => {
                        problems.push(format!("{id}: parameter {k:?} required={req}, Fly: {fr}"))
                    }
                    _ => {}
                }
            }
            let allowed = missing.get(id).copied().unwrap_or_default();
            for k in fly_p.keys() {
                if !ours_p.contains_key(k) && !allowed.contains(&k.0.as_str()) {
                    problems.push(format!("{id}: missing Fly parameter {k:?}"));
                }
            }
            for k in allowed {
                if ours_p.keys().any(|(n, _)| n == k) {
                    problems.push(format!(
                        "{id}: {k} is implemented; drop it from known_missing"
                    ));
                }
            }
            // Request body: present iff Fly has one, same `required`, fields within Fly's.
            match (op.get("requestBody"), fop.get("requestBody")) {
                (None, None) => {}
                (Some(b), Some(fb)) => {
                    let r = b.get("required").and_then(Value::as_bool).unwrap_or(false);
                    let fr = fb.get("required").and_then(Value::as_bool).unwrap_or(false);
                    if r != fr {
                        problems.push(format!("{id}: body required={r}, Fly: {fr}"));
                    }
                    let s = &b["content"]["application/json"]["schema"];
                    let fs = &fb["content"]["application/json"]["schema"];
                    let (props, req) = shape(&ours, s);
                    let (fprops, freq) = shape(&fly, fs);
                    for p in props.difference(&fprops) {
                        problems.push(format!("{id}: body field {p} is not Fly's"));
                    }
                    if req != freq {
                        problems.push(format!("{id}: body required fields {req:?}, Fly: {freq:?}"));
                    }
                }
                (o, f) => problems.push(format!(
                    "{id}: request body {} here, {} in Fly's",
                    o.is_some(),
                    f.is_some()
                )),
            }
            // Success status and its fields.
            let fly_ok: Vec<&String> = fop["responses"]
                .as_object()
                .unwrap()
                .keys()
                .filter(|c| c.starts_with('2'))
                .collect();
            let ours_ok: Vec<&String> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .filter(|c| c.starts_with('2'))
                .collect();
            if fly_ok != ours_ok {
                problems.push(format!(
                    "{id}: success statuses {ours_ok:?}, Fly: {fly_ok:?}"
                ));
                continue;
            }
            let code = ours_ok[0];
            let fs = fop["responses"][code].pointer("/content/application~1json/schema");
            let s = op["responses"][code].pointer("/content/application~1json/schema");
            if let (Some(s), Some(fs)) = (s, fs) {
                let (s, fs) = match (s.get("items"), fs.get("items")) {
                    (Some(i), Some(fi)) => (i, fi),
                    (None, None) => (s, fs),
                    _ => {
                        problems.push(format!("{id}: response array-ness differs from Fly's"));
                        continue;
                    }
                };
                let (props, _) = shape(&ours, s);
                let (fprops, _) = shape(&fly, fs);
                for p in props.difference(&fprops) {
                    if !EXTRA_RESPONSE_FIELDS.contains(&(id, p.as_str())) && !fprops.is_empty() {
                        problems.push(format!("{id}: response field {p} is not Fly's"));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} differences:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(checked >= 40, "only {checked} operations checked");
}

/// Each of Aloft's own operations is in the document (the list cannot hide a gap).
#[test]
fn aloft_only_operations_are_documented() {
    let doc = ours();
    let ids: BTreeSet<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .filter_map(|op| op.get("operationId").and_then(Value::as_str))
        .collect();
    for id in ALOFT_ONLY {
        assert!(ids.contains(id), "{id} is not in /v1/openapi.json");
    }
    let console = &doc["paths"]["/apps/{app_name}/machines/{machine_id}/console"]["get"];
    assert!(!console["responses"]["101"].is_null(), "{console}");
}

#[test]
fn document_is_served_and_self_consistent() {
    let doc = ours();
    assert_eq!(doc["servers"][0]["url"], "/v1");
    // Every $ref resolves.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    out.push(r.to_string());
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        let name = r.trim_start_matches("#/components/schemas/");
        assert!(
            !doc["components"]["schemas"][name].is_null(),
            "dangling {r}"
        );
    }
    if let Ok(path) = std::env::var("ALOFT_DUMP_OPENAPI") {
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    }
    // Machine responses document Fly's field names.
    let m = &doc["components"]["schemas"]["Machine"]["properties"];
    for f in [
        "id",
        "name",
        "state",
        "region",
        "instance_id",
        "private_ip",
        "config",
        "created_at",
    ] {
        assert!(!m[f].is_null(), "Machine.{f}");
    }
}

mod common;

#[test]
fn response_checker_rejects_wrong_bodies() {
    let doc = ours();
    let machine = serde_json::json!({"$ref": "#/components/schemas/Machine"});
    let good = serde_json::json!({"id":"m1","name":"n","state":"started","region":"ams",
        "instance_id":"v1","private_ip":"fdaa::2","config":{"image":"i"},
        "created_at":"2024-01-01T00:00:00Z","updated_at":"2024-01-01T00:00:00Z","host_status":"ok"});
    let check = |v: &Value| {
        let mut errs = Vec::new();
        common::schema::validate(&doc, &machine, v, "$", &mut errs);
        errs
    };
    assert!(check(&good).is_empty(), "{:?}", check(&good));
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("id");
    assert!(!check(&missing).is_empty());
    let mut wrong = good.clone();
    wrong["config"]["guest"] = serde_json::json!({"cpus": "one"});
    assert!(!check(&wrong).is_empty());
    let mut extra = good.clone();
    extra["surprise"] = serde_json::json!(1);
    assert!(!check(&extra).is_empty());
}
