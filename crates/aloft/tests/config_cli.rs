//! `aloft config validate|show|machine` as a user runs them.

use std::path::Path;
use std::process::{Command, Output};

fn aloft(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aloft"))
        .args(args)
        .current_dir(dir)
        .env("ALOFT_DATA_DIR", dir.join("data"))
        .output()
        .expect("run aloft")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const GOOD: &str = r#"app = "hello"
primary_region = "ams"
kill_timeout = 5

[env]
  PORT = 8080

[processes]
  web = "bin/server --port 8080"
  worker = "bin/worker"

[http_service]
  internal_port = 8080
  force_https = true
  auto_stop_machines = true
  min_machines_running = 1
  processes = ["web"]

[[vm]]
  size = "shared-cpu-2x"
  memory = "1gb"
  processes = ["web"]
"#;

#[test]
fn validate_accepts_a_good_file_with_a_one_line_summary() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fly.toml"), GOOD).unwrap();
    let out = aloft(dir.path(), &["config", "validate"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(stdout.contains("[web, worker]"), "{stdout}");
}

#[test]
fn validate_reports_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = "app = \"x\"\nkill_timeout = \"soon\"\n[http_service]\ninternal_port = 99999\n[[vm]]\nmemory = \"lots\"\n";
    std::fs::write(dir.path().join("bad.toml"), bad).unwrap();
    let out = aloft(dir.path(), &["config", "validate", "-c", "bad.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines[0].starts_with("bad.toml:2:16: bad duration"),
        "{stderr}"
    );
    assert!(lines[0].ends_with("(kill_timeout)"), "{stderr}");
    assert!(
        lines[1].starts_with("bad.toml:4:17: port 99999 is out of range"),
        "{stderr}"
    );
    assert!(
        lines[2].starts_with("bad.toml:6:10: bad memory size"),
        "{stderr}"
    );
}

#[test]
fn validate_syntax_error_and_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fly.toml"), "app = \"x\"\n[env\nA = 1\n").unwrap();
    let out = aloft(dir.path(), &["config", "validate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("fly.toml:2:"),
        "{}",
        text(&out.stderr)
    );

    let empty = tempfile::tempdir().unwrap();
    let out = aloft(empty.path(), &["config", "validate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no fly.toml or aloft.toml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn unknown_keys_warn_but_pass() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("aloft.toml"), "app = \"x\"\nscale = 3\n").unwrap();
    let out = aloft(dir.path(), &["config", "validate"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stderr).trim(),
        "warning: aloft.toml:2:1: unknown key, ignored (scale)"
    );
}

#[test]
fn fly_toml_is_preferred_over_aloft_toml() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fly.toml"), "app = \"from-fly\"\n").unwrap();
    std::fs::write(dir.path().join("aloft.toml"), "app = \"from-aloft\"\n").unwrap();
    let out = aloft(dir.path(), &["config", "show", "--json"]);
    assert!(out.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["app"], "from-fly");
}

#[test]
fn show_and_machine_print_fly_shaped_json() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fly.toml"), GOOD).unwrap();
    let out = aloft(dir.path(), &["config", "show", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["kill_timeout"], "5s");
    assert_eq!(shown["env"]["PORT"], "8080");
    assert_eq!(shown["http_service"]["auto_stop_machines"], "stop");

    let out = aloft(
        dir.path(),
        &["config", "machine", "--group", "web", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        m["init"]["cmd"],
        serde_json::json!(["bin/server", "--port", "8080"])
    );
    assert_eq!(m["env"]["FLY_PROCESS_GROUP"], "web");
    assert_eq!(m["env"]["PRIMARY_REGION"], "ams");
    assert_eq!(m["metadata"]["fly_process_group"], "web");
    assert_eq!(
        m["guest"],
        serde_json::json!({"cpu_kind": "shared", "cpus": 2, "memory_mb": 1024})
    );
    assert_eq!(
        m["services"][0]["ports"][0],
        serde_json::json!({"port": 80, "handlers": ["http"], "force_https": true})
    );
    assert_eq!(m["services"][0]["autostop"], "stop");
    assert_eq!(m["services"][0]["min_machines_running"], 1);
    assert_eq!(m["stop_config"], serde_json::json!({"timeout": "5s"}));

    let out = aloft(
        dir.path(),
        &["config", "machine", "--group", "worker", "--json"],
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(m.get("services").is_none(), "{m}");
    assert!(m.get("guest").is_none(), "{m}");

    let out = aloft(dir.path(), &["config", "machine", "--group", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("\"nope\" is not defined"),
        "{}",
        text(&out.stderr)
    );
}
