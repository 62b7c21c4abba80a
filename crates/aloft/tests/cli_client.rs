//! The API-facing CLI commands, run as the real `aloft` binary against the real
//! Machines API router (aloft-api) served on 127.0.0.1:0 with a SQLite catalog. The
//! hosts behind it are an in-memory `AgentApi` double defined below: machines change
//! state at once, health checks fail for images whose name contains `unhealthy`, and
//! a release command fails when it contains `fail`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aloft_agent::{
    AgentApi, AgentError, CreateMachine, CreateVolume, ExecOutput, LogLine, StopOptions,
    UpdateMachine, WaitFor,
};
use aloft_api::{ApiState, Role, create_token, router};
use aloft_store::{SqliteStore, Store};
use aloft_types::machine::{CheckStatus, Lease, Machine, MachineEvent, MachineState, Volume};
use serde_json::Value;
use tokio::sync::{Mutex, watch};

// ---------------------------------------------------------------- the agent double

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn new_id(prefix: &str) -> String {
    format!("{prefix}{:012x}", NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn nf(kind: &'static str, id: &str) -> AgentError {
    AgentError::NotFound {
        kind,
        id: id.to_string(),
    }
}

#[derive(Default)]
struct Inner {
    machines: HashMap<(String, String), Machine>,
    secrets: HashMap<String, BTreeMap<String, String>>,
    logs: Vec<LogLine>,
    volumes: HashMap<(String, String), Volume>,
    /// Machine id -> (nonce, expiry in Unix seconds).
    leases: HashMap<String, (String, i64)>,
}

/// Refuses a change to a machine leased under another nonce.
fn check_lease(inner: &Inner, id: &str, nonce: Option<&str>) -> Result<(), AgentError> {
    match inner.leases.get(id) {
        Some((n, exp)) if *exp > now_ms() / 1000 && nonce != Some(n.as_str()) => Err(
            AgentError::Conflict(format!("machine {id} is leased by someone else")),
        ),
        _ => Ok(()),
    }
}

struct FakeAgent {
    host: String,
    region: String,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

impl FakeAgent {
    fn new(host: &str, region: &str) -> Self {
        FakeAgent {
            host: host.into(),
            region: region.into(),
            inner: Mutex::new(Inner::default()),
            changed: watch::channel(0).0,
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn event(m: &mut Machine, kind: &str, request: Option<Value>) {
        m.events.push(MachineEvent {
            id: new_id("ev"),
            kind: kind.into(),
            status: m.state.to_string(),
            source: "user".into(),
            timestamp: now_ms(),
            request,
        });
    }

    /// What "booting" the current config does in this double.
    fn boot(&self, inner: &mut Inner, key: &(String, String)) {
        let Some(m) = inner.machines.get_mut(key) else {
            return;
        };
        m.state = MachineState::Started;
        m.updated_at = aloft_agent::rfc3339(now_ms());
        Self::event(m, "start", None);
        let boot_line = LogLine {
            machine_id: m.id.clone(),
            region: m.region.clone(),
            timestamp: now_ms(),
            stream: "stdout".into(),
            message: format!("booted {}", m.config.image),
        };
        let unhealthy = m.config.image.contains("unhealthy");
        let mut names: Vec<String> = m.config.checks.keys().cloned().collect();
        for (i, s) in m.config.services.iter().enumerate() {
            for (j, _) in s.checks.iter().enumerate() {
                names.push(format!("servicecheck-{i:02}-{j:02}"));
            }
        }
        m.checks = names
            .into_iter()
            .map(|name| CheckStatus {
                name,
                status: if unhealthy { "critical" } else { "passing" }.into(),
                output: if unhealthy {
                    "GET /health: 500 Internal Server Error".into()
                } else {
                    "200 OK".into()
                },
                updated_at: m.updated_at.clone(),
            })
            .collect();
        inner.logs.push(boot_line);
        let Some(m) = inner.machines.get_mut(key) else {
            return;
        };
        // A machine that runs a one-off command exits at once.
        if let Some(cmd) = m.config.init.cmd.clone()
            && m.config.restart.as_ref().is_some_and(|r| r.policy == "no")
        {
            let line = cmd.join(" ");
            let code = if line.contains("fail") { 1 } else { 0 };
            m.state = MachineState::Stopped;
            Self::event(
                m,
                "exit",
                Some(serde_json::json!({"exit_event": {"exit_code": code}})),
            );
            let (id, region) = (m.id.clone(), m.region.clone());
            inner.logs.push(LogLine {
                machine_id: id,
                region,
                timestamp: now_ms(),
                stream: "stderr".into(),
                message: format!("ran `{line}`: exit {code}"),
            });
        }
    }

    async fn transition(
        &self,
        app: &str,
        id: &str,
        kind: &str,
        to: MachineState,
    ) -> Result<Machine, AgentError> {
        let mut g = self.inner.lock().await;
        let key = (app.to_string(), id.to_string());
        if to == MachineState::Started {
            if !g.machines.contains_key(&key) {
                return Err(nf("machine", id));
            }
            self.boot(&mut g, &key);
        }
        let m = g.machines.get_mut(&key).ok_or_else(|| nf("machine", id))?;
        if to != MachineState::Started {
            m.state = to;
            m.checks.clear();
            Self::event(m, kind, None);
        }
        let out = m.clone();
        drop(g);
        self.bump();
        Ok(out)
    }

    async fn machine(&self, app: &str, id: &str) -> Result<Machine, AgentError> {
        self.inner
            .lock()
            .await
            .machines
            .get(&(app.to_string(), id.to_string()))
            .cloned()
            .ok_or_else(|| nf("machine", id))
    }

    async fn secrets_of(&self, id: &str) -> BTreeMap<String, String> {
        self.inner
            .lock()
            .await
            .secrets
            .get(id)
            .cloned()
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl AgentApi for FakeAgent {
    fn host_id(&self) -> &str {
        &self.host
    }
    fn region(&self) -> &str {
        &self.region
    }

    async fn create_machine(&self, req: CreateMachine) -> Result<Machine, AgentError> {
        let id = new_id("m");
        let now = aloft_agent::rfc3339(now_ms());
        let m = Machine {
            id: id.clone(),
            name: req.name.unwrap_or_else(|| format!("name-{id}")),
            state: MachineState::Created,
            region: self.region.clone(),
            instance_id: new_id("v"),
            private_ip: String::new(),
            config: req.config,
            image_ref: None,
            created_at: now.clone(),
            updated_at: now,
            events: Vec::new(),
            checks: Vec::new(),
            host_status: "ok".into(),
            nonce: None,
            cordoned: false,
        };
        let key = (req.app.clone(), id.clone());
        let mut g = self.inner.lock().await;
        for mount in &m.config.mounts {
            let v = g
                .volumes
                .get_mut(&(req.app.clone(), mount.volume.clone()))
                .ok_or_else(|| nf("volume", &mount.volume))?;
            if let Some(other) = &v.attached_machine_id {
                return Err(AgentError::Conflict(format!(
                    "volume {} is attached to machine {other}",
                    v.id
                )));
            }
            v.attached_machine_id = Some(id.clone());
        }
        g.secrets.insert(id.clone(), req.secrets);
        g.machines.insert(key.clone(), m);
        if !req.skip_launch {
            self.boot(&mut g, &key);
        }
        let out = g.machines[&key].clone();
        drop(g);
        self.bump();
        Ok(out)
    }

    async fn get_machine(&self, app: &str, id: &str) -> Result<Machine, AgentError> {
        self.machine(app, id).await
    }

    async fn list_machines(&self, app: &str) -> Result<Vec<Machine>, AgentError> {
        Ok(self
            .inner
            .lock()
            .await
            .machines
            .iter()
            .filter(|((a, _), _)| a == app)
            .map(|(_, m)| m.clone())
            .collect())
    }

    async fn update_machine(
        &self,
        app: &str,
        id: &str,
        req: UpdateMachine,
        lease_nonce: Option<&str>,
    ) -> Result<Machine, AgentError> {
        let key = (app.to_string(), id.to_string());
        let mut g = self.inner.lock().await;
        check_lease(&g, id, lease_nonce)?;
        let m = g.machines.get_mut(&key).ok_or_else(|| nf("machine", id))?;
        if let Some(v) = &req.current_version
            && *v != m.instance_id
        {
            return Err(AgentError::Conflict(format!(
                "machine {id} is at version {}, not {v}",
                m.instance_id
            )));
        }
        m.config = req.config;
        m.instance_id = new_id("v");
        m.checks.clear();
        Self::event(m, "update", None);
        let launch = !req.skip_launch;
        if !launch && m.state == MachineState::Started {
            m.state = MachineState::Stopped;
        }
        g.secrets.insert(id.to_string(), req.secrets);
        if launch {
            self.boot(&mut g, &key);
        }
        let out = g.machines[&key].clone();
        drop(g);
        self.bump();
        Ok(out)
    }

    async fn start_machine(
        &self,
        app: &str,
        id: &str,
        _: Option<&str>,
    ) -> Result<Machine, AgentError> {
        self.transition(app, id, "start", MachineState::Started)
            .await
    }

    async fn stop_machine(
        &self,
        app: &str,
        id: &str,
        _: StopOptions,
        _: Option<&str>,
    ) -> Result<Machine, AgentError> {
        self.transition(app, id, "stop", MachineState::Stopped)
            .await
    }

    async fn restart_machine(
        &self,
        app: &str,
        id: &str,
        _: StopOptions,
        _: Option<&str>,
    ) -> Result<Machine, AgentError> {
        self.transition(app, id, "restart", MachineState::Started)
            .await
    }

    async fn suspend_machine(
        &self,
        app: &str,
        id: &str,
        _: Option<&str>,
    ) -> Result<Machine, AgentError> {
        self.transition(app, id, "suspend", MachineState::Suspended)
            .await
    }

    async fn signal_machine(&self, app: &str, id: &str, _: &str) -> Result<(), AgentError> {
        self.machine(app, id).await.map(|_| ())
    }

    async fn destroy_machine(
        &self,
        app: &str,
        id: &str,
        force: bool,
        lease_nonce: Option<&str>,
    ) -> Result<(), AgentError> {
        let key = (app.to_string(), id.to_string());
        let mut g = self.inner.lock().await;
        check_lease(&g, id, lease_nonce)?;
        let m = g.machines.get(&key).ok_or_else(|| nf("machine", id))?;
        if m.state == MachineState::Started && !force {
            return Err(AgentError::Conflict(format!(
                "machine {id} is started; stop it or pass force"
            )));
        }
        g.machines.remove(&key);
        g.leases.remove(id);
        for v in g.volumes.values_mut() {
            if v.attached_machine_id.as_deref() == Some(id) {
                v.attached_machine_id = None;
            }
        }
        drop(g);
        self.bump();
        Ok(())
    }

    async fn cordon_machine(&self, app: &str, id: &str, _: bool) -> Result<(), AgentError> {
        self.machine(app, id).await.map(|_| ())
    }

    async fn wait_machine(
        &self,
        app: &str,
        id: &str,
        wait: WaitFor,
    ) -> Result<MachineState, AgentError> {
        let deadline = tokio::time::Instant::now() + wait.timeout;
        let mut rx = self.changed.subscribe();
        loop {
            let m = self.machine(app, id).await?;
            let version_ok = wait
                .instance_id
                .as_deref()
                .is_none_or(|v| v == m.instance_id);
            let state_ok = wait
                .states
                .iter()
                .any(|s| (s == "settled" && m.state.is_settled()) || s == m.state.as_str());
            if version_ok && state_ok {
                return Ok(m.state);
            }
            if !matches!(
                tokio::time::timeout_at(deadline, rx.changed()).await,
                Ok(Ok(()))
            ) {
                return Err(AgentError::WaitTimeout {
                    id: id.to_string(),
                    wanted: wait.states.join(","),
                });
            }
        }
    }

    async fn machine_events(&self, app: &str, id: &str) -> Result<Vec<MachineEvent>, AgentError> {
        Ok(self.machine(app, id).await?.events)
    }

    async fn acquire_lease(
        &self,
        app: &str,
        id: &str,
        ttl: Duration,
        description: &str,
        existing: Option<&str>,
    ) -> Result<Lease, AgentError> {
        let m = self.machine(app, id).await?;
        let mut g = self.inner.lock().await;
        check_lease(&g, id, existing)?;
        let nonce = existing
            .filter(|n| !n.is_empty())
            .map_or_else(|| new_id("n"), str::to_string);
        let expires_at = now_ms() / 1000 + ttl.as_secs() as i64;
        g.leases.insert(id.to_string(), (nonce.clone(), expires_at));
        Ok(Lease {
            nonce,
            expires_at,
            owner: "test".into(),
            description: description.into(),
            version: m.instance_id,
        })
    }

    async fn get_lease(&self, app: &str, id: &str) -> Result<Lease, AgentError> {
        let m = self.machine(app, id).await?;
        let g = self.inner.lock().await;
        let (nonce, expires_at) = g.leases.get(id).cloned().ok_or_else(|| nf("lease", id))?;
        Ok(Lease {
            nonce,
            expires_at,
            owner: "test".into(),
            description: String::new(),
            version: m.instance_id,
        })
    }

    async fn release_lease(&self, _: &str, id: &str, nonce: &str) -> Result<(), AgentError> {
        let mut g = self.inner.lock().await;
        match g.leases.get(id) {
            Some((n, _)) if n == nonce => {
                g.leases.remove(id);
                Ok(())
            }
            Some(_) => Err(AgentError::Conflict(format!(
                "wrong nonce for machine {id}"
            ))),
            None => Err(nf("lease", id)),
        }
    }

    async fn exec(
        &self,
        app: &str,
        id: &str,
        command: Vec<String>,
        _: Duration,
    ) -> Result<ExecOutput, AgentError> {
        let m = self.machine(app, id).await?;
        if m.state != MachineState::Started {
            return Err(AgentError::Conflict(format!("machine {id} is not started")));
        }
        // `echo ...` prints its words; `false` fails.
        let (code, stdout) = match command.first().map(String::as_str) {
            Some("echo") => (0, format!("{}\n", command[1..].join(" "))),
            Some("false") => (1, String::new()),
            _ => (127, String::new()),
        };
        Ok(ExecOutput {
            exit_code: code,
            exit_signal: 0,
            stdout,
            stderr: String::new(),
        })
    }

    async fn logs(
        &self,
        _: &str,
        id: &str,
        since: Option<i64>,
    ) -> Result<Vec<LogLine>, AgentError> {
        Ok(self
            .inner
            .lock()
            .await
            .logs
            .iter()
            .filter(|l| l.machine_id == id && since.is_none_or(|s| l.timestamp >= s))
            .cloned()
            .collect())
    }

    async fn metadata_get(
        &self,
        app: &str,
        id: &str,
    ) -> Result<BTreeMap<String, String>, AgentError> {
        Ok(self.machine(app, id).await?.config.metadata)
    }

    async fn metadata_set(&self, app: &str, id: &str, k: &str, v: &str) -> Result<(), AgentError> {
        let mut g = self.inner.lock().await;
        let m = g
            .machines
            .get_mut(&(app.to_string(), id.to_string()))
            .ok_or_else(|| nf("machine", id))?;
        m.config.metadata.insert(k.into(), v.into());
        Ok(())
    }

    async fn metadata_delete(&self, app: &str, id: &str, k: &str) -> Result<(), AgentError> {
        let mut g = self.inner.lock().await;
        let m = g
            .machines
            .get_mut(&(app.to_string(), id.to_string()))
            .ok_or_else(|| nf("machine", id))?;
        m.config.metadata.remove(k);
        Ok(())
    }

    async fn create_volume(&self, req: CreateVolume) -> Result<Volume, AgentError> {
        let v = Volume {
            id: new_id("vol_"),
            name: req.name,
            state: "created".into(),
            size_gb: req.size_gb,
            region: self.region.clone(),
            zone: String::new(),
            encrypted: false,
            attached_machine_id: None,
            attached_alloc_id: None,
            created_at: aloft_agent::rfc3339(now_ms()),
            host_status: "ok".into(),
            fstype: "ext4".into(),
            snapshot_retention: req.snapshot_retention.unwrap_or(5),
            auto_backup_enabled: false,
        };
        self.inner
            .lock()
            .await
            .volumes
            .insert((req.app, v.id.clone()), v.clone());
        Ok(v)
    }

    async fn list_volumes(&self, app: &str) -> Result<Vec<Volume>, AgentError> {
        Ok(self
            .inner
            .lock()
            .await
            .volumes
            .iter()
            .filter(|((a, _), _)| a == app)
            .map(|(_, v)| v.clone())
            .collect())
    }

    async fn get_volume(&self, app: &str, id: &str) -> Result<Volume, AgentError> {
        self.inner
            .lock()
            .await
            .volumes
            .get(&(app.to_string(), id.to_string()))
            .cloned()
            .ok_or_else(|| nf("volume", id))
    }

    async fn extend_volume(&self, app: &str, id: &str, size_gb: i64) -> Result<Volume, AgentError> {
        let mut g = self.inner.lock().await;
        let v = g
            .volumes
            .get_mut(&(app.to_string(), id.to_string()))
            .ok_or_else(|| nf("volume", id))?;
        if size_gb <= v.size_gb {
            return Err(AgentError::Invalid {
                field: "size_gb".into(),
                message: format!("volume {id} is already {} GB", v.size_gb),
            });
        }
        v.size_gb = size_gb;
        Ok(v.clone())
    }

    async fn destroy_volume(&self, app: &str, id: &str) -> Result<Volume, AgentError> {
        let mut g = self.inner.lock().await;
        let mut v = g
            .volumes
            .remove(&(app.to_string(), id.to_string()))
            .ok_or_else(|| nf("volume", id))?;
        v.state = "destroyed".into();
        Ok(v)
    }

    /// A tiny shell: `/bin/sh -c 'A; B'` runs `echo WORDS`, `cat` (stdin to stdout
    /// until EOF), `size` (the window size) and `exit N`; no `-c` means `cat`.
    async fn console(
        &self,
        app: &str,
        id: &str,
        req: aloft_agent::api::ConsoleRequest,
    ) -> Result<aloft_agent::api::ConsoleSession, AgentError> {
        use aloft_agent::api::{ConsoleInput, ConsoleOutput, ConsoleSession};
        let m = self.machine(app, id).await?;
        if m.state != MachineState::Started {
            return Err(AgentError::Conflict(format!("machine {id} is not started")));
        }
        let script = match req.command.as_slice() {
            [sh, c, script] if sh == "/bin/sh" && c == "-c" => script.clone(),
            [sh] if sh == "/bin/sh" => "cat".to_string(),
            other => {
                return Err(AgentError::Invalid {
                    field: "command".into(),
                    message: format!("{other:?}: executable file not found"),
                });
            }
        };
        let (in_tx, mut in_rx) = tokio::sync::mpsc::channel(16);
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(64);
        let (mut rows, mut cols) = (req.rows, req.cols);
        tokio::spawn(async move {
            let mut code = 0;
            for step in script.split(';').map(str::trim) {
                if let Some(words) = step.strip_prefix("echo ") {
                    let _ = out_tx
                        .send(ConsoleOutput::Stdout(format!("{words}\n").into_bytes()))
                        .await;
                } else if let Some(n) = step.strip_prefix("exit ") {
                    code = n.parse().unwrap_or(2);
                    break;
                } else if step == "size" {
                    let _ = out_tx
                        .send(ConsoleOutput::Stdout(
                            format!("{rows} {cols}\n").into_bytes(),
                        ))
                        .await;
                } else if step == "cat" {
                    while let Some(input) = in_rx.recv().await {
                        match input {
                            ConsoleInput::Stdin(d) => {
                                let _ = out_tx.send(ConsoleOutput::Stdout(d)).await;
                            }
                            ConsoleInput::Resize { rows: r, cols: c } => (rows, cols) = (r, c),
                            ConsoleInput::Eof => break,
                        }
                    }
                }
            }
            let _ = out_tx
                .send(ConsoleOutput::Exit {
                    code: Some(code),
                    signal: None,
                })
                .await;
        });
        Ok(ConsoleSession {
            pid: 1,
            input: in_tx,
            output: out_rx,
        })
    }

    // The CLI tests drive none of these: this double runs no guest, so it says so.
    async fn machine_ps(
        &self,
        _: &str,
        id: &str,
    ) -> Result<Vec<aloft_types::guest::ProcessStat>, AgentError> {
        Err(AgentError::Conflict(format!(
            "machine {id}: the CLI test agent runs no guest"
        )))
    }

    async fn get_memory(
        &self,
        _: &str,
        id: &str,
    ) -> Result<aloft_agent::MachineMemory, AgentError> {
        Err(AgentError::Conflict(format!(
            "machine {id}: the CLI test agent runs no guest"
        )))
    }

    async fn set_memory_limit(
        &self,
        _: &str,
        id: &str,
        _: i64,
    ) -> Result<aloft_agent::MachineMemory, AgentError> {
        Err(AgentError::Conflict(format!(
            "machine {id}: the CLI test agent runs no guest"
        )))
    }

    async fn reclaim_memory(&self, _: &str, id: &str, _: i64) -> Result<i64, AgentError> {
        Err(AgentError::Conflict(format!(
            "machine {id}: the CLI test agent runs no guest"
        )))
    }

    async fn create_volume_snapshot(
        &self,
        _: &str,
        volume_id: &str,
    ) -> Result<aloft_types::machine::VolumeSnapshot, AgentError> {
        Err(AgentError::Conflict(format!(
            "volume {volume_id}: the CLI test agent keeps no volume files"
        )))
    }

    async fn list_volume_snapshots(
        &self,
        app: &str,
        volume_id: &str,
    ) -> Result<Vec<aloft_types::machine::VolumeSnapshot>, AgentError> {
        self.get_volume(app, volume_id).await?;
        Ok(Vec::new())
    }
}

// ---------------------------------------------------------------- the harness

/// The API router on 127.0.0.1:0 with one double agent per `(host, region)`, its own
/// runtime, a working directory and a data directory.
struct Harness {
    rt: tokio::runtime::Runtime,
    url: String,
    token: String,
    agents: Vec<Arc<FakeAgent>>,
    /// Catalog, secrets key, data dir, working dir and HOME.
    dir: tempfile::TempDir,
}

impl Harness {
    fn start(hosts: &[(&str, &str)]) -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        for d in ["api", "data", "work", "home"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let agents: Vec<Arc<FakeAgent>> = hosts
            .iter()
            .map(|(h, r)| Arc::new(FakeAgent::new(h, r)))
            .collect();
        let api_dir = dir.path().join("api");
        let dyn_agents: Vec<Arc<dyn AgentApi>> = agents
            .iter()
            .map(|a| a.clone() as Arc<dyn AgentApi>)
            .collect();
        let (url, token) = rt.block_on(async move {
            let store: Arc<dyn Store> =
                Arc::new(SqliteStore::open(api_dir.join("catalog.db")).await.unwrap());
            let state = ApiState::new(store, dyn_agents, &api_dir).await.unwrap();
            let token = create_token(&state, "cli-test", "personal", None, Role::Admin)
                .await
                .unwrap()
                .token;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                axum::serve(listener, router(state)).await.unwrap();
            });
            (format!("http://{addr}"), token)
        });
        Harness {
            rt,
            url,
            token,
            agents,
            dir,
        }
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// `aloft ARGS` in the work dir, the API given by env.
    fn aloft(&self, args: &[&str]) -> Output {
        aloft_in(
            &self.work(),
            self.dir.path(),
            args,
            &[
                ("ALOFT_API_URL", &self.url),
                ("ALOFT_API_TOKEN", &self.token),
            ],
        )
    }

    /// Runs and insists on success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.aloft(args);
        assert!(
            out.status.success(),
            "aloft {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("aloft {args:?}: not JSON ({e}): {out}"))
    }

    fn machines(&self, app: &str) -> Vec<Machine> {
        let mut all = Vec::new();
        for a in &self.agents {
            all.extend(self.rt.block_on(a.list_machines(app)).unwrap());
        }
        all.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        all
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.work().join(name), text).unwrap();
    }
}

/// Runs the binary with a clean environment: no API settings but the ones given.
fn aloft_in(cwd: &Path, root: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aloft"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("ALOFT_API_URL")
        .env_remove("ALOFT_API_TOKEN")
        .env_remove("ALOFT_APP")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", root.join("home"))
        .env("ALOFT_DATA_DIR", root.join("data"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run aloft")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const HEALTHY_TOML: &str = r#"
app = "web"
primary_region = "ams"

[build]
  image = "registry.local/web:v1"

[deploy]
  strategy = "rolling"

[http_service]
  internal_port = 8080
  auto_stop_machines = "off"
  min_machines_running = 0

  [[http_service.checks]]
    interval = "5s"
    timeout = "2s"
    method = "GET"
    path = "/health"
"#;

// ---------------------------------------------------------------- tests

#[test]
fn without_an_api_the_error_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("home")).unwrap();
    for args in [
        &["apps", "list"][..],
        &["machine", "list", "-a", "web"],
        &["status", "--app", "web"],
    ] {
        let out = aloft_in(dir.path(), dir.path(), args, &[]);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("no API: start `aloft dev` or set ALOFT_API_URL"),
            "{args:?}: {err}"
        );
    }
    // An API that is not there is named with where its address came from.
    let out = aloft_in(
        dir.path(),
        dir.path(),
        &["apps", "list"],
        &[("ALOFT_API_URL", "http://127.0.0.1:9")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach the API at http://127.0.0.1:9/v1/apps?org_slug=personal (from ALOFT_API_URL)"),
        "{err}"
    );
    // Commands about an app need one.
    let out = aloft_in(dir.path(), dir.path(), &["machine", "list"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no app: pass --app NAME"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn deploy_prints_every_config_error_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("home")).unwrap();
    std::fs::write(
        dir.path().join("fly.toml"),
        "app = \"web\"\n\n[http_service]\n  internal_port = \"eighty\"\n\n[[vm]]\n  memory = 12\n  cpus = \"two\"\n",
    )
    .unwrap();
    let out = aloft_in(dir.path(), dir.path(), &["deploy", "--image", "x"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("fly.toml:4:19:"), "{err}");
    assert!(err.contains("fly.toml:8:10:"), "{err}");
    assert!(err.contains("(http_service.internal_port)"), "{err}");
    // Validation comes before the API is looked for.
    assert!(!err.contains("no API"), "{err}");
}

#[test]
fn dev_json_apps_and_json_output() {
    let h = Harness::start(&[("h1", "ams")]);
    let dev =
        serde_json::json!({"api_url": h.url, "token": h.token, "proxy": "http://127.0.0.1:8080"});
    std::fs::write(h.dir.path().join("data/dev.json"), dev.to_string()).unwrap();
    // No ALOFT_API_URL: dev.json in the data dir is found.
    let run = |args: &[&str]| aloft_in(&h.work(), h.dir.path(), args, &[]);
    let out = run(&["apps", "create", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "created app web in organisation personal"
    );
    let out = run(&["apps", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["web"]);
    // A second create names the app in its error.
    let out = run(&["apps", "create", "web"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("creating app web"),
        "{}",
        stderr(&out)
    );
    let out = run(&["apps", "destroy", "web", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!({"app": "web", "destroyed": true}));
    // launch without --region takes the installation's region.
    let out = run(&["launch", "--image", "registry.local/site:1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let toml = std::fs::read_to_string(h.work().join("fly.toml")).unwrap();
    assert!(
        toml.contains("app = \"site\"") && toml.contains("primary_region = \"ams\""),
        "{toml}"
    );

    // A wrong token is refused with the API's message.
    let out = aloft_in(
        &h.work(),
        h.dir.path(),
        &["apps", "list"],
        &[("ALOFT_API_URL", &h.url), ("ALOFT_API_TOKEN", "nope")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("GET /apps?org_slug=personal: 401"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn launch_then_deploy_creates_then_rolls() {
    let h = Harness::start(&[("h1", "ams")]);
    let out = h.ok(&[
        "launch",
        "--image",
        "registry.local/web:v1",
        "--name",
        "web",
        "--region",
        "ams",
    ]);
    assert!(out.contains("created app web"), "{out}");
    let toml = std::fs::read_to_string(h.work().join("fly.toml")).unwrap();
    assert!(toml.contains("app = \"web\""), "{toml}");
    assert!(toml.contains("force_https = false"), "{toml}");
    assert!(toml.contains("auto_stop_machines = \"stop\""), "{toml}");
    assert!(h.machines("web").is_empty(), "launch must not deploy");
    // launch refuses to overwrite.
    let again = h.aloft(&["launch", "--image", "x", "--name", "web2"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("fly.toml already exists"));

    // A machine made by hand is not the deploy's to change.
    let manual = h.json(&["machine", "run", "registry.local/tool:1", "--json"]);
    let manual = manual["id"].as_str().unwrap().to_string();

    // First deploy: one machine in the primary region.
    h.ok(&["deploy"]);
    let ms: Vec<Machine> = h
        .machines("web")
        .into_iter()
        .filter(|m| m.id != manual)
        .collect();
    assert_eq!(ms.len(), 1);
    let first = ms[0].clone();
    assert_eq!(first.region, "ams");
    assert_eq!(first.config.image, "registry.local/web:v1");
    assert_eq!(first.state, MachineState::Started);
    assert_eq!(
        first
            .config
            .metadata
            .get("fly_process_group")
            .map(String::as_str),
        Some("app")
    );

    // Second deploy with another image: the same machine, a new version.
    let report = h.json(&["deploy", "--image", "registry.local/web:v2", "--json"]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["release_version"], 2);
    assert_eq!(report["groups"][0]["updated"][0], first.id.as_str());
    let all = h.machines("web");
    assert_eq!(all.len(), 2);
    let untouched = all.iter().find(|m| m.id == manual).unwrap();
    assert_eq!(untouched.config.image, "registry.local/tool:1");
    let ms: Vec<Machine> = all.into_iter().filter(|m| m.id != manual).collect();
    assert_eq!(ms[0].id, first.id);
    assert_ne!(ms[0].instance_id, first.instance_id);
    assert_eq!(ms[0].config.image, "registry.local/web:v2");

    // logs: both boots of the machine, oldest first, as JSON lines or text.
    let out = h.ok(&["logs", "--json"]);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["machine_id"] == first.id.as_str())
        .collect();
    let msgs: Vec<&str> = lines
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        msgs,
        vec![
            "booted registry.local/web:v1",
            "booted registry.local/web:v2"
        ]
    );
    let text = h.ok(&["logs", "--machine", &first.id]);
    assert!(
        text.contains(&format!(
            "app[{}] ams [stdout] booted registry.local/web:v2",
            first.id
        )),
        "{text}"
    );
    assert!(h.ok(&["logs", "--region", "syd"]).is_empty());

    // status shows the machine; --json has both the app and its machines.
    let text = h.ok(&["status"]);
    assert!(text.contains(&first.id) && text.contains("v2"), "{text}");
    let st = h.json(&["status", "--json"]);
    assert_eq!(st["app"]["name"], "web");
    let ids: Vec<&str> = st["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&first.id.as_str()) && ids.contains(&manual.as_str()),
        "{st}"
    );
}

#[test]
fn failing_health_check_rolls_back_every_updated_machine() {
    let h = Harness::start(&[("h1", "ams"), ("h2", "syd")]);
    h.ok(&["apps", "create", "web"]);
    h.write("fly.toml", HEALTHY_TOML);
    h.ok(&["deploy", "--regions", "ams,syd"]);
    let before = h.machines("web");
    assert_eq!(before.len(), 2);
    assert!(
        before
            .iter()
            .all(|m| m.checks.iter().all(|c| c.status == "passing"))
    );
    let mut regions: Vec<&str> = before.iter().map(|m| m.region.as_str()).collect();
    regions.sort();
    assert_eq!(regions, vec!["ams", "syd"]);

    let out = h.aloft(&[
        "deploy",
        "--image",
        "registry.local/web:unhealthy",
        "--wait-timeout",
        "2s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("GET /health: 500 Internal Server Error"),
        "{err}"
    );
    assert!(err.contains("is critical"), "{err}");
    assert!(err.contains(&before[0].id), "{err}");
    assert!(err.contains("rolled back"), "{err}");
    let after = h.machines("web");
    assert_eq!(after.len(), 2);
    for m in &after {
        assert_eq!(
            m.config.image, "registry.local/web:v1",
            "machine {} not rolled back",
            m.id
        );
        assert_eq!(m.state, MachineState::Started);
    }
}

#[test]
fn failing_release_command_stops_the_deploy() {
    let h = Harness::start(&[("h1", "ams")]);
    h.ok(&["apps", "create", "web"]);
    h.write("fly.toml", HEALTHY_TOML);
    h.ok(&["deploy"]);
    let before = h.machines("web");
    let with_rc = HEALTHY_TOML.replace(
        "strategy = \"rolling\"",
        "strategy = \"rolling\"\n  release_command = \"bin/migrate --fail\"",
    );
    h.write("fly.toml", &with_rc);
    let out = h.aloft(&["deploy", "--image", "registry.local/web:v2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("release command `bin/migrate --fail`"),
        "{err}"
    );
    assert!(err.contains("exited with code 1"), "{err}");
    assert!(
        err.contains("ran `bin/migrate --fail`: exit 1"),
        "its logs are shown: {err}"
    );
    let after = h.machines("web");
    assert_eq!(after.len(), 1, "the release machine is cleaned up");
    assert_eq!(
        after[0].instance_id, before[0].instance_id,
        "nothing changed"
    );

    // A release command that succeeds lets the deploy go on.
    h.write("fly.toml", &with_rc.replace("--fail", "--ok"));
    h.ok(&["deploy", "--image", "registry.local/web:v2"]);
    let after = h.machines("web");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].config.image, "registry.local/web:v2");
}

#[test]
fn machine_commands_round_trip() {
    let h = Harness::start(&[("h1", "ams")]);
    h.ok(&["apps", "create", "tools"]);
    let m = h.json(&[
        "machine",
        "run",
        "registry.local/busybox:1",
        "-a",
        "tools",
        "--env",
        "A=1",
        "--port",
        "80:8080/tcp:http",
        "--memory",
        "512",
        "--json",
        "--",
        "sleep",
        "inf",
    ]);
    let id = m["id"].as_str().unwrap().to_string();
    assert_eq!(m["state"], "started");
    assert_eq!(m["config"]["env"]["A"], "1");
    assert_eq!(m["config"]["guest"]["memory_mb"], 512);
    assert_eq!(m["config"]["services"][0]["internal_port"], 8080);
    assert_eq!(
        m["config"]["init"]["cmd"],
        serde_json::json!(["sleep", "inf"])
    );

    let list = h.json(&["machine", "list", "-a", "tools", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(h.ok(&["machine", "list", "-a", "tools"]).contains(&id));

    let out = h.aloft(&[
        "machine", "exec", &id, "-a", "tools", "--", "echo", "hi", "there",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi there\n");
    let out = h.aloft(&["machine", "exec", &id, "-a", "tools", "--", "false"]);
    assert_eq!(out.status.code(), Some(1), "exec passes the exit code on");

    h.ok(&["machine", "stop", &id, "-a", "tools"]);
    assert_eq!(h.machines("tools")[0].state, MachineState::Stopped);
    h.ok(&["machine", "start", &id, "-a", "tools"]);
    h.ok(&["machine", "suspend", &id, "-a", "tools"]);
    assert_eq!(h.machines("tools")[0].state, MachineState::Suspended);
    h.ok(&["machine", "start", &id, "-a", "tools"]);

    let u = h.json(&[
        "machine",
        "update",
        &id,
        "-a",
        "tools",
        "--image",
        "registry.local/busybox:2",
        "--json",
    ]);
    assert_eq!(u["config"]["image"], "registry.local/busybox:2");
    assert_eq!(
        u["config"]["env"]["A"], "1",
        "update keeps the rest of the config"
    );

    let c = h.json(&["machine", "clone", &id, "-a", "tools", "--json"]);
    assert_ne!(c["id"], id.as_str());
    assert_eq!(c["config"]["image"], "registry.local/busybox:2");

    let st = h.json(&["machine", "status", &id, "-a", "tools", "--json"]);
    assert!(
        st["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "update")
    );

    // A machine that is not there is named in the error.
    let out = h.aloft(&["machine", "stop", "nosuch", "-a", "tools"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("machine nosuch of app tools"),
        "{}",
        stderr(&out)
    );

    h.ok(&["machine", "destroy", &id, "-a", "tools", "--force"]);
    assert_eq!(h.machines("tools").len(), 1);
}

#[test]
fn scale_count_spreads_over_regions() {
    let h = Harness::start(&[("h1", "ams"), ("h2", "syd")]);
    h.ok(&["apps", "create", "web"]);
    h.write("fly.toml", HEALTHY_TOML);
    h.ok(&["deploy"]);
    let v = h.json(&["scale", "count", "3", "--region", "ams,syd", "--json"]);
    assert_eq!(v["target"], serde_json::json!({"ams": 2, "syd": 1}));
    let ms = h.machines("web");
    assert_eq!(ms.len(), 3);
    assert_eq!(ms.iter().filter(|m| m.region == "ams").count(), 2);
    assert!(ms.iter().all(|m| m.config.image == "registry.local/web:v1"));
    // Down again.
    h.ok(&["scale", "count", "1", "--region", "ams,syd"]);
    assert_eq!(h.machines("web").len(), 1);
    // Memory.
    h.ok(&["scale", "memory", "1024"]);
    let ms = h.machines("web");
    assert_eq!(ms[0].config.guest.as_ref().unwrap().memory_mb, 1024);
    // VM size (issue 8).
    let v = h.json(&[
        "scale",
        "vm",
        "performance-1x",
        "--vm-memory",
        "4096",
        "--json",
    ]);
    assert_eq!(v["updated"].as_array().map(Vec::len), Some(1), "{v}");
    let g = h.machines("web")[0].config.guest.clone().unwrap();
    assert_eq!(
        (g.cpu_kind.as_str(), g.cpus, g.memory_mb),
        ("performance", 1, 4096)
    );
    h.ok(&["scale", "vm", "shared-cpu-2x"]);
    let g = h.machines("web")[0].config.guest.clone().unwrap();
    assert_eq!(
        (g.cpu_kind.as_str(), g.cpus, g.memory_mb),
        ("shared", 2, 512)
    );
    let out = h.aloft(&["scale", "vm", "shared-cpu-1x", "--vm-memory", "4096"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not fit shared-cpu-1x"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn secrets_reach_machines_and_never_come_back() {
    let h = Harness::start(&[("h1", "ams")]);
    h.ok(&["apps", "create", "web"]);
    h.write("fly.toml", HEALTHY_TOML);
    h.ok(&["deploy"]);
    let id = h.machines("web")[0].id.clone();

    let out = h.ok(&["secrets", "set", "DB_PASSWORD=hunter2", "API_KEY=k1"]);
    assert!(out.contains("1 machine(s) updated"), "{out}");
    let got = h.rt.block_on(h.agents[0].secrets_of(&id));
    assert_eq!(got.get("DB_PASSWORD").map(String::as_str), Some("hunter2"));

    let list = h.json(&["secrets", "list", "--json"]);
    let text = list.to_string();
    assert!(
        text.contains("DB_PASSWORD") && text.contains("digest"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "a value leaked: {text}");

    // Staged: stored, machines untouched until `secrets deploy`.
    let version = h.machines("web")[0].instance_id.clone();
    h.ok(&["secrets", "unset", "API_KEY", "--stage"]);
    assert_eq!(h.machines("web")[0].instance_id, version);
    h.ok(&["secrets", "deploy"]);
    let got = h.rt.block_on(h.agents[0].secrets_of(&id));
    assert!(!got.contains_key("API_KEY"));
}

#[test]
fn volumes_round_trip() {
    let h = Harness::start(&[("h1", "ams")]);
    h.ok(&["apps", "create", "db"]);
    let v = h.json(&[
        "volumes", "create", "pgdata", "--size", "3", "--region", "ams", "-a", "db", "--json",
    ]);
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["size_gb"], 3);
    let list = h.json(&["volumes", "list", "-a", "db", "--json"]);
    assert_eq!(list[0]["name"], "pgdata");
    h.ok(&["volumes", "extend", &id, "--size", "5", "-a", "db"]);
    let show = h.json(&["volumes", "show", &id, "-a", "db", "--json"]);
    assert_eq!(show["size_gb"], 5);
    h.ok(&["volumes", "destroy", &id, "-a", "db"]);
    let list = h.json(&["volumes", "list", "-a", "db", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 0);
    let out = h.aloft(&["volumes", "create", "pgdata", "--size", "0", "-a", "db"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn deploy_and_scale_give_each_machine_its_own_volume() {
    let h = Harness::start(&[("h1", "ams")]);
    h.ok(&["apps", "create", "web"]);
    h.write(
        "fly.toml",
        &format!(
            "{HEALTHY_TOML}\n[[mounts]]\n  source = \"data\"\n  destination = \"/data\"\n  initial_size = \"2gb\"\n"
        ),
    );
    h.ok(&["deploy"]);
    let ms = h.machines("web");
    assert_eq!(ms.len(), 1);
    let vols = h.json(&["volumes", "list", "--json"]);
    assert_eq!(vols.as_array().unwrap().len(), 1);
    assert_eq!(vols[0]["name"], "data");
    assert_eq!(vols[0]["size_gb"], 2);
    assert_eq!(
        ms[0].config.mounts[0].volume,
        vols[0]["id"].as_str().unwrap()
    );
    assert_eq!(vols[0]["attached_machine_id"], ms[0].id.as_str());

    // A redeploy keeps the attachment.
    h.ok(&["deploy", "--image", "registry.local/web:v2"]);
    let ms2 = h.machines("web");
    assert_eq!(
        ms2[0].config.mounts[0].volume,
        ms[0].config.mounts[0].volume
    );

    // Scaling out makes a second volume of the same size for the new machine.
    h.ok(&["scale", "count", "2"]);
    let ms = h.machines("web");
    assert_eq!(ms.len(), 2);
    assert_ne!(ms[0].config.mounts[0].volume, ms[1].config.mounts[0].volume);
    let vols = h.json(&["volumes", "list", "--json"]);
    assert_eq!(vols.as_array().unwrap().len(), 2);
    assert!(vols.as_array().unwrap().iter().all(|v| v["size_gb"] == 2));
}

#[test]
fn canary_bluegreen_and_immediate_strategies() {
    let h = Harness::start(&[("h1", "ams")]);
    h.ok(&["apps", "create", "web"]);
    h.write("fly.toml", HEALTHY_TOML);
    h.ok(&["deploy"]);
    let first = h.machines("web")[0].clone();

    // canary: a temporary machine first, then the rolling update of the same machine.
    let r = h.json(&[
        "deploy",
        "--image",
        "registry.local/web:v2",
        "--strategy",
        "canary",
        "--json",
    ]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["groups"][0]["created"].as_array().unwrap().len(), 1);
    assert_eq!(r["groups"][0]["destroyed"], r["groups"][0]["created"]);
    let ms = h.machines("web");
    assert_eq!(ms.len(), 1);
    assert_eq!(
        (ms[0].id.as_str(), ms[0].config.image.as_str()),
        (first.id.as_str(), "registry.local/web:v2")
    );

    // A failing canary changes nothing.
    let out = h.aloft(&[
        "deploy",
        "--image",
        "registry.local/web:unhealthy",
        "--strategy",
        "canary",
        "--wait-timeout",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("canary machine"), "{}", stderr(&out));
    let ms = h.machines("web");
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0].config.image, "registry.local/web:v2");

    // bluegreen: new machines replace the old ones.
    h.ok(&[
        "deploy",
        "--image",
        "registry.local/web:v3",
        "--strategy",
        "bluegreen",
    ]);
    let ms = h.machines("web");
    assert_eq!(ms.len(), 1);
    assert_ne!(ms[0].id, first.id);
    assert_eq!(ms[0].config.image, "registry.local/web:v3");

    // A failing green set leaves the blue one alone.
    let blue = ms[0].id.clone();
    let out = h.aloft(&[
        "deploy",
        "--image",
        "registry.local/web:unhealthy",
        "--strategy",
        "bluegreen",
        "--wait-timeout",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let ms = h.machines("web");
    assert_eq!(ms.len(), 1);
    assert_eq!(
        (ms[0].id.as_str(), ms[0].config.image.as_str()),
        (blue.as_str(), "registry.local/web:v3")
    );

    // immediate: updated without waiting for checks, so even an unhealthy image lands.
    h.ok(&[
        "deploy",
        "--image",
        "registry.local/web:unhealthy",
        "--strategy",
        "immediate",
    ]);
    assert_eq!(
        h.machines("web")[0].config.image,
        "registry.local/web:unhealthy"
    );
}

#[test]
fn deploy_leases_machines_and_respects_others_leases() {
    let h = Harness::start(&[("h1", "ams")]);
    h.ok(&["apps", "create", "web"]);
    h.write("fly.toml", HEALTHY_TOML);
    h.ok(&["deploy"]);
    let m = h.machines("web")[0].clone();
    // Someone else holds the machine.
    let lease = h
        .rt
        .block_on(h.agents[0].acquire_lease("web", &m.id, Duration::from_secs(600), "other", None))
        .unwrap();
    let out = h.aloft(&["deploy", "--image", "registry.local/web:v2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot lease machine {} of app web", m.id)),
        "{err}"
    );
    assert_eq!(
        h.machines("web")[0].instance_id,
        m.instance_id,
        "nothing changed"
    );
    h.rt.block_on(h.agents[0].release_lease("web", &m.id, &lease.nonce))
        .unwrap();
    // Free again: the deploy goes through and gives its own leases back.
    h.ok(&["deploy", "--image", "registry.local/web:v2"]);
    assert_eq!(h.machines("web")[0].config.image, "registry.local/web:v2");
    assert!(h.rt.block_on(h.agents[0].get_lease("web", &m.id)).is_err());
}

#[test]
fn auth_login_saves_the_api_for_later_commands() {
    let h = Harness::start(&[("h1", "ams")]);
    let run = |args: &[&str]| aloft_in(&h.work(), h.dir.path(), args, &[]);
    // A bad token is not saved.
    let out = run(&["auth", "login", "--api-url", &h.url, "--token", "bogus"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!h.dir.path().join("home/.config/aloft/config.json").exists());

    let out = run(&["auth", "login", "--api-url", &h.url, "--token", &h.token]);
    assert!(out.status.success(), "{}", stderr(&out));
    let saved = h.dir.path().join("home/.config/aloft/config.json");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&saved).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the token file is private");
    let out = run(&["apps", "create", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["auth", "whoami", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let who: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(who["api_url"], h.url.as_str());
    assert_eq!(who["source"], saved.display().to_string());

    // Deploying an app that does not exist says what to do.
    h.write(
        "fly.toml",
        &HEALTHY_TOML.replace("app = \"web\"", "app = \"ghost\""),
    );
    let out = run(&["deploy"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("app ghost does not exist: run `aloft launch`"),
        "{}",
        stderr(&out)
    );

    let out = run(&["auth", "logout"]);
    assert!(out.status.success());
    let out = run(&["apps", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no API"), "{}", stderr(&out));
}

#[test]
fn logs_follow_prints_new_lines_as_they_come() {
    use std::io::BufRead;
    let h = Harness::start(&[("h1", "ams")]);
    h.ok(&["apps", "create", "web"]);
    let m = h.json(&[
        "machine",
        "run",
        "registry.local/web:v1",
        "-a",
        "web",
        "--json",
    ]);
    let id = m["id"].as_str().unwrap().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_aloft"))
        .args(["logs", "-f", "--json", "-a", "web"])
        .current_dir(h.work())
        .env("HOME", h.dir.path().join("home"))
        .env("ALOFT_DATA_DIR", h.dir.path().join("data"))
        .env("ALOFT_API_URL", &h.url)
        .env("ALOFT_API_TOKEN", &h.token)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| -> Value {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no log line for {what} within 20s"));
        serde_json::from_str(&line).unwrap()
    };
    assert_eq!(
        next("the first boot")["message"],
        "booted registry.local/web:v1"
    );
    // A restart boots again; the follower sees it without being asked twice.
    h.ok(&["machine", "restart", &id, "-a", "web"]);
    let l = next("the restart");
    assert_eq!(
        (l["machine_id"].as_str(), l["message"].as_str()),
        (Some(id.as_str()), Some("booted registry.local/web:v1"))
    );
    // Nothing is printed twice.
    assert!(rx.recv_timeout(Duration::from_millis(1500)).is_err());
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `aloft ssh console` through the console WebSocket to the double's tiny shell.
#[test]
fn ssh_console_streams_and_returns_the_exit_code() {
    let h = Harness::start(&[("h1", "ams")]);
    h.ok(&["apps", "create", "web"]);
    h.write("fly.toml", HEALTHY_TOML);
    h.ok(&["deploy"]);
    let out = h.aloft(&["ssh", "console", "-C", "echo hi; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    // No -C: the shell (`cat` here) gets our stdin until EOF.
    let mut c = Command::new(env!("CARGO_BIN_EXE_aloft"))
        .args(["ssh", "console"])
        .current_dir(h.work())
        .env_remove("ALOFT_APP")
        .env("HOME", h.dir.path().join("home"))
        .env("ALOFT_DATA_DIR", h.dir.path().join("data"))
        .env("ALOFT_API_URL", &h.url)
        .env("ALOFT_API_TOKEN", &h.token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = c.stdin.take().unwrap();
        stdin.write_all(b"line one\nline two\n").unwrap();
    }
    let out = c.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "line one\nline two\n");
    // A bad machine id.
    let out = h.aloft(&["ssh", "console", "--machine", "nope", "-C", "echo x"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("404") && stderr(&out).contains("nope"),
        "{}",
        stderr(&out)
    );
}
