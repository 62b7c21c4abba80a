//! What the API-facing commands share: `--app/-a`, `-c FILE`, `--json`, app-name
//! resolution from fly.toml, tables, progress lines and the typed API calls on
//! machines that several commands make.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aloft_types::appconfig::{self, ConfigError, LoadedConfig};
use aloft_types::machine::{Machine, MachineConfig};
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::Serialize;

use super::client::{Api, enc};

/// Flags every API-facing command takes.
#[derive(Args, Debug, Clone, Default)]
pub struct AppArgs {
    /// The app (default: `app` in the fly.toml of the current directory).
    #[arg(short = 'a', long = "app", global = true, env = "ALOFT_APP")]
    pub app: Option<String>,
    /// The config file (default: fly.toml, then aloft.toml, in the current directory).
    #[arg(short = 'c', long = "config", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl AppArgs {
    /// The config file this command would read, if there is one.
    pub fn config_path(&self) -> Option<PathBuf> {
        match &self.config {
            Some(p) => Some(p.clone()),
            None => appconfig::find_config(Path::new(".")).ok(),
        }
    }

    /// `--app`, else `app` in fly.toml.
    pub fn app(&self) -> Result<String> {
        if let Some(a) = self.app.as_ref().filter(|a| !a.is_empty()) {
            return Ok(a.clone());
        }
        let Some(path) = self.config_path() else {
            bail!("no app: pass --app NAME, or run in a directory with a fly.toml");
        };
        let src = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let name = appconfig::parse_unvalidated(&src, &path.display().to_string())
            .ok()
            .map(|l| l.config.app_name)
            .filter(|a| !a.is_empty());
        name.ok_or_else(|| {
            anyhow!(
                "no app: {} has no `app = \"NAME\"`; pass --app NAME",
                path.display()
            )
        })
    }
}

/// Loads and validates the config file, printing warnings; prints every error (with
/// file:line:col) and returns `None` when it is invalid.
pub fn load_config(args: &AppArgs) -> Result<Option<LoadedConfig>> {
    let Some(path) = args.config_path() else {
        bail!(
            "no fly.toml or aloft.toml in {}",
            std::env::current_dir().unwrap_or_default().display()
        );
    };
    match appconfig::load(&path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            Ok(Some(loaded))
        }
        Err(ConfigError::Invalid {
            errors, warnings, ..
        }) => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!(
                "error: {} is not valid: {} problem(s)",
                path.display(),
                errors.len()
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

pub fn print_json<T: Serialize + ?Sized>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints rows as left-aligned columns under a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Progress for long work: a spinner on a terminal, plain lines on stderr otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Progress { bar }
    }

    /// A step that is under way (replaced by the next one on a terminal).
    pub fn step(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.bar {
            Some(b) => b.set_message(msg),
            None => eprintln!("  {msg}"),
        }
    }

    /// A line that stays.
    pub fn done(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.bar {
            Some(b) => b.println(format!("✔ {msg}")),
            None => eprintln!("✔ {msg}"),
        }
    }

    pub fn fail(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.bar {
            Some(b) => b.println(format!("✘ {msg}")),
            None => eprintln!("✘ {msg}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Parses `120s`, `10m`, `1h30m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(n) = s.trim().parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    appconfig::parse_go_duration(s)
}

/// `K=V` for clap.
pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// The wait endpoint's answer.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct WaitResponse {
    #[serde(default)]
    pub ok: bool,
    #[serde(default)]
    pub state: String,
}

/// Typed machine calls shared by several commands.
impl Api {
    pub async fn list_machines(&self, app: &str) -> Result<Vec<Machine>> {
        self.get(&format!("/apps/{}/machines", enc(app)))
            .await
            .with_context(|| format!("listing the machines of app {app}"))
    }

    pub async fn get_machine(&self, app: &str, id: &str) -> Result<Machine> {
        self.get(&format!("/apps/{}/machines/{}", enc(app), enc(id)))
            .await
            .with_context(|| format!("machine {id} of app {app}"))
    }

    pub async fn create_machine(
        &self,
        app: &str,
        config: &MachineConfig,
        region: Option<&str>,
        name: Option<&str>,
        skip_launch: bool,
    ) -> Result<Machine> {
        let mut body = serde_json::json!({ "config": config });
        if let Some(r) = region {
            body["region"] = r.into();
        }
        if let Some(n) = name {
            body["name"] = n.into();
        }
        if skip_launch {
            body["skip_launch"] = true.into();
        }
        self.post(&format!("/apps/{}/machines", enc(app)), &body)
            .await
            .with_context(|| format!("creating a machine in app {app}"))
    }

    pub async fn update_machine(
        &self,
        app: &str,
        id: &str,
        config: &MachineConfig,
        current_version: Option<&str>,
        skip_launch: bool,
    ) -> Result<Machine> {
        let mut body = serde_json::json!({ "config": config });
        if let Some(v) = current_version {
            body["current_version"] = v.into();
        }
        if skip_launch {
            body["skip_launch"] = true.into();
        }
        self.post(&format!("/apps/{}/machines/{}", enc(app), enc(id)), &body)
            .await
            .with_context(|| format!("updating machine {id} of app {app}"))
    }

    pub async fn machine_action(
        &self,
        app: &str,
        id: &str,
        action: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value> {
        self.post(
            &format!("/apps/{}/machines/{}/{}", enc(app), enc(id), action),
            &body,
        )
        .await
        .with_context(|| format!("{action} machine {id} of app {app}"))
    }

    /// Takes a lease on a machine for `ttl`; returns its nonce.
    pub async fn acquire_lease(
        &self,
        app: &str,
        id: &str,
        ttl: Duration,
        description: &str,
    ) -> Result<String> {
        let body = serde_json::json!({ "ttl": ttl.as_secs().max(1), "description": description });
        let lease: aloft_types::machine::Lease = self
            .post(
                &format!("/apps/{}/machines/{}/lease", enc(app), enc(id)),
                &body,
            )
            .await
            .with_context(|| {
                format!(
                    "cannot lease machine {id} of app {app} (is another deploy or command \
                     changing it?)"
                )
            })?;
        Ok(lease.nonce)
    }

    /// Gives a lease back.
    pub async fn release_lease(&self, app: &str, id: &str, nonce: &str) -> Result<()> {
        self.with_lease(nonce)
            .delete(&format!("/apps/{}/machines/{}/lease", enc(app), enc(id)))
            .await
            .with_context(|| format!("releasing the lease on machine {id} of app {app}"))?;
        Ok(())
    }

    pub async fn destroy_machine(&self, app: &str, id: &str, force: bool) -> Result<()> {
        let q = if force { "?force=true" } else { "" };
        self.delete(&format!("/apps/{}/machines/{}{q}", enc(app), enc(id)))
            .await
            .with_context(|| format!("destroying machine {id} of app {app}"))?;
        Ok(())
    }

    /// Waits (server side) for the machine to reach `state`, at most `timeout`.
    pub async fn wait_machine(
        &self,
        app: &str,
        id: &str,
        state: &str,
        instance_id: Option<&str>,
        timeout: Duration,
    ) -> Result<WaitResponse> {
        // The API refuses waits over 300 s; callers loop for longer ones.
        let secs = timeout.as_secs().clamp(1, 300);
        let mut path = format!(
            "/apps/{}/machines/{}/wait?state={}&timeout={secs}",
            enc(app),
            enc(id),
            enc(state)
        );
        if let Some(v) = instance_id {
            path.push_str(&format!("&instance_id={}", enc(v)));
        }
        self.call(
            reqwest::Method::GET,
            &path,
            None,
            Some(timeout + Duration::from_secs(10)),
        )
        .await
        .with_context(|| format!("waiting for machine {id} of app {app} to be {state}"))
    }
}

/// The process group a machine belongs to (`app` when unset).
pub fn machine_group(m: &Machine) -> String {
    m.config
        .metadata
        .get(aloft_types::machine::METADATA_PROCESS_GROUP)
        .cloned()
        .unwrap_or_else(|| appconfig::DEFAULT_GROUP.to_string())
}

/// `passing 2/2`, `critical 1/2` or `-`.
pub fn checks_summary(m: &Machine) -> String {
    if m.checks.is_empty() {
        return "-".into();
    }
    let passing = m.checks.iter().filter(|c| c.status == "passing").count();
    let word = if passing == m.checks.len() {
        "passing"
    } else if m.checks.iter().any(|c| c.status == "critical") {
        "critical"
    } else {
        "warning"
    };
    format!("{word} {passing}/{}", m.checks.len())
}
