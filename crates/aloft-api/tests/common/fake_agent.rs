//! A test double of one host's agent: machines, leases, events, metadata and volumes
//! kept in memory, with immediate state transitions. Only the tests use it; the
//! shipped router knows agents through `AgentApi` alone.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aloft_agent::{
    AgentApi, AgentError, CreateMachine, CreateVolume, ExecOutput, LogLine, StopOptions,
    UpdateMachine, WaitFor,
};
use aloft_types::machine::{Lease, Machine, MachineEvent, MachineState, Volume};
use tokio::sync::{Mutex, watch};

#[derive(Default)]
struct Inner {
    machines: HashMap<(String, String), Machine>,
    leases: HashMap<(String, String), Lease>,
    metadata: HashMap<(String, String), BTreeMap<String, String>>,
    secrets: HashMap<String, BTreeMap<String, String>>,
    cordoned: HashMap<String, bool>,
    volumes: HashMap<(String, String), Volume>,
    signals: Vec<(String, String)>,
    snapshots: HashMap<String, Vec<aloft_types::machine::VolumeSnapshot>>,
    memory_limits: HashMap<String, i64>,
}

/// The boot memory of a fake machine.
fn boot_mb(m: &Machine) -> i64 {
    m.config
        .guest
        .as_ref()
        .map_or(256, |g| if g.memory_mb > 0 { g.memory_mb } else { 256 })
}

fn require_started(m: &Machine) -> Result<(), AgentError> {
    if m.state != MachineState::Started {
        return Err(AgentError::Conflict(format!(
            "machine {} is not running",
            m.id
        )));
    }
    Ok(())
}

pub struct FakeAgent {
    host: String,
    region: String,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    down: std::sync::atomic::AtomicBool,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn rand_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().r#gen();
    format!("{n:016x}")[..14].to_string()
}

fn nf(kind: &'static str, id: &str) -> AgentError {
    AgentError::NotFound {
        kind,
        id: id.to_string(),
    }
}

impl FakeAgent {
    pub fn new(host: &str, region: &str) -> Self {
        Self {
            host: host.into(),
            region: region.into(),
            inner: Mutex::new(Inner::default()),
            changed: watch::channel(0).0,
            down: Default::default(),
        }
    }

    /// Makes listing and reading machines fail as an unreachable host would.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn check_up(&self) -> Result<(), AgentError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AgentError::Internal(format!(
                "host {} unreachable",
                self.host
            )));
        }
        Ok(())
    }

    /// The secrets the API passed with the latest create/update of machine `id`.
    pub async fn secrets_of(&self, id: &str) -> BTreeMap<String, String> {
        self.inner
            .lock()
            .await
            .secrets
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    pub async fn is_cordoned(&self, id: &str) -> bool {
        self.inner
            .lock()
            .await
            .cordoned
            .get(id)
            .copied()
            .unwrap_or(false)
    }

    pub async fn signals(&self) -> Vec<(String, String)> {
        self.inner.lock().await.signals.clone()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn check_lease(
        inner: &Inner,
        app: &str,
        id: &str,
        nonce: Option<&str>,
    ) -> Result<(), AgentError> {
        if let Some(l) = inner.leases.get(&(app.to_string(), id.to_string())) {
            let now = now_ms() / 1000;
            if l.expires_at > now && nonce != Some(l.nonce.as_str()) {
                return Err(AgentError::Conflict(format!(
                    "machine {id} is leased by {} until {}",
                    l.owner, l.expires_at
                )));
            }
        }
        Ok(())
    }

    async fn transition(
        &self,
        app: &str,
        id: &str,
        nonce: Option<&str>,
        kind: &str,
        to: MachineState,
    ) -> Result<Machine, AgentError> {
        let mut g = self.inner.lock().await;
        Self::check_lease(&g, app, id, nonce)?;
        let m = g
            .machines
            .get_mut(&(app.to_string(), id.to_string()))
            .filter(|m| m.state != MachineState::Destroyed)
            .ok_or_else(|| nf("machine", id))?;
        m.state = to;
        m.updated_at = aloft_api::util::now_rfc3339();
        m.events.push(MachineEvent {
            id: rand_id(),
            kind: kind.into(),
            status: to.to_string(),
            source: "user".into(),
            timestamp: now_ms(),
            request: None,
        });
        let out = m.clone();
        drop(g);
        self.bump();
        Ok(out)
    }

    async fn machine(&self, app: &str, id: &str) -> Result<Machine, AgentError> {
        self.check_up()?;
        self.inner
            .lock()
            .await
            .machines
            .get(&(app.to_string(), id.to_string()))
            .cloned()
            .ok_or_else(|| nf("machine", id))
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
        let id = rand_id();
        let now = aloft_api::util::now_rfc3339();
        let state = if req.skip_launch {
            MachineState::Created
        } else {
            MachineState::Started
        };
        let mut m = Machine {
            id: id.clone(),
            name: req.name.clone().unwrap_or_else(|| format!("m-{id}")),
            state,
            region: self.region.clone(),
            instance_id: rand_id(),
            private_ip: "fdaa::2".into(),
            config: req.config.clone(),
            image_ref: None,
            created_at: now.clone(),
            updated_at: now,
            events: vec![MachineEvent {
                id: rand_id(),
                kind: "launch".into(),
                status: state.to_string(),
                source: "user".into(),
                timestamp: now_ms(),
                request: None,
            }],
            checks: vec![],
            host_status: "ok".into(),
            nonce: None,
            cordoned: false,
        };
        let mut g = self.inner.lock().await;
        if let Some(ttl) = req.lease_ttl {
            let lease = Lease {
                nonce: rand_id(),
                expires_at: now_ms() / 1000 + ttl as i64,
                owner: "api".into(),
                description: String::new(),
                version: m.instance_id.clone(),
            };
            m.nonce = Some(lease.nonce.clone());
            g.leases.insert((req.app.clone(), id.clone()), lease);
        }
        g.secrets.insert(id.clone(), req.secrets.clone());
        g.metadata
            .insert((req.app.clone(), id.clone()), req.config.metadata.clone());
        g.machines.insert((req.app.clone(), id), m.clone());
        drop(g);
        self.bump();
        Ok(m)
    }

    async fn get_machine(&self, app: &str, id: &str) -> Result<Machine, AgentError> {
        self.machine(app, id).await
    }

    async fn list_machines(&self, app: &str) -> Result<Vec<Machine>, AgentError> {
        self.check_up()?;
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
        let mut g = self.inner.lock().await;
        Self::check_lease(&g, app, id, lease_nonce)?;
        let m = g
            .machines
            .get_mut(&(app.to_string(), id.to_string()))
            .ok_or_else(|| nf("machine", id))?;
        if let Some(v) = &req.current_version
            && *v != m.instance_id
        {
            return Err(AgentError::Conflict(format!(
                "machine {id} is at version {}, not {v}",
                m.instance_id
            )));
        }
        m.config = req.config;
        m.instance_id = rand_id();
        if let Some(n) = req.name {
            m.name = n;
        }
        let out = m.clone();
        g.secrets.insert(id.to_string(), req.secrets);
        drop(g);
        self.bump();
        Ok(out)
    }

    async fn start_machine(
        &self,
        app: &str,
        id: &str,
        n: Option<&str>,
    ) -> Result<Machine, AgentError> {
        self.transition(app, id, n, "start", MachineState::Started)
            .await
    }

    async fn stop_machine(
        &self,
        app: &str,
        id: &str,
        _opts: StopOptions,
        n: Option<&str>,
    ) -> Result<Machine, AgentError> {
        self.transition(app, id, n, "stop", MachineState::Stopped)
            .await
    }

    async fn restart_machine(
        &self,
        app: &str,
        id: &str,
        _opts: StopOptions,
        n: Option<&str>,
    ) -> Result<Machine, AgentError> {
        self.transition(app, id, n, "restart", MachineState::Started)
            .await
    }

    async fn suspend_machine(
        &self,
        app: &str,
        id: &str,
        n: Option<&str>,
    ) -> Result<Machine, AgentError> {
        self.transition(app, id, n, "suspend", MachineState::Suspended)
            .await
    }

    async fn signal_machine(&self, app: &str, id: &str, signal: &str) -> Result<(), AgentError> {
        self.machine(app, id).await?;
        self.inner
            .lock()
            .await
            .signals
            .push((id.to_string(), signal.to_string()));
        Ok(())
    }

    async fn destroy_machine(
        &self,
        app: &str,
        id: &str,
        force: bool,
        n: Option<&str>,
    ) -> Result<(), AgentError> {
        let m = self.machine(app, id).await?;
        if m.state == MachineState::Started && !force {
            return Err(AgentError::Conflict(format!(
                "machine {id} is started; stop it first or use force"
            )));
        }
        self.transition(app, id, n, "destroy", MachineState::Destroyed)
            .await
            .map(|_| ())
    }

    async fn cordon_machine(&self, app: &str, id: &str, cordoned: bool) -> Result<(), AgentError> {
        self.machine(app, id).await?;
        self.inner
            .lock()
            .await
            .cordoned
            .insert(id.to_string(), cordoned);
        Ok(())
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
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(AgentError::WaitTimeout {
                        id: id.to_string(),
                        wanted: wait.states.join(","),
                    });
                }
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
        let key = (app.to_string(), id.to_string());
        let now = now_ms() / 1000;
        if let Some(l) = g.leases.get(&key)
            && l.expires_at > now
            && existing != Some(l.nonce.as_str())
        {
            return Err(AgentError::Conflict(format!(
                "machine {id} already has a lease"
            )));
        }
        let lease = Lease {
            nonce: existing.map(str::to_string).unwrap_or_else(rand_id),
            expires_at: now + ttl.as_secs() as i64,
            owner: "test@example.com".into(),
            description: description.into(),
            version: m.instance_id,
        };
        g.leases.insert(key, lease.clone());
        Ok(lease)
    }

    async fn get_lease(&self, app: &str, id: &str) -> Result<Lease, AgentError> {
        self.machine(app, id).await?;
        let now = now_ms() / 1000;
        self.inner
            .lock()
            .await
            .leases
            .get(&(app.to_string(), id.to_string()))
            .filter(|l| l.expires_at > now)
            .cloned()
            .ok_or_else(|| nf("lease", id))
    }

    async fn release_lease(&self, app: &str, id: &str, nonce: &str) -> Result<(), AgentError> {
        let mut g = self.inner.lock().await;
        let key = (app.to_string(), id.to_string());
        match g.leases.get(&key) {
            Some(l) if l.nonce == nonce => {
                g.leases.remove(&key);
                Ok(())
            }
            Some(_) => Err(AgentError::Conflict("lease nonce does not match".into())),
            None => Err(nf("lease", id)),
        }
    }

    async fn exec(
        &self,
        app: &str,
        id: &str,
        command: Vec<String>,
        _timeout: Duration,
    ) -> Result<ExecOutput, AgentError> {
        self.machine(app, id).await?;
        Ok(ExecOutput {
            exit_code: 0,
            exit_signal: 0,
            stdout: format!("{}\n", command.join(" ")),
            stderr: String::new(),
        })
    }

    async fn logs(
        &self,
        app: &str,
        id: &str,
        since: Option<i64>,
    ) -> Result<Vec<LogLine>, AgentError> {
        // One `system` line per event.
        let m = self.machine(app, id).await?;
        Ok(m.events
            .iter()
            .filter(|e| since.is_none_or(|s| e.timestamp > s))
            .map(|e| LogLine {
                machine_id: m.id.clone(),
                region: m.region.clone(),
                timestamp: e.timestamp,
                stream: "system".into(),
                message: format!("{} {}", e.kind, e.status),
            })
            .collect())
    }

    async fn metadata_get(
        &self,
        app: &str,
        id: &str,
    ) -> Result<BTreeMap<String, String>, AgentError> {
        self.machine(app, id).await?;
        Ok(self
            .inner
            .lock()
            .await
            .metadata
            .get(&(app.to_string(), id.to_string()))
            .cloned()
            .unwrap_or_default())
    }

    async fn metadata_set(
        &self,
        app: &str,
        id: &str,
        key: &str,
        value: &str,
    ) -> Result<(), AgentError> {
        self.machine(app, id).await?;
        self.inner
            .lock()
            .await
            .metadata
            .entry((app.to_string(), id.to_string()))
            .or_default()
            .insert(key.into(), value.into());
        Ok(())
    }

    async fn metadata_delete(&self, app: &str, id: &str, key: &str) -> Result<(), AgentError> {
        self.machine(app, id).await?;
        self.inner
            .lock()
            .await
            .metadata
            .entry((app.to_string(), id.to_string()))
            .or_default()
            .remove(key);
        Ok(())
    }

    async fn create_volume(&self, req: CreateVolume) -> Result<Volume, AgentError> {
        if let Some(snap) = &req.snapshot_id {
            let g = self.inner.lock().await;
            let found = g.snapshots.values().flatten().find(|s| &s.id == snap);
            let Some(found) = found else {
                return Err(nf("snapshot", snap));
            };
            if req.size_gb << 30 < found.volume_size {
                return Err(AgentError::Invalid {
                    field: "size_gb".into(),
                    message: "smaller than the snapshot".into(),
                });
            }
        }
        let v = Volume {
            id: format!("vol_{}", rand_id()),
            name: req.name,
            state: "created".into(),
            size_gb: req.size_gb,
            region: self.region.clone(),
            zone: self.host.clone(),
            encrypted: false,
            attached_machine_id: None,
            attached_alloc_id: None,
            created_at: aloft_api::util::now_rfc3339(),
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
        v.size_gb = size_gb;
        Ok(v.clone())
    }

    async fn destroy_volume(&self, app: &str, id: &str) -> Result<Volume, AgentError> {
        let mut g = self.inner.lock().await;
        let mut v = g
            .volumes
            .remove(&(app.to_string(), id.to_string()))
            .ok_or_else(|| nf("volume", id))?;
        g.snapshots.remove(id);
        drop(g);
        v.state = "destroyed".into();
        Ok(v)
    }

    /// Says what it was asked to run, echoes stdin to stdout, reports resizes, and
    /// exits with code 0 at end of stdin.
    async fn console(
        &self,
        app: &str,
        id: &str,
        req: aloft_agent::api::ConsoleRequest,
    ) -> Result<aloft_agent::api::ConsoleSession, AgentError> {
        use aloft_agent::api::{ConsoleInput, ConsoleOutput, ConsoleSession};
        self.machine(app, id).await?;
        let (in_tx, mut in_rx) = tokio::sync::mpsc::channel(16);
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(64);
        let hello = format!(
            "{} tty={} {}x{}\n",
            req.command.join(" "),
            req.tty,
            req.rows,
            req.cols
        );
        let _ = out_tx.send(ConsoleOutput::Stdout(hello.into_bytes())).await;
        tokio::spawn(async move {
            while let Some(input) = in_rx.recv().await {
                let out = match input {
                    ConsoleInput::Stdin(d) => ConsoleOutput::Stdout(d),
                    ConsoleInput::Resize { rows, cols } => {
                        ConsoleOutput::Stderr(format!("resize {rows}x{cols}\n").into_bytes())
                    }
                    ConsoleInput::Eof => break,
                };
                let _ = out_tx.send(out).await;
            }
            let _ = out_tx
                .send(ConsoleOutput::Exit {
                    code: Some(0),
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

    /// init and the app, as a guest would list them.
    async fn machine_ps(
        &self,
        app: &str,
        id: &str,
    ) -> Result<Vec<aloft_types::guest::ProcessStat>, AgentError> {
        let m = self.machine(app, id).await?;
        require_started(&m)?;
        let app_cmd = m.config.init.cmd.clone().unwrap_or_default().join(" ");
        let p = |pid: i32, command: String, rss: u64| aloft_types::guest::ProcessStat {
            pid,
            command,
            cpu: 10 * pid as u64,
            rss,
            rtime: 1000,
            stime: pid as u64,
            directory: "/".into(),
            listen_sockets: Vec::new(),
        };
        Ok(vec![p(1, "/init".into(), 1 << 20), p(42, app_cmd, 8 << 20)])
    }

    async fn get_memory(
        &self,
        app: &str,
        id: &str,
    ) -> Result<aloft_agent::MachineMemory, AgentError> {
        let m = self.machine(app, id).await?;
        let limit = self
            .inner
            .lock()
            .await
            .memory_limits
            .get(id)
            .copied()
            .unwrap_or_else(|| boot_mb(&m));
        let started = m.state == MachineState::Started;
        Ok(aloft_agent::MachineMemory {
            limit_mb: limit,
            available_mb: if started { limit / 2 } else { 0 },
        })
    }

    async fn set_memory_limit(
        &self,
        app: &str,
        id: &str,
        limit_mb: i64,
    ) -> Result<aloft_agent::MachineMemory, AgentError> {
        let m = self.machine(app, id).await?;
        if !(64..=boot_mb(&m)).contains(&limit_mb) {
            return Err(AgentError::Invalid {
                field: "limit_mb".into(),
                message: format!("{limit_mb} MB is out of range"),
            });
        }
        require_started(&m)?;
        self.inner
            .lock()
            .await
            .memory_limits
            .insert(id.to_string(), limit_mb);
        self.get_memory(app, id).await
    }

    async fn reclaim_memory(&self, app: &str, id: &str, amount_mb: i64) -> Result<i64, AgentError> {
        let m = self.machine(app, id).await?;
        require_started(&m)?;
        let limit = self.get_memory(app, id).await?.limit_mb;
        Ok(amount_mb.min(limit - 64).max(0))
    }

    async fn create_volume_snapshot(
        &self,
        app: &str,
        volume_id: &str,
    ) -> Result<aloft_types::machine::VolumeSnapshot, AgentError> {
        let v = self.get_volume(app, volume_id).await?;
        let snap = aloft_types::machine::VolumeSnapshot {
            id: format!("vs_{}", rand_id()),
            created_at: aloft_api::util::now_rfc3339(),
            status: "created".into(),
            size: 4096,
            volume_size: v.size_gb << 30,
            digest: String::new(),
            retention_days: v.snapshot_retention,
        };
        self.inner
            .lock()
            .await
            .snapshots
            .entry(volume_id.to_string())
            .or_default()
            .push(snap.clone());
        Ok(snap)
    }

    async fn list_volume_snapshots(
        &self,
        app: &str,
        volume_id: &str,
    ) -> Result<Vec<aloft_types::machine::VolumeSnapshot>, AgentError> {
        self.get_volume(app, volume_id).await?;
        Ok(self
            .inner
            .lock()
            .await
            .snapshots
            .get(volume_id)
            .cloned()
            .unwrap_or_default())
    }
}
