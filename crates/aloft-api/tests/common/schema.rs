//! A small JSON Schema checker for the OpenAPI 3.1 document utoipa generates (`$ref`,
//! `type` (also as a list), `properties`, `required`, `items`, `additionalProperties`,
//! `enum`, `oneOf`/`anyOf`/`allOf`), and the lookup of the operation a response answers.

use axum::http::Method;
use serde_json::Value;

/// Checks `value` against `schema`; returns the mismatches with their JSON paths.
pub fn validate(doc: &Value, schema: &Value, value: &Value, path: &str, errs: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        let target = &doc["components"]["schemas"][name];
        assert!(!target.is_null(), "dangling $ref {r}");
        return validate(doc, target, value, path, errs);
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            validate(doc, s, value, path, errs);
        }
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(alts) = schema.get(key).and_then(Value::as_array) {
            let ok = alts.iter().any(|s| {
                let mut e = Vec::new();
                validate(doc, s, value, path, &mut e);
                e.is_empty()
            });
            if !ok {
                errs.push(format!("{path}: matches none of {key}"));
            }
        }
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "null" => value.is_null(),
            "string" => value.is_string(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => true,
        });
        if !ok {
            errs.push(format!("{path}: expected {types:?}, got {value}"));
            return;
        }
    }
    if let Some(en) = schema.get("enum").and_then(Value::as_array)
        && !en.contains(value)
    {
        errs.push(format!("{path}: {value} not in enum {en:?}"));
    }
    if let Some(obj) = value.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        if let Some(req) = schema.get("required").and_then(Value::as_array) {
            for r in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    errs.push(format!("{path}: required field `{r}` missing"));
                }
            }
        }
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(doc, s, v, &format!("{path}.{k}"), errs),
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        errs.push(format!("{path}: unexpected field `{k}`"))
                    }
                    Some(s @ Value::Object(_)) => validate(doc, s, v, &format!("{path}.{k}"), errs),
                    // A documented object must list every field it returns.
                    _ if props.is_some() => errs.push(format!("{path}: undocumented field `{k}`")),
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            validate(doc, items, v, &format!("{path}[{i}]"), errs);
        }
    }
}

/// Does a concrete path match a template (`/apps/{app_name}`)?
fn matches(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && !p.is_empty()) || t == p)
}

/// Checks a response body of `method path` against the document: a documented status
/// uses its schema (no schema = no body); an undocumented error status uses
/// `ErrorResponse`; an undocumented success status fails.
pub fn check_response(doc: &Value, method: &Method, path: &str, status: u16, body: &Value) {
    let rel = path
        .split('?')
        .next()
        .unwrap()
        .strip_prefix("/v1")
        .unwrap_or(path);
    let m = method.as_str().to_lowercase();
    let op = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(t, _)| matches(t, rel))
        // Prefer literal segments over templates (e.g. /tokens/current).
        .min_by_key(|(t, _)| t.matches('{').count())
        .and_then(|(_, item)| item.get(&m));
    let Some(op) = op else {
        assert!(
            status >= 400,
            "{method} {path} answered {status} but is not documented"
        );
        return;
    };
    let resp = &op["responses"][status.to_string()];
    let schema = if resp.is_null() {
        assert!(
            status >= 400,
            "{method} {path}: status {status} is not documented"
        );
        serde_json::json!({"$ref": "#/components/schemas/ErrorResponse"})
    } else {
        match resp.pointer("/content/application~1json/schema") {
            Some(s) => s.clone(),
            None => {
                assert!(
                    body.is_null(),
                    "{method} {path} {status}: undocumented body {body}"
                );
                return;
            }
        }
    };
    let mut errs = Vec::new();
    validate(doc, &schema, body, "$", &mut errs);
    assert!(
        errs.is_empty(),
        "{method} {path} {status}: body does not match the document:\n{}\nbody: {body}",
        errs.join("\n")
    );
}
