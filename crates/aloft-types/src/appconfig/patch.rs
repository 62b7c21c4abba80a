//! flyctl's structural patches (its `patches.go`), applied to the JSON tree the schema
//! walk produced, in flyctl's order: services, experimental, vm, mounts, metrics, build.
//! Value-level rules (env, durations, ports, concurrency strings) were already applied
//! by the walk.

use serde_json::{Map, Value};

pub(crate) fn apply(cfg: &mut Map<String, Value>) {
    patch_services(cfg);
    patch_experimental(cfg);
    merge_lists(cfg, &["compute", "computes", "vm"], "vm");
    merge_lists(cfg, &["mount", "mounts"], "mounts");
    merge_lists(cfg, &["metric", "metrics"], "metrics");
    patch_build(cfg);
}

/// Services that end up empty are dropped, as flyctl does.
fn patch_services(cfg: &mut Map<String, Value>) {
    if let Some(Value::Array(services)) = cfg.get_mut("services") {
        services.retain(|s| s.as_object().is_some_and(|m| !m.is_empty()));
    }
}

/// `[experimental]`: `kill_timeout` moves to the top level if there is none there;
/// `metrics_port`/`metrics_path` become `[metrics]` if there is none; an empty section goes.
fn patch_experimental(cfg: &mut Map<String, Value>) {
    let Some(Value::Object(exp)) = cfg.get_mut("experimental") else {
        return;
    };
    let kill_timeout = exp.remove("kill_timeout");
    let mut metrics = Map::new();
    if let Some(port) = exp.remove("metrics_port") {
        metrics.insert("port".into(), port);
    }
    if let Some(path) = exp.remove("metrics_path") {
        metrics.insert("path".into(), path);
    }
    if exp.is_empty() {
        cfg.remove("experimental");
    }
    if let Some(kt) = kill_timeout
        && !cfg.contains_key("kill_timeout")
    {
        cfg.insert("kill_timeout".into(), kt);
    }
    if !metrics.is_empty() && !cfg.contains_key("metrics") && !cfg.contains_key("metric") {
        cfg.insert("metrics".into(), Value::Array(vec![Value::Object(metrics)]));
    }
}

fn merge_lists(cfg: &mut Map<String, Value>, from: &[&str], to: &str) {
    let mut merged = Vec::new();
    for key in from {
        if let Some(Value::Array(items)) = cfg.remove(*key) {
            merged.extend(items);
        }
    }
    if !merged.is_empty() {
        cfg.insert(to.into(), Value::Array(merged));
    }
}

fn patch_build(cfg: &mut Map<String, Value>) {
    let Some(Value::Object(build)) = cfg.get_mut("build") else {
        return;
    };
    if let Some(target) = build.remove("build_target") {
        build.insert("build-target".into(), target);
    }
    if build.is_empty() {
        cfg.remove("build");
    }
}
