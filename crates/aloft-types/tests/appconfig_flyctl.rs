//! fly.toml compatibility: flyctl's own fixtures with the expectations of its
//! `serde_test.go` and `machines_test.go`, the 123 real-world files, and broken files
//! that must be reported with their line and column.

use std::path::PathBuf;

use aloft_types::appconfig::{self, AppConfig, ConfigError, Diagnostic, LoadedConfig};
use serde_json::{Value, json};

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fly")
}

fn fixture(name: &str) -> PathBuf {
    shared().join("flyctl-testdata").join(name)
}

fn load(name: &str) -> LoadedConfig {
    appconfig::load(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}: {e:?}"))
}

fn load_unvalidated(name: &str) -> AppConfig {
    let src = std::fs::read_to_string(fixture(name)).unwrap();
    appconfig::parse_unvalidated(&src, name).unwrap().config
}

fn errors_of(src: &str) -> Vec<Diagnostic> {
    match appconfig::parse(src, "fly.toml") {
        Ok(c) => panic!("expected errors, got {:?}", c.config),
        Err(ConfigError::Invalid { errors, .. }) => errors,
        Err(e) => panic!("unexpected {e}"),
    }
}

fn machine(name: &str, group: Option<&str>) -> Value {
    let cfg = load(name).config;
    let mut m = serde_json::to_value(appconfig::to_machine_config(&cfg, group).unwrap()).unwrap();
    // Our client version stands where flyctl's does.
    assert_eq!(
        m["metadata"]["fly_flyctl_version"],
        appconfig::CLIENT_VERSION
    );
    m["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("fly_flyctl_version");
    m
}

/// flyctl's fixtures it refuses (`Validate` fails or the v2 unmarshal fails).
const INVALID_FIXTURES: &[(&str, &str)] = &[
    ("always-invalid-v2.toml", "services[0].concurrency"),
    ("full-reference.toml", "deploy.strategy"),
    ("validate-mounts.toml", "mounts[0].initial_size"),
    ("validate-services.toml", "services[0]"),
];

#[test]
fn flyctl_fixtures_accepted_and_rejected_like_flyctl() {
    let mut checked = 0;
    for entry in std::fs::read_dir(shared().join("flyctl-testdata")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let result = appconfig::load(&path);
        match INVALID_FIXTURES.iter().find(|(n, _)| *n == name) {
            Some((_, key)) => match result {
                Err(ConfigError::Invalid { errors, .. }) => assert!(
                    errors.iter().any(|e| e.key == *key),
                    "{name}: no error about {key}: {errors:#?}"
                ),
                other => panic!("{name} must be rejected, got {other:?}"),
            },
            None => {
                if let Err(e) = result {
                    panic!("{name} must be accepted: {e:?}");
                }
            }
        }
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} fixtures found");
}

/// The real-world files flyctl refuses, and why.
const INVALID_REAL_FILES: &[(&str, &str)] = &[
    ("007.toml", "http_service.auto_stop_machines"),
    ("027.toml", "deploy.strategy"),
    ("054.toml", "checks.etcd.type"),
    ("080.toml", "deploy.strategy"),
    ("081.toml", "checks.pg.type"),
    ("098.toml", "http_service"),
    ("121.toml", "services[0]"),
];

#[test]
fn real_world_files_accepted_unless_flyctl_refuses_them() {
    let dir = shared().join("fly-toml");
    let mut accepted = 0;
    let mut rejected = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let result = appconfig::load(&path);
        match INVALID_REAL_FILES.iter().find(|(n, _)| *n == name) {
            Some((_, key)) => {
                let Err(ConfigError::Invalid { errors, .. }) = result else {
                    panic!("{name} must be rejected");
                };
                assert!(errors.iter().any(|e| e.key == *key), "{name}: {errors:#?}");
                rejected += 1;
            }
            None => {
                let loaded = result.unwrap_or_else(|e| panic!("{name}: {e:?}"));
                // Every group of an accepted file converts to a machine config.
                for group in appconfig::process_names(&loaded.config) {
                    appconfig::to_machine_config(&loaded.config, Some(&group))
                        .unwrap_or_else(|e| panic!("{name} group {group}: {e}"));
                }
                accepted += 1;
            }
        }
    }
    assert_eq!(accepted + rejected, 123);
    assert_eq!(rejected, INVALID_REAL_FILES.len());
}

#[test]
fn string_false_autostop_is_rejected_with_its_position() {
    let errors = errors_of(
        "app = \"x\"\n[http_service]\ninternal_port = 8080\nauto_stop_machines = 'false'\n",
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!((errors[0].line, errors[0].column), (4, 22));
    assert_eq!(errors[0].key, "http_service.auto_stop_machines");
}

#[test]
fn to_machine_config_matches_flyctl() {
    let got = machine("tomachine.toml", None);
    let want = json!({
        "env": {"FOO": "BAR", "PRIMARY_REGION": "mia", "FLY_PROCESS_GROUP": "app"},
        "services": [{
            "protocol": "tcp",
            "internal_port": 8080,
            "ports": [
                {"port": 80, "handlers": ["http"], "force_https": true},
                {"port": 443, "handlers": ["http", "tls"]}
            ]
        }],
        "metadata": {"fly_platform_version": "v2", "fly_process_group": "app"},
        "metrics": {"port": 9999, "path": "/metrics"},
        "statics": [{"guest_path": "/guest/path", "url_prefix": "/url/prefix", "tigris_bucket": "example-bucket", "index_document": "index.html"}],
        "mounts": [{"name": "data", "path": "/data"}],
        "checks": {
            "listening": {"port": 8080, "type": "tcp"},
            "status": {"port": 8080, "type": "http", "interval": "10s", "timeout": "1s", "path": "/status"}
        },
        "stop_config": {"timeout": "10s", "signal": "SIGTERM"},
        "init": {"swap_size_mb": 512},
        "restart": {"policy": "always"},
        "dns": {"nameservers": ["1.2.3.4"]}
    });
    assert_eq!(got, want);
}

#[test]
fn experimental_init_and_process_override() {
    let got = machine("tomachine-experimental.toml", None);
    assert_eq!(
        got["init"],
        json!({"cmd": ["/call", "me"], "entrypoint": ["/IgoFirst"], "exec": ["ignore", "others"]})
    );
    let mut cfg = load("tomachine-experimental.toml").config;
    cfg.processes
        .insert("app".into(), "/override experimental".into());
    let m = appconfig::to_machine_config(&cfg, None).unwrap();
    assert_eq!(
        m.init.cmd,
        Some(vec!["/override".to_string(), "experimental".to_string()])
    );
}

#[test]
fn process_groups_get_their_own_services_and_checks() {
    let app = machine("tomachine-processgroups.toml", Some("app"));
    assert_eq!(app["init"], json!({"cmd": ["run-nginx"]}));
    assert_eq!(
        app["services"],
        json!([
            {"protocol": "tcp", "internal_port": 8080, "ports": [
                {"port": 80, "handlers": ["http"]},
                {"port": 443, "handlers": ["http", "tls"]}
            ]},
            {"protocol": "tcp", "internal_port": 1111}
        ])
    );
    assert_eq!(
        app["checks"],
        json!({"listening": {"port": 8080, "type": "tcp"}})
    );
    let vpn = machine("tomachine-processgroups.toml", Some("vpn"));
    assert_eq!(vpn["metadata"]["fly_process_group"], "vpn");
    assert_eq!(vpn["init"], json!({"cmd": ["run-tailscale"]}));
    assert_eq!(
        vpn["services"],
        json!([{"protocol": "udp", "internal_port": 9999}, {"protocol": "tcp", "internal_port": 1111}])
    );
    assert!(vpn.get("checks").is_none());
    let foo = machine("tomachine-processgroups.toml", Some("foo"));
    assert_eq!(foo["init"], json!({"cmd": ["keep", "me", "alive"]}));
    assert_eq!(
        foo["services"],
        json!([{"protocol": "tcp", "internal_port": 1111}])
    );
    assert_eq!(
        foo["checks"],
        json!({"listening": {"port": 8080, "type": "tcp"}})
    );

    let cfg = load("tomachine-processgroups.toml").config;
    assert!(matches!(
        appconfig::to_machine_config(&cfg, Some("nope")),
        Err(appconfig::GroupError::UnknownGroup { .. })
    ));
}

#[test]
fn default_v2_toml_and_check_port_fallback() {
    let got = machine("tomachine-default-for-new-apps.toml", None);
    assert_eq!(
        got["env"],
        json!({"PRIMARY_REGION": "ord", "FLY_PROCESS_GROUP": "app"})
    );
    assert_eq!(
        got["checks"],
        json!({"alive": {"port": 8080, "type": "tcp", "interval": "15s", "timeout": "2s", "grace_period": "5s"}})
    );
    let mut cfg = load("tomachine-default-for-new-apps.toml").config;
    cfg.http_service = None;
    let err = appconfig::to_machine_config(&cfg, None).unwrap_err();
    assert!(err.to_string().contains("has no port set"), "{err}");
}

#[test]
fn mounts_follow_their_group() {
    assert_eq!(
        machine("tomachine-mounts.toml", None)["mounts"],
        json!([{"name": "data", "path": "/data"}])
    );
    assert_eq!(
        machine("tomachine-mounts.toml", Some("back"))["mounts"],
        json!([{"name": "trash", "path": "/trash"}])
    );
    assert!(
        machine("tomachine-mounts.toml", Some("hola"))
            .get("mounts")
            .is_none()
    );
}

#[test]
fn services_autostop_and_autostart() {
    let got = machine("tomachine-services.toml", None);
    assert_eq!(
        got["services"],
        json!([
            {"protocol": "tcp", "internal_port": 8080, "autostart": true, "autostop": "stop", "ports": [
                {"port": 80, "handlers": ["http"], "force_https": true},
                {"port": 443, "handlers": ["http", "tls"]}
            ]},
            {"protocol": "tcp", "internal_port": 1000, "autostart": true, "autostop": "stop"},
            {"protocol": "tcp", "internal_port": 1001, "autostart": false, "autostop": "off"},
            {"protocol": "tcp", "internal_port": 1002, "autostart": false},
            {"protocol": "tcp", "internal_port": 1003, "autostop": "stop"},
            {"protocol": "tcp", "internal_port": 1004}
        ])
    );
}

#[test]
fn vm_sizes_presets_and_no_default_guest() {
    let cases = [
        (
            "app",
            json!({"cpu_kind": "shared", "cpus": 2, "memory_mb": 512}),
        ),
        (
            "worker",
            json!({"cpu_kind": "shared", "cpus": 2, "memory_mb": 512}),
        ),
        (
            "whisper",
            json!({"cpu_kind": "performance", "cpus": 8, "memory_mb": 65536, "gpu_kind": "a100-pcie-40gb"}),
        ),
        (
            "isolated",
            json!({"cpu_kind": "shared", "cpus": 1, "memory_mb": 256, "host_dedication_id": "lookma-iamsolo"}),
        ),
    ];
    for (group, want) in cases {
        assert_eq!(
            machine("tomachine-compute.toml", Some(group))["guest"],
            want,
            "{group}"
        );
    }
    assert!(
        machine("tomachine-compute-nodefault.toml", Some("app"))
            .get("guest")
            .is_none()
    );
    assert!(
        machine("tomachine-compute-nodefault.toml", Some("woo"))
            .get("guest")
            .is_none()
    );
    assert_eq!(
        machine("tomachine-compute-nodefault.toml", Some("bar"))["guest"],
        json!({"cpu_kind": "performance", "cpus": 4, "memory_mb": 8192})
    );
    let cfg = load("tomachine-hostdedicationid.toml").config;
    assert_eq!(
        appconfig::flatten(&cfg, "front").host_dedication_id,
        "toplevel"
    );
    assert_eq!(
        appconfig::flatten(&cfg, "back").host_dedication_id,
        "specific"
    );
    assert!(
        machine("tomachine-hostdedicationid.toml", Some("front"))
            .get("guest")
            .is_none()
    );
    assert_eq!(
        machine("tomachine-hostdedicationid.toml", Some("back"))["guest"],
        json!({"cpu_kind": "shared", "cpus": 1, "memory_mb": 256, "host_dedication_id": "specific"})
    );
    assert_eq!(
        machine("tomachine-hostdedicationid.toml", Some("other"))["guest"],
        json!({"cpu_kind": "shared", "cpus": 4, "memory_mb": 1024, "host_dedication_id": "toplevel"})
    );
}

fn shown(name: &str) -> Value {
    serde_json::to_value(load(name).config).unwrap()
}

#[test]
fn serde_services_ports_and_multi() {
    assert_eq!(
        shown("services-ports.toml")["services"],
        json!([{
            "protocol": "tcp",
            "internal_port": 8080,
            "ports": [
                {"port": 80,
                 "tls_options": {"alpn": ["h2", "http/1.1"], "versions": ["TLSv1.2", "TLSv1.3"]},
                 "http_options": {"compress": true, "response": {"headers": {
                     "fly-request-id": false, "fly-wasnt-here": "yes, it was", "multi-valued": ["value1", "value2"]}}}},
                {"port": 82, "handlers": ["proxy_proto"], "proxy_proto_options": {"version": "v2"}}
            ]
        }])
    );
    assert_eq!(
        shown("services-multi.toml")["services"],
        json!([
            {"protocol": "tcp", "internal_port": 8081, "concurrency": {"type": "requests", "hard_limit": 22, "soft_limit": 13}},
            {"protocol": "tcp", "internal_port": 9999, "concurrency": {"type": "connections", "hard_limit": 10, "soft_limit": 8}}
        ])
    );
    assert!(
        load("services-emptysection.toml")
            .config
            .services
            .is_empty()
    );
}

#[test]
fn serde_experimental_moves_kill_timeout_and_metrics() {
    let got = shown("experimental-alt.toml");
    assert_eq!(got["kill_timeout"], "3s");
    assert_eq!(got["metrics"], json!([{"port": 9000, "path": "/foo"}]));
    assert_eq!(got["experimental"]["cmd"], json!(["cmd"]));
    assert_eq!(got["experimental"]["entrypoint"], json!(["entrypoint"]));
    assert_eq!(got["experimental"]["exec"], json!(["exec"]));
}

#[test]
fn serde_legacy_layouts() {
    assert_eq!(
        shown("mounts-array.toml")["mounts"],
        json!([{"source": "pg_data", "destination": "/data"}])
    );
    let quirks = shown("format-quirks.toml");
    assert_eq!(quirks["vm"], json!([{"memory": "512"}]));
    assert_eq!(
        quirks["mounts"],
        json!([{"source": "data", "destination": "/data", "initial_size": "200", "snapshot_retention": 10}])
    );
    assert_eq!(
        shown("env-list.toml")["env"],
        json!({"FOO": "BAR", "TWO": "2", "TRUE": "true"})
    );
    assert_eq!(
        shown("old-processes.toml")["processes"],
        json!({"web": "./web", "worker": "./worker"})
    );
    assert_eq!(
        shown("old-pg-checks.toml")["checks"],
        json!({"pg": {"port": 5500, "type": "http", "path": "/flycheck/pg"}})
    );
    let old = shown("old-format.toml");
    assert_eq!(
        old,
        json!({
            "app": "foo",
            "build": {"build-target": "thalayer"},
            "env": {"FOO": "STRING", "BAR": "123"},
            "mounts": [{"source": "data", "destination": "/data"}],
            "metrics": [{"port": 9999, "path": "/metrics"}],
            "services": [{
                "internal_port": 8080,
                "auto_stop_machines": "off",
                "ports": [{"port": 80, "handlers": ["http"]}],
                "concurrency": {"type": "requests", "hard_limit": 23, "soft_limit": 12},
                "tcp_checks": [
                    {"interval": "10s", "timeout": "2s"},
                    {"interval": "20s", "timeout": "3s"}
                ],
                "http_checks": [
                    {"interval": "30s", "timeout": "4s", "headers": {"origin": "http://localhost:8000"}},
                    {"interval": "20s", "timeout": "3s", "headers": {"fly-healthcheck": "1", "metoo": "true", "astring": "string"}}
                ]
            }]
        })
    );
}

#[test]
fn serde_full_reference() {
    let c = load_unvalidated("full-reference.toml");
    assert_eq!(c.app_name, "foo");
    assert_eq!(c.kill_timeout.as_deref(), Some("3s"));
    assert_eq!(c.swap_size_mb, Some(512));
    assert_eq!(c.host_dedication_id, "06031957");
    let deploy = c.deploy.as_ref().unwrap();
    assert_eq!(deploy.release_command_timeout.as_deref(), Some("3m0s"));
    assert_eq!(deploy.release_command_vm.as_ref().unwrap().memory, "8g");
    assert_eq!(deploy.max_unavailable, Some(0.2));
    assert_eq!(c.build.as_ref().unwrap().docker_build_target, "target");
    assert_eq!(c.restart[0].retries, 3);
    assert_eq!(c.metrics.len(), 2);
    assert_eq!(c.files.len(), 3);
    assert_eq!(c.compute.len(), 2);
    assert_eq!(c.compute[1].memory_mb, 4096);
    let hs = c.http_service.as_ref().unwrap();
    assert_eq!(hs.auto_stop_machines.as_deref(), Some("off"));
    assert_eq!(hs.checks[0].interval.as_deref(), Some("1m21s"));
    assert_eq!(hs.concurrency.as_ref().unwrap().kind, "donuts");
    let svc = &c.services[0];
    assert_eq!(svc.ports[0].start_port, Some(100));
    assert_eq!(svc.http_checks.len(), 2);
    assert_eq!(svc.http_checks[1].method.as_deref(), Some("POST"));
    let status = &c.checks["status"];
    assert_eq!(status.grace_period.as_deref(), Some("27s"));
    assert_eq!(status.headers["Authorization"], "super-duper-secret");
    // The release command VM: performance-2x with 8 GiB.
    let guest = appconfig::compute_to_guest(
        deploy.release_command_vm.as_ref().unwrap(),
        "",
        "deploy.release_command_vm",
    )
    .unwrap();
    assert_eq!(
        (guest.cpu_kind.as_str(), guest.cpus, guest.memory_mb),
        ("performance", 2, 8192)
    );
}

#[test]
fn broken_files_name_line_column_and_key() {
    let cases: &[(&str, (usize, usize), &str, &str)] = &[
        ("app = \"x\"\nkill_signal = \n", (2, 15), "", "TOML syntax"),
        ("app = \"x\"\napp = \"y\"\n", (2, 1), "", "duplicate key"),
        (
            "app = \"x\"\n[http_service]\ninternal_port = \"eighty\"\n",
            (3, 17),
            "http_service.internal_port",
            "expected a port number",
        ),
        (
            "app = \"x\"\nkill_timeout = \"5 seconds\"\n",
            (2, 16),
            "kill_timeout",
            "bad duration",
        ),
        (
            "[[vm]]\nmemory = \"lots\"\n",
            (2, 10),
            "vm[0].memory",
            "bad memory size",
        ),
        (
            "[[services]]\ninternal_port = 8080\n[[services.ports]]\nport = 70000\n",
            (4, 8),
            "services[0].ports[0].port",
            "out of range",
        ),
        (
            "[checks.a]\ntype = \"tcp\"\nport = 80\ninterval = 500\n",
            (4, 12),
            "checks.a.interval",
            "too short",
        ),
        (
            "[deploy]\nstrategy = \"yolo\"\n",
            (2, 12),
            "deploy.strategy",
            "unsupported deployment strategy",
        ),
    ];
    for (src, (line, col), key, text) in cases {
        let errors = errors_of(src);
        let e = &errors[0];
        assert_eq!((e.line, e.column), (*line, *col), "{src}: {errors:#?}");
        assert_eq!(e.key, *key, "{src}");
        assert!(e.message.contains(text), "{src}: {}", e.message);
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("fly.toml:{line}:{col}: ")),
            "{shown}"
        );
    }
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let src = "app = 12\nkill_timeout = \"soon\"\n[http_service]\ninternal_port = 0\nforce_https = \"yes\"\n[[vm]]\nmemory = \"1 gigabyte\"\n";
    let errors = errors_of(src);
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "app",
            "kill_timeout",
            "http_service.internal_port",
            "http_service.force_https",
            "vm[0].memory"
        ]
    );
}

#[test]
fn unknown_keys_are_warnings_with_positions() {
    let src = "app = \"x\"\nauto_stop_machines = true\n[experimental]\nallowed_public_ports = []\n";
    let loaded = appconfig::parse(src, "fly.toml").unwrap();
    let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "fly.toml:2:1: unknown key, ignored (auto_stop_machines)",
            "fly.toml:4:1: unknown key, ignored (experimental.allowed_public_ports)"
        ]
    );
}

#[test]
fn durations_and_kill_timeout_units() {
    let c = appconfig::parse(
        "kill_timeout = 5\n[[services]]\ninternal_port = 80\n[[services.ports]]\nport = 80\n[[services.tcp_checks]]\ninterval = 10000\ntimeout = \"2s\"\n",
        "fly.toml",
    )
    .unwrap()
    .config;
    assert_eq!(c.kill_timeout.as_deref(), Some("5s"));
    assert_eq!(c.services[0].tcp_checks[0].interval.as_deref(), Some("10s"));
    let m = appconfig::to_machine_config(&c, None).unwrap();
    let stop = m.stop_config.unwrap();
    assert_eq!((stop.timeout.as_deref(), stop.signal), (Some("5s"), None));
    // No kill_signal or kill_timeout: no stop_config, as flyctl.
    let bare = appconfig::parse("app = \"x\"\n", "fly.toml")
        .unwrap()
        .config;
    assert!(
        appconfig::to_machine_config(&bare, None)
            .unwrap()
            .stop_config
            .is_none()
    );
}
