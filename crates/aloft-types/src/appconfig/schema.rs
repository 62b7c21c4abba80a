//! The fly.toml schema, checked over the parsed TOML tree with source positions.
//!
//! One walk does three things at once: it reports every type or value error with the
//! line and column of the offending value, it warns about keys flyctl does not know,
//! and it produces the JSON tree flyctl's patches would have produced for the value-level
//! rules (stringified env, `"12,23"` concurrency, string ports, integer check durations
//! in milliseconds, `kill_timeout` in seconds, `auto_stop_machines` booleans …).
//! Structural moves between sections are done afterwards in `patch.rs`.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use serde_json::{Map, Value};

use super::units::{self, SizeUnits};
use super::{Diagnostic, Severity};

/// A parsed TOML value with where it came from.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub kind: NodeKind,
    pub span: Option<Range<usize>>,
}

#[derive(Debug, Clone)]
pub(crate) enum NodeKind {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    /// Keys in file order, each with the span of the key itself.
    Table(Vec<(String, Option<Range<usize>>, Node)>),
}

impl NodeKind {
    fn describe(&self) -> &'static str {
        match self {
            NodeKind::Str(_) => "a string",
            NodeKind::Int(_) => "an integer",
            NodeKind::Float(_) => "a float",
            NodeKind::Bool(_) => "a boolean",
            NodeKind::Datetime(_) => "a date-time",
            NodeKind::Array(_) => "an array",
            NodeKind::Table(_) => "a table",
        }
    }
}

pub(crate) fn node_from_table(table: &toml_edit::Table) -> Node {
    let mut entries = Vec::new();
    for (key, item) in table.iter() {
        let key_span = table.get_key_value(key).and_then(|(k, _)| k.span());
        if let Some(node) = node_from_item(item) {
            entries.push((key.to_string(), key_span, node));
        }
    }
    Node {
        kind: NodeKind::Table(entries),
        span: table.span(),
    }
}

fn node_from_item(item: &toml_edit::Item) -> Option<Node> {
    match item {
        toml_edit::Item::None => None,
        toml_edit::Item::Value(v) => Some(node_from_value(v)),
        toml_edit::Item::Table(t) => Some(node_from_table(t)),
        toml_edit::Item::ArrayOfTables(a) => Some(Node {
            kind: NodeKind::Array(a.iter().map(node_from_table).collect()),
            span: a.span(),
        }),
    }
}

fn node_from_value(value: &toml_edit::Value) -> Node {
    use toml_edit::Value as V;
    let kind = match value {
        V::String(s) => NodeKind::Str(s.value().clone()),
        V::Integer(i) => NodeKind::Int(*i.value()),
        V::Float(f) => NodeKind::Float(*f.value()),
        V::Boolean(b) => NodeKind::Bool(*b.value()),
        V::Datetime(d) => NodeKind::Datetime(d.value().to_string()),
        V::Array(a) => NodeKind::Array(a.iter().map(node_from_value).collect()),
        V::InlineTable(t) => {
            let mut entries = Vec::new();
            for (key, v) in t.iter() {
                let key_span = t.get_key_value(key).and_then(|(k, _)| k.span());
                entries.push((key.to_string(), key_span, node_from_value(v)));
            }
            NodeKind::Table(entries)
        }
    };
    Node {
        kind,
        span: value.span(),
    }
}

/// The unit a bare number means for a duration field.
#[derive(Debug, Clone, Copy)]
pub(crate) enum NumUnit {
    Nanos,
    Millis,
    Seconds,
}

/// What a key may hold.
#[derive(Debug)]
pub(crate) enum Ty {
    Str,
    Bool,
    Int,
    /// An integer or a float.
    Float,
    /// Any scalar, turned into a string the way Go's `%v` does (env values).
    Scalar,
    /// A Go duration string, or a number in the given unit. `""` means unset.
    Duration(NumUnit),
    /// A port number 1–65535; `allow_string` accepts `"80"` (flyctl casts it).
    Port {
        allow_string: bool,
    },
    /// Guest memory: a bare number of MiB or a binary size such as `"1gb"`.
    Memory,
    /// A volume size: a bare number of GB or a decimal size such as `"10gb"`.
    VolumeSize,
    /// `auto_stop_machines`: a boolean, or "off", "stop", "suspend".
    AutoStop,
    /// A table, or the v1 string `"soft,hard"`.
    Concurrency,
    /// A string or a list of strings; always a list afterwards.
    StrOrList,
    List(&'static Ty),
    Table(&'static [Field]),
    /// A table, or an array of such tables; always a list afterwards.
    OneOrMany(&'static [Field]),
    /// A table with any keys, each holding the given type.
    Map(&'static Ty),
    /// Kept as it is (build settings, response headers).
    Any,
    /// Check headers: a table of scalars, or a list of `{name, value}`.
    Headers,
    /// `[env]`: a table of scalars, or a list of such tables merged.
    Env,
    /// `[processes]`: a table of strings, the v1 `[[processes]] name/command`, or `[]`.
    Processes,
    /// Top-level `[checks.NAME]`, or a list of checks with a `name`.
    Checks,
}

#[derive(Debug)]
pub(crate) struct Field {
    pub name: &'static str,
    pub ty: Ty,
}

const fn f(name: &'static str, ty: Ty) -> Field {
    Field { name, ty }
}

const STRINGS: Ty = Ty::List(&Ty::Str);

const TLS_OPTIONS: &[Field] = &[
    f("alpn", STRINGS),
    f("versions", STRINGS),
    f("default_self_signed", Ty::Bool),
];

const HTTP_OPTIONS: &[Field] = &[
    f("compress", Ty::Bool),
    f("h2_backend", Ty::Bool),
    f("headers_read_timeout", Ty::Int),
    f("idle_timeout", Ty::Int),
    f("replay_cache", Ty::Any),
    f(
        "response",
        Ty::Table(&[f("headers", Ty::Map(&Ty::Any)), f("pristine", Ty::Bool)]),
    ),
];

const PORT: &[Field] = &[
    f("port", Ty::Port { allow_string: true }),
    f(
        "start_port",
        Ty::Port {
            allow_string: false,
        },
    ),
    f(
        "end_port",
        Ty::Port {
            allow_string: false,
        },
    ),
    f("handlers", STRINGS),
    f("force_https", Ty::Bool),
    f("tls_options", Ty::Table(TLS_OPTIONS)),
    f("http_options", Ty::Table(HTTP_OPTIONS)),
    f("proxy_proto_options", Ty::Table(&[f("version", Ty::Str)])),
];

const CONCURRENCY: &[Field] = &[
    f("type", Ty::Str),
    f("hard_limit", Ty::Int),
    f("soft_limit", Ty::Int),
];

const SERVICE_TCP_CHECK: &[Field] = &[
    f("interval", Ty::Duration(NumUnit::Millis)),
    f("timeout", Ty::Duration(NumUnit::Millis)),
    f("grace_period", Ty::Duration(NumUnit::Millis)),
];

const SERVICE_HTTP_CHECK: &[Field] = &[
    f("interval", Ty::Duration(NumUnit::Millis)),
    f("timeout", Ty::Duration(NumUnit::Millis)),
    f("grace_period", Ty::Duration(NumUnit::Millis)),
    f("method", Ty::Str),
    f("path", Ty::Str),
    f("protocol", Ty::Str),
    f("tls_skip_verify", Ty::Bool),
    f("tls_server_name", Ty::Str),
    f("headers", Ty::Headers),
];

/// `[[http_service.checks]]` go through no patch in flyctl: a bare number is
/// nanoseconds there and headers must already be a table of strings.
const HTTP_SERVICE_CHECK: &[Field] = &[
    f("interval", Ty::Duration(NumUnit::Nanos)),
    f("timeout", Ty::Duration(NumUnit::Nanos)),
    f("grace_period", Ty::Duration(NumUnit::Nanos)),
    f("method", Ty::Str),
    f("path", Ty::Str),
    f("protocol", Ty::Str),
    f("tls_skip_verify", Ty::Bool),
    f("tls_server_name", Ty::Str),
    f("headers", Ty::Map(&Ty::Str)),
];

const MACHINE_CHECK: &[Field] = &[
    f("command", STRINGS),
    f("image", Ty::Str),
    f("entrypoint", STRINGS),
    f("kill_signal", Ty::Str),
    f("kill_timeout", Ty::Duration(NumUnit::Nanos)),
];

const SERVICE: &[Field] = &[
    f("protocol", Ty::Str),
    f("internal_port", Ty::Port { allow_string: true }),
    f("auto_stop_machines", Ty::AutoStop),
    f("auto_start_machines", Ty::Bool),
    f("min_machines_running", Ty::Int),
    f("ports", Ty::OneOrMany(PORT)),
    f("concurrency", Ty::Concurrency),
    f("tcp_checks", Ty::OneOrMany(SERVICE_TCP_CHECK)),
    f("http_checks", Ty::OneOrMany(SERVICE_HTTP_CHECK)),
    f("machine_checks", Ty::List(&Ty::Table(MACHINE_CHECK))),
    f("processes", STRINGS),
];

const HTTP_SERVICE: &[Field] = &[
    f(
        "internal_port",
        Ty::Port {
            allow_string: false,
        },
    ),
    f("force_https", Ty::Bool),
    f("auto_stop_machines", Ty::AutoStop),
    f("auto_start_machines", Ty::Bool),
    f("min_machines_running", Ty::Int),
    f("processes", STRINGS),
    f("concurrency", Ty::Table(CONCURRENCY)),
    f("tls_options", Ty::Table(TLS_OPTIONS)),
    f("http_options", Ty::Table(HTTP_OPTIONS)),
    f("checks", Ty::List(&Ty::Table(HTTP_SERVICE_CHECK))),
    f("machine_checks", Ty::List(&Ty::Table(MACHINE_CHECK))),
];

pub(crate) const TOPLEVEL_CHECK: &[Field] = &[
    f("name", Ty::Str),
    f(
        "port",
        Ty::Port {
            allow_string: false,
        },
    ),
    f("type", Ty::Str),
    f("interval", Ty::Duration(NumUnit::Millis)),
    f("timeout", Ty::Duration(NumUnit::Millis)),
    f("grace_period", Ty::Duration(NumUnit::Millis)),
    f("method", Ty::Str),
    f("path", Ty::Str),
    f("protocol", Ty::Str),
    f("tls_skip_verify", Ty::Bool),
    f("tls_server_name", Ty::Str),
    f("headers", Ty::Headers),
    f("processes", STRINGS),
    // Aloft: command checks and restart on failure.
    f("command", STRINGS),
    f("failure_threshold", Ty::Int),
    f("unhealthy", Ty::Str),
];

const COMPUTE: &[Field] = &[
    f("size", Ty::Str),
    f("memory", Ty::Memory),
    f("cpu_kind", Ty::Str),
    f("cpus", Ty::Int),
    f("memory_mb", Ty::Int),
    f("gpus", Ty::Int),
    f("gpu_kind", Ty::Str),
    f("host_dedication_id", Ty::Str),
    f("kernel_args", STRINGS),
    f("persist_rootfs", Ty::Str),
    f("max_memory_mb", Ty::Int),
    f("processes", STRINGS),
];

const MOUNT: &[Field] = &[
    f("source", Ty::Str),
    f("destination", Ty::Str),
    f("initial_size", Ty::VolumeSize),
    f("snapshot_retention", Ty::Int),
    f("scheduled_snapshots", Ty::Bool),
    f("auto_extend_size_threshold", Ty::Int),
    f("auto_extend_size_increment", Ty::VolumeSize),
    f("auto_extend_size_limit", Ty::VolumeSize),
    f("processes", STRINGS),
];

const METRICS: &[Field] = &[
    f(
        "port",
        Ty::Port {
            allow_string: false,
        },
    ),
    f("path", Ty::Str),
    f("https", Ty::Bool),
    f("processes", STRINGS),
];

const EXPERIMENTAL: &[Field] = &[
    f("cmd", Ty::StrOrList),
    f("entrypoint", Ty::StrOrList),
    f("exec", Ty::StrOrList),
    f("auto_rollback", Ty::Bool),
    f("enable_consul", Ty::Bool),
    f("enable_etcd", Ty::Bool),
    f("lazy_load_images", Ty::Bool),
    f(
        "attached",
        Ty::Table(&[f("secrets", Ty::Table(&[f("export", Ty::Map(&Ty::Str))]))]),
    ),
    f("machine_config", Ty::Str),
    // v1 keys that flyctl moves elsewhere.
    f("kill_timeout", Ty::Duration(NumUnit::Seconds)),
    f(
        "metrics_port",
        Ty::Port {
            allow_string: false,
        },
    ),
    f("metrics_path", Ty::Str),
];

const BUILD: &[Field] = &[
    f("builder", Ty::Str),
    f("args", Ty::Map(&Ty::Str)),
    f("buildpacks", STRINGS),
    f("image", Ty::Str),
    f("settings", Ty::Map(&Ty::Any)),
    f("builtin", Ty::Str),
    f("dockerfile", Ty::Str),
    f("ignorefile", Ty::Str),
    f("build-target", Ty::Str),
    f("build_target", Ty::Str),
    f("compose", Ty::Table(&[f("file", Ty::Str)])),
    f("compression", Ty::Str),
    f("compression_level", Ty::Int),
];

/// flyctl's `MachinesDeployStrategies`.
pub(crate) const DEPLOY_STRATEGIES: &[&str] = &["canary", "rolling", "immediate", "bluegreen"];

const DEPLOY: &[Field] = &[
    f("strategy", Ty::Str),
    f("max_unavailable", Ty::Float),
    f("wait_timeout", Ty::Duration(NumUnit::Nanos)),
    f("release_command", Ty::Str),
    f("release_command_timeout", Ty::Duration(NumUnit::Nanos)),
    f("release_command_vm", Ty::Table(COMPUTE)),
    f("seed_command", Ty::Str),
];

/// The whole file.
pub(crate) const ROOT: &[Field] = &[
    f("app", Ty::Str),
    f("primary_region", Ty::Str),
    f("kill_signal", Ty::Str),
    f("kill_timeout", Ty::Duration(NumUnit::Seconds)),
    f("swap_size_mb", Ty::Int),
    f("console_command", Ty::Str),
    f("experimental", Ty::Table(EXPERIMENTAL)),
    f("build", Ty::Table(BUILD)),
    f("deploy", Ty::Table(DEPLOY)),
    f("env", Ty::Env),
    f("processes", Ty::Processes),
    f("mounts", Ty::OneOrMany(MOUNT)),
    f("mount", Ty::OneOrMany(MOUNT)),
    f("http_service", Ty::Table(HTTP_SERVICE)),
    f("services", Ty::OneOrMany(SERVICE)),
    f("checks", Ty::Checks),
    f("files", Ty::List(&Ty::Table(FILE))),
    f("host_dedication_id", Ty::Str),
    f("machine_config", Ty::Str),
    f("container", Ty::Str),
    f("machine_checks", Ty::List(&Ty::Table(MACHINE_CHECK))),
    f("restart", Ty::List(&Ty::Table(RESTART))),
    f("vm", Ty::OneOrMany(COMPUTE)),
    f("compute", Ty::OneOrMany(COMPUTE)),
    f("computes", Ty::OneOrMany(COMPUTE)),
    f("statics", Ty::List(&Ty::Table(STATIC))),
    f("metrics", Ty::OneOrMany(METRICS)),
    f("metric", Ty::OneOrMany(METRICS)),
];

const FILE: &[Field] = &[
    f("guest_path", Ty::Str),
    f("local_path", Ty::Str),
    f("secret_name", Ty::Str),
    f("raw_value", Ty::Str),
    f("processes", STRINGS),
];

const STATIC: &[Field] = &[
    f("guest_path", Ty::Str),
    f("url_prefix", Ty::Str),
    f("tigris_bucket", Ty::Str),
    f("index_document", Ty::Str),
];

/// flyctl's restart policies as written in fly.toml.
pub(crate) const RESTART_POLICIES: &[&str] = &["always", "never", "on-failure"];

const RESTART: &[Field] = &[
    f("policy", Ty::Str),
    f("retries", Ty::Int),
    f("processes", STRINGS),
];

/// Byte offsets of every value and key, by dotted path (`services[0].ports[1].port`).
#[derive(Debug, Default)]
pub(crate) struct SpanIndex {
    by_path: HashMap<String, usize>,
}

impl SpanIndex {
    /// The offset of `path`, or of its closest ancestor that has one.
    pub fn find(&self, path: &str) -> Option<usize> {
        let mut p = path.to_string();
        loop {
            if let Some(at) = self.by_path.get(&p) {
                return Some(*at);
            }
            // A table written where a list is normal: `[mounts]` for `mounts[0]`.
            if let Some(at) = self.by_path.get(&p.replace("[0]", "")) {
                return Some(*at);
            }
            let cut = p.rfind(['.', '['])?;
            p.truncate(cut);
        }
    }
}

/// Walks a parsed file against [`ROOT`].
pub(crate) struct Walker<'a> {
    pub diags: Vec<Diagnostic>,
    pub spans: SpanIndex,
    file: &'a str,
    src: &'a str,
}

impl<'a> Walker<'a> {
    pub fn new(file: &'a str, src: &'a str) -> Self {
        Walker {
            diags: Vec::new(),
            spans: SpanIndex::default(),
            file,
            src,
        }
    }

    pub fn diag_at(&mut self, severity: Severity, at: usize, key: &str, message: String) {
        let (line, column) = line_col(self.src, at);
        self.diags.push(Diagnostic {
            severity,
            file: self.file.to_string(),
            line,
            column,
            key: key.to_string(),
            message,
        });
    }

    fn error(&mut self, at: usize, key: &str, message: String) {
        self.diag_at(Severity::Error, at, key, message);
    }

    /// Checks and converts the root table.
    pub fn root(&mut self, node: &Node) -> Map<String, Value> {
        match self.table(node, ROOT, "", 0) {
            Some(Value::Object(map)) => map,
            _ => Map::new(),
        }
    }

    fn table(&mut self, node: &Node, fields: &[Field], path: &str, at: usize) -> Option<Value> {
        let NodeKind::Table(entries) = &node.kind else {
            self.mismatch(node, "a table", path, at);
            return None;
        };
        let mut out = Map::new();
        for (key, key_span, value) in entries {
            let child = join(path, key);
            let key_at = key_span.as_ref().map_or(at, |s| s.start);
            let value_at = value.span.as_ref().map_or(key_at, |s| s.start);
            self.spans.by_path.insert(child.clone(), value_at);
            match fields.iter().find(|fd| fd.name == key) {
                Some(field) => {
                    if let Some(v) = self.value(value, &field.ty, &child, value_at) {
                        out.insert(key.clone(), v);
                    }
                }
                None => self.diag_at(
                    Severity::Warning,
                    key_at,
                    &child,
                    "unknown key, ignored".to_string(),
                ),
            }
        }
        Some(Value::Object(out))
    }

    fn mismatch(&mut self, node: &Node, expected: &str, path: &str, at: usize) {
        let at = node.span.as_ref().map_or(at, |s| s.start);
        let found = node.kind.describe();
        self.error(at, path, format!("expected {expected}, found {found}"));
    }

    fn value(&mut self, node: &Node, ty: &Ty, path: &str, at: usize) -> Option<Value> {
        let at = node.span.as_ref().map_or(at, |s| s.start);
        match (ty, &node.kind) {
            (Ty::Any, _) => Some(to_json(node)),
            (Ty::Str, NodeKind::Str(s)) => Some(Value::String(s.clone())),
            (Ty::Bool, NodeKind::Bool(b)) => Some(Value::Bool(*b)),
            (Ty::Int, NodeKind::Int(i)) => Some(Value::from(*i)),
            (Ty::Int, NodeKind::Float(x)) if x.fract() == 0.0 => Some(Value::from(*x as i64)),
            (Ty::Float, NodeKind::Int(i)) => Some(Value::from(*i)),
            (Ty::Float, NodeKind::Float(x)) => Some(Value::from(*x)),
            (Ty::Scalar, kind) => match scalar_string(kind) {
                Some(s) => Some(Value::String(s)),
                None => {
                    self.mismatch(node, "a string, number or boolean", path, at);
                    None
                }
            },
            (Ty::Duration(unit), kind) => self.duration(node, kind, *unit, path, at),
            (Ty::Port { allow_string }, kind) => {
                let n = match kind {
                    NodeKind::Int(i) => *i,
                    NodeKind::Float(x) if x.fract() == 0.0 => *x as i64,
                    NodeKind::Str(s) if *allow_string => match s.trim().parse::<i64>() {
                        Ok(n) => n,
                        Err(_) => {
                            self.error(at, path, format!("{s:?} is not a port number"));
                            return None;
                        }
                    },
                    _ => {
                        self.mismatch(node, "a port number", path, at);
                        return None;
                    }
                };
                if !(1..=65535).contains(&n) {
                    self.error(at, path, format!("port {n} is out of range 1-65535"));
                    return None;
                }
                Some(Value::from(n))
            }
            (Ty::Memory, kind) => {
                let Some(text) = scalar_string(kind) else {
                    self.mismatch(node, "a memory size", path, at);
                    return None;
                };
                match units::parse_size(&text, SizeUnits::Binary, 1024 * 1024) {
                    Ok(0) => {
                        self.error(at, path, format!("memory size {text:?} is zero"));
                        None
                    }
                    Ok(_) => Some(Value::String(text)),
                    Err(e) => {
                        self.error(at, path, format!("bad memory size: {e}"));
                        None
                    }
                }
            }
            (Ty::VolumeSize, kind) => {
                let Some(text) = scalar_string(kind) else {
                    self.mismatch(node, "a volume size", path, at);
                    return None;
                };
                match units::parse_size(&text, SizeUnits::Decimal, 1_000_000_000) {
                    Ok(_) => Some(Value::String(text)),
                    Err(e) => {
                        self.error(at, path, format!("bad volume size: {e}"));
                        None
                    }
                }
            }
            (Ty::AutoStop, NodeKind::Bool(b)) => {
                Some(Value::String(if *b { "stop" } else { "off" }.into()))
            }
            (Ty::AutoStop, NodeKind::Str(s)) => match s.as_str() {
                "off" | "stop" | "suspend" => Some(Value::String(s.clone())),
                _ => {
                    self.error(
                        at,
                        path,
                        format!(
                            "invalid autostop string value {s:?}; use true, false, \"off\", \"stop\" or \"suspend\""
                        ),
                    );
                    None
                }
            },
            (Ty::AutoStop, _) => {
                self.mismatch(node, "a boolean or \"off\"/\"stop\"/\"suspend\"", path, at);
                None
            }
            (Ty::Concurrency, NodeKind::Str(s)) => {
                let parsed = s
                    .split_once(',')
                    .and_then(|(a, b)| Some((a.parse::<i64>().ok()?, b.parse::<i64>().ok()?)));
                match parsed {
                    Some((soft, hard)) => Some(serde_json::json!({
                        "type": "requests", "hard_limit": hard, "soft_limit": soft
                    })),
                    None => {
                        self.error(
                            at,
                            path,
                            format!("unknown value {s:?} for concurrency limits; use \"SOFT,HARD\" or a table"),
                        );
                        None
                    }
                }
            }
            (Ty::Concurrency, NodeKind::Table(_)) => self.table(node, CONCURRENCY, path, at),
            (Ty::Concurrency, _) => {
                self.mismatch(node, "a table or a \"SOFT,HARD\" string", path, at);
                None
            }
            (Ty::StrOrList, NodeKind::Str(s)) => Some(Value::Array(vec![Value::String(s.clone())])),
            (Ty::StrOrList, NodeKind::Array(_)) => self.value(node, &STRINGS, path, at),
            (Ty::List(item), NodeKind::Array(_)) => self.list_of(node, item, path, at),
            (Ty::Table(fields), _) => self.table(node, fields, path, at),
            (Ty::OneOrMany(fields), NodeKind::Table(_)) => {
                let v = self.table(node, fields, path, at)?;
                Some(Value::Array(vec![v]))
            }
            (Ty::OneOrMany(fields), NodeKind::Array(_)) => {
                let item = Ty::Table(fields);
                self.list_of(node, &item, path, at)
            }
            (Ty::Map(item), NodeKind::Table(entries)) => {
                let mut out = Map::new();
                for (key, key_span, v) in entries {
                    let child = join(path, key);
                    let v_at = v
                        .span
                        .as_ref()
                        .or(key_span.as_ref())
                        .map_or(at, |s| s.start);
                    self.spans.by_path.insert(child.clone(), v_at);
                    if let Some(v) = self.value(v, item, &child, v_at) {
                        out.insert(key.clone(), v);
                    }
                }
                Some(Value::Object(out))
            }
            (Ty::Headers, NodeKind::Table(_)) => self.value(node, &Ty::Map(&Ty::Scalar), path, at),
            (Ty::Headers, NodeKind::Array(items)) => {
                let mut out = Map::new();
                for (i, it) in items.iter().enumerate() {
                    let child = format!("{path}[{i}]");
                    let it_at = it.span.as_ref().map_or(at, |s| s.start);
                    let fields: &[Field] = &[f("name", Ty::Scalar), f("value", Ty::Scalar)];
                    let Some(Value::Object(h)) = self.table(it, fields, &child, it_at) else {
                        continue;
                    };
                    match h.get("name") {
                        Some(Value::String(name)) => {
                            let value = h.get("value").and_then(Value::as_str).unwrap_or("");
                            out.insert(name.clone(), Value::String(value.to_string()));
                        }
                        _ => self.error(it_at, &child, "header entry has no name".into()),
                    }
                }
                Some(Value::Object(out))
            }
            (Ty::Env, NodeKind::Table(_)) => self.value(node, &Ty::Map(&Ty::Scalar), path, at),
            (Ty::Env, NodeKind::Array(items)) => {
                let mut out = Map::new();
                for (i, it) in items.iter().enumerate() {
                    let child = format!("{path}[{i}]");
                    if let Some(Value::Object(m)) = self.value(it, &Ty::Env, &child, at) {
                        out.extend(m);
                    }
                }
                Some(Value::Object(out))
            }
            (Ty::Processes, NodeKind::Table(_)) => self.value(node, &Ty::Map(&Ty::Str), path, at),
            (Ty::Processes, NodeKind::Array(items)) => {
                let mut out = Map::new();
                for (i, it) in items.iter().enumerate() {
                    let child = format!("{path}[{i}]");
                    let fields: &[Field] = &[f("name", Ty::Scalar), f("command", Ty::Scalar)];
                    if !matches!(it.kind, NodeKind::Table(_)) {
                        continue;
                    }
                    if let Some(Value::Object(p)) = self.table(it, fields, &child, at)
                        && let Some(Value::String(name)) = p.get("name")
                    {
                        let command = p.get("command").and_then(Value::as_str).unwrap_or("");
                        out.insert(name.clone(), Value::String(command.to_string()));
                    }
                }
                // `processes = []` (what the v1 API returned) means no processes at all.
                (!out.is_empty()).then_some(Value::Object(out))
            }
            (Ty::Checks, NodeKind::Table(entries)) => {
                let mut out = Map::new();
                for (name, key_span, check) in entries {
                    let child = join(path, name);
                    let c_at = check
                        .span
                        .as_ref()
                        .or(key_span.as_ref())
                        .map_or(at, |s| s.start);
                    self.spans.by_path.insert(child.clone(), c_at);
                    if let Some(v) = self.table(check, TOPLEVEL_CHECK, &child, c_at) {
                        out.insert(name.clone(), v);
                    }
                }
                (!out.is_empty()).then_some(Value::Object(out))
            }
            (Ty::Checks, NodeKind::Array(items)) => {
                let mut out = Map::new();
                for (i, it) in items.iter().enumerate() {
                    let child = format!("{path}[{i}]");
                    let it_at = it.span.as_ref().map_or(at, |s| s.start);
                    let Some(Value::Object(check)) = self.table(it, TOPLEVEL_CHECK, &child, it_at)
                    else {
                        continue;
                    };
                    match check.get("name") {
                        Some(Value::String(name)) => {
                            self.spans.by_path.insert(join(path, name), it_at);
                            out.insert(name.clone(), Value::Object(check));
                        }
                        _ => self.error(it_at, &child, "check has no name".into()),
                    }
                }
                (!out.is_empty()).then_some(Value::Object(out))
            }
            (ty, _) => {
                let expected = match ty {
                    Ty::Str => "a string",
                    Ty::Bool => "a boolean",
                    Ty::Int => "an integer",
                    Ty::Float => "a number",
                    Ty::StrOrList => "a string or an array of strings",
                    Ty::List(_) => "an array",
                    Ty::OneOrMany(_) => "a table or an array of tables",
                    Ty::Headers => "a table or an array of {name, value}",
                    Ty::Processes => "a table of commands",
                    _ => "a table",
                };
                self.mismatch(node, expected, path, at);
                None
            }
        }
    }

    fn list_of(&mut self, node: &Node, item: &Ty, path: &str, at: usize) -> Option<Value> {
        let NodeKind::Array(items) = &node.kind else {
            return None;
        };
        let mut out = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let child = format!("{path}[{i}]");
            let it_at = it.span.as_ref().map_or(at, |s| s.start);
            self.spans.by_path.insert(child.clone(), it_at);
            if let Some(v) = self.value(it, item, &child, it_at) {
                out.push(v);
            }
        }
        Some(Value::Array(out))
    }

    fn duration(
        &mut self,
        node: &Node,
        kind: &NodeKind,
        unit: NumUnit,
        path: &str,
        at: usize,
    ) -> Option<Value> {
        let scale = match unit {
            NumUnit::Nanos => 1.0,
            NumUnit::Millis => 1e6,
            NumUnit::Seconds => 1e9,
        };
        let d = match kind {
            NodeKind::Str(s) if s.is_empty() => return None,
            NodeKind::Str(s) => match units::parse_go_duration(s) {
                Ok(d) => d,
                Err(e) => {
                    self.error(at, path, format!("bad duration: {e}"));
                    return None;
                }
            },
            NodeKind::Int(i) if *i >= 0 => Duration::from_nanos((*i as f64 * scale) as u64),
            NodeKind::Float(x) if *x >= 0.0 => Duration::from_nanos((*x * scale) as u64),
            NodeKind::Int(_) | NodeKind::Float(_) => {
                self.error(at, path, "bad duration: negative".into());
                return None;
            }
            _ => {
                self.mismatch(node, "a duration such as \"5s\"", path, at);
                return None;
            }
        };
        Some(Value::String(units::format_go_duration(d)))
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Go's `fmt.Sprintf("%v")` of a TOML scalar.
fn scalar_string(kind: &NodeKind) -> Option<String> {
    match kind {
        NodeKind::Str(s) => Some(s.clone()),
        NodeKind::Int(i) => Some(i.to_string()),
        NodeKind::Float(x) => Some(format_go_float(*x)),
        NodeKind::Bool(b) => Some(b.to_string()),
        NodeKind::Datetime(d) => Some(d.clone()),
        NodeKind::Array(_) | NodeKind::Table(_) => None,
    }
}

fn format_go_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e21 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn to_json(node: &Node) -> Value {
    match &node.kind {
        NodeKind::Str(s) | NodeKind::Datetime(s) => Value::String(s.clone()),
        NodeKind::Int(i) => Value::from(*i),
        NodeKind::Float(x) => Value::from(*x),
        NodeKind::Bool(b) => Value::Bool(*b),
        NodeKind::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        NodeKind::Table(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, _, v)| (k.clone(), to_json(v)))
                .collect(),
        ),
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(src: &str, at: usize) -> (usize, usize) {
    let at = at.min(src.len());
    let before = &src[..floor_char_boundary(src, at)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn floor_char_boundary(s: &str, mut at: usize) -> usize {
    while at > 0 && !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}
