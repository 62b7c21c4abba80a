//! The agent: machine operations as persisted step sequences, one supervisor task per
//! running VM, restart policy, recovery after a crash, catalog publishing and the
//! host heartbeat.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aloft_image::{ImageStore, PullOptions};
use aloft_store::{Store, StoreError};
use aloft_types::catalog::{self, HostRecord, MachineRecord, ServiceAddress};
use aloft_types::guest::{self, InterfaceConfig, NetworkConfig, RunConfig, VolumeMount};
use aloft_types::machine::{
    CheckStatus, ImageRef, Lease, Machine, MachineEvent, MachineState, Volume,
};
use aloft_vmm::channel::GuestChannel;
use aloft_vmm::{Accel, PortForward, Vm, VmNetwork, VmSpec, Vmm};
use tokio::sync::{Mutex, watch};

use crate::api::{
    AgentApi, AgentError, CreateMachine, CreateVolume, ExecOutput, LogLine, StopOptions,
    UpdateMachine, WaitFor,
};
use crate::db::{AgentDb, MachineExtra};

/// How one agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub host_id: String,
    pub region: String,
    /// The instance's data directory (`agent-<host>.db`, `machines/`, `volumes/` …).
    pub data_dir: PathBuf,
    pub kernel_dir: PathBuf,
    pub init_bin: PathBuf,
    /// Memory that machines may commit in total.
    pub memory_mb_total: u64,
    pub cpus_total: u32,
    pub accel: Accel,
    /// Address the user-mode port forwards listen on.
    pub forward_addr: String,
    pub pull: PullOptions,
    /// TCG translation cache per VM (MiB); smaller saves memory.
    pub tcg_tb_size_mb: Option<u32>,
}

/// Default restart policy when a machine's config has none (as Fly's flyd).
const DEFAULT_MAX_RETRIES: u32 = 10;
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a booted machine with services may take to listen before it is published
/// as started anyway.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const HEARTBEAT_TTL: Duration = Duration::from_secs(10);
/// Between unpublishing a machine with services and signalling its app.
const SERVICE_DRAIN: Duration = Duration::from_millis(500);

/// A running VM and the task that watches it. Dropping it does not stop the task
/// (the task itself removes its runtime when the VM ends); abort it explicitly.
struct Runtime {
    vm: Arc<dyn Vm>,
    channel: Option<Arc<GuestChannel>>,
    supervisor: tokio::task::JoinHandle<()>,
}

struct Inner {
    cfg: AgentConfig,
    db: AgentDb,
    store: Arc<dyn Store>,
    vmm: Arc<dyn Vmm>,
    images: ImageStore,
    runtimes: Mutex<HashMap<String, Runtime>>,
    /// Bumped on every machine change; `wait` listens to it.
    changes: watch::Sender<u64>,
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    checks: std::sync::Mutex<HashMap<String, Vec<CheckStatus>>>,
    /// Routed TAP networking (root) instead of user-mode forwards.
    tap_network: bool,
    /// Serialises private-network slot allocation.
    slots: std::sync::Mutex<()>,
}

/// One host's agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// RFC 3339 UTC time of a Unix-ms instant.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::thread_rng(), &mut b[..]);
    hex::encode(b)
}

/// A 26-character version id (time-ordered, like a ULID).
fn new_version() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut v = now_ms() as u128;
    let mut out = vec![0u8; 26];
    for slot in out[..10].iter_mut().rev() {
        *slot = ALPHABET[(v % 32) as usize];
        v /= 32;
    }
    let mut rng = rand::thread_rng();
    for slot in out[10..].iter_mut() {
        *slot = ALPHABET[rand::Rng::gen_range(&mut rng, 0..32)];
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The environment variable naming a fault to inject: `OP:STEP` (e.g. `start:2`) makes
/// the agent abort the instant after it records that step of that operation, as a
/// SIGKILL would. For crash-safety tests only.
pub const FAULT_ENV: &str = "ALOFT_AGENT_FAULT";

static FAULT: std::sync::OnceLock<Option<(String, u32)>> = std::sync::OnceLock::new();

/// Aborts the process here if `ALOFT_AGENT_FAULT` names this point.
fn fault_point(op: &str, step: u32) {
    let fault = FAULT.get_or_init(|| {
        let v = std::env::var(FAULT_ENV).ok()?;
        let (o, s) = v.split_once(':')?;
        Some((o.to_string(), s.parse().ok()?))
    });
    if let Some((o, s)) = fault
        && o == op
        && *s == step
    {
        eprintln!("aloft-agent: injected fault at {op}:{step}");
        std::process::abort();
    }
}

fn internal(e: impl std::fmt::Display) -> AgentError {
    AgentError::Internal(e.to_string())
}

fn not_found(id: &str) -> AgentError {
    AgentError::NotFound {
        kind: "machine",
        id: id.to_string(),
    }
}

fn signal_number(name: &str) -> Result<i32, AgentError> {
    guest::signal_number(name).ok_or_else(|| AgentError::Invalid {
        field: "signal".into(),
        message: format!("unknown signal {name:?}"),
    })
}

impl Agent {
    /// Opens the agent's database, re-attaches to the VMs that are still running,
    /// finishes or undoes interrupted operations, and starts the heartbeat.
    pub async fn open(
        cfg: AgentConfig,
        store: Arc<dyn Store>,
        vmm: Arc<dyn Vmm>,
    ) -> Result<Agent, AgentError> {
        Self::open_with_network(cfg, store, vmm, false).await
    }

    /// Like [`Agent::open`]; with `tap_network` (needs root) every machine gets a
    /// routed TAP with private IPv6/IPv4 addresses, NAT and organisation isolation
    /// (see [`crate::net`]) instead of user-mode networking with host port forwards.
    pub async fn open_with_network(
        cfg: AgentConfig,
        store: Arc<dyn Store>,
        vmm: Arc<dyn Vmm>,
        tap_network: bool,
    ) -> Result<Agent, AgentError> {
        if tap_network {
            crate::net::host_setup(&cfg.host_id).map_err(internal)?;
        }
        let db = AgentDb::open(&cfg.data_dir.join(format!("agent-{}.db", cfg.host_id)))
            .map_err(internal)?;
        let images = ImageStore::open(cfg.data_dir.join("images")).map_err(internal)?;
        let (changes, _) = watch::channel(0);
        let agent = Agent {
            inner: Arc::new(Inner {
                cfg,
                db,
                store,
                vmm,
                images,
                runtimes: Mutex::new(HashMap::new()),
                changes,
                locks: std::sync::Mutex::new(HashMap::new()),
                checks: std::sync::Mutex::new(HashMap::new()),
                tap_network,
                slots: std::sync::Mutex::new(()),
            }),
        };
        agent.recover().await;
        crate::volumes::sweep_snapshots(&agent);
        agent.spawn_background();
        Ok(agent)
    }

    fn cfg(&self) -> &AgentConfig {
        &self.inner.cfg
    }

    fn machine_dir(&self, id: &str) -> PathBuf {
        self.cfg().data_dir.join("machines").join(id)
    }

    fn lock_for(&self, id: &str) -> Arc<Mutex<()>> {
        let mut locks = match self.inner.locks.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        locks.entry(id.to_string()).or_default().clone()
    }

    fn load(&self, app: &str, id: &str) -> Result<(Machine, MachineExtra), AgentError> {
        match self.inner.db.get_machine(id).map_err(internal)? {
            Some((a, m, e)) if a == app => Ok((m, e)),
            _ => Err(not_found(id)),
        }
    }

    /// Persists a machine, tells waiters, and publishes it to the catalog.
    async fn save(
        &self,
        app: &str,
        m: &mut Machine,
        extra: &MachineExtra,
    ) -> Result<(), AgentError> {
        m.updated_at = rfc3339(now_ms());
        self.inner.db.put_machine(app, m, extra).map_err(internal)?;
        self.inner.changes.send_modify(|n| *n += 1);
        self.publish(app, m, extra).await;
        Ok(())
    }

    async fn publish(&self, app: &str, m: &Machine, extra: &MachineExtra) {
        let mut shown = m.clone();
        shown.checks = self.check_results(&m.id);
        shown.cordoned = extra.cordoned;
        let record = MachineRecord {
            schema: catalog::SCHEMA_VERSION,
            app: app.to_string(),
            host: self.cfg().host_id.clone(),
            machine: shown,
            addresses: extra
                .forwards
                .iter()
                .map(|(guest, host)| {
                    let (ip, port) = self.target(extra, *guest, *host);
                    ServiceAddress {
                        internal_port: *guest,
                        address: format!("{ip}:{port}"),
                    }
                })
                .collect(),
        };
        let key = catalog::machine_key(app, &m.id);
        let value = serde_json::to_vec(&record).unwrap_or_default();
        if let Err(e) = self.inner.store.put(&key, value).await {
            tracing::warn!(machine = %m.id, "catalog publish failed: {e}");
        }
    }

    /// Where the host reaches a machine's `guest` port: its private IPv4 (TAP mode) or
    /// the user-mode forward.
    pub(crate) fn target(&self, extra: &MachineExtra, guest: u16, host_port: u16) -> (String, u16) {
        match self.machine_net(extra) {
            Some(n) => (n.ipv4, guest),
            None => (self.cfg().forward_addr.clone(), host_port),
        }
    }

    fn machine_net(&self, extra: &MachineExtra) -> Option<crate::net::MachineNet> {
        let slot = extra.net_slot?;
        Some(crate::net::machine_net(
            &self.cfg().host_id,
            &extra.org,
            slot,
        ))
    }

    /// The lowest private-network slot no machine of this host holds.
    fn allocate_slot(&self, id: &str) -> Result<u16, AgentError> {
        let _held = match self.inner.slots.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let used: std::collections::HashSet<u16> = self
            .inner
            .db
            .list_machines(None)
            .map_err(internal)?
            .into_iter()
            .filter(|(_, m, _)| m.id != id)
            .filter_map(|(_, _, e)| e.net_slot)
            .collect();
        (1..16_000)
            .find(|s| !used.contains(s))
            .ok_or_else(|| AgentError::Capacity {
                host: self.cfg().host_id.clone(),
                detail: "no free private network slot".into(),
            })
    }

    fn event(
        &self,
        id: &str,
        kind: &str,
        status: &str,
        source: &str,
        request: Option<serde_json::Value>,
    ) {
        let e = MachineEvent {
            id: new_version(),
            kind: kind.to_string(),
            status: status.to_string(),
            source: source.to_string(),
            timestamp: now_ms(),
            request,
        };
        if let Err(err) = self.inner.db.add_event(id, &e) {
            tracing::warn!(machine = %id, "event not recorded: {err}");
        }
    }

    /// Drops a suspend file that could not be resumed, saying why in the machine's log.
    fn discard_suspend_file(&self, id: &str, file: &Path, why: &aloft_vmm::VmError) {
        self.system_log(
            id,
            &format!(
                "resume failed ({why}); the suspend file is discarded and the machine boots fresh"
            ),
        );
        if let Err(e) = std::fs::remove_file(file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(machine = %id, "cannot remove {}: {e}", file.display());
        }
    }

    fn system_log(&self, id: &str, message: &str) {
        let _ = self.inner.db.add_log(id, now_ms(), "system", message);
    }

    fn check_results(&self, id: &str) -> Vec<CheckStatus> {
        match self.inner.checks.lock() {
            Ok(c) => c.get(id).cloned().unwrap_or_default(),
            Err(p) => p.into_inner().get(id).cloned().unwrap_or_default(),
        }
    }

    /// Memory committed by machines that are running or about to.
    fn committed(&self) -> Result<(u64, u32, u32), AgentError> {
        let mut mem = 0;
        let mut cpus = 0;
        let mut count = 0;
        for (_, m, _) in self.inner.db.list_machines(None).map_err(internal)? {
            count += 1;
            if matches!(
                m.state,
                MachineState::Starting
                    | MachineState::Started
                    | MachineState::Stopping
                    | MachineState::Suspending
                    | MachineState::Replacing
            ) {
                let g = m.config.guest.clone().unwrap_or_default();
                mem += guest_memory(&m) as u64;
                cpus += g.cpus.max(1) as u32;
            }
        }
        Ok((mem, cpus, count))
    }

    fn check_capacity(&self, m: &Machine) -> Result<(), AgentError> {
        let (mem, _, _) = self.committed()?;
        let want = guest_memory(m) as u64;
        if mem + want > self.cfg().memory_mb_total {
            return Err(AgentError::Capacity {
                host: self.cfg().host_id.clone(),
                detail: format!(
                    "{want} MB asked, {} MB of {} MB free",
                    self.cfg().memory_mb_total.saturating_sub(mem),
                    self.cfg().memory_mb_total
                ),
            });
        }
        Ok(())
    }

    fn check_lease(&self, id: &str, nonce: Option<&str>) -> Result<(), AgentError> {
        if let Some(lease) = self.inner.db.lease(id).map_err(internal)?
            && lease.expires_at * 1000 > now_ms()
            && nonce != Some(lease.nonce.as_str())
        {
            return Err(AgentError::Conflict(format!(
                "machine {id} is leased by {:?} ({}); pass its nonce in fly-machine-lease-nonce",
                lease.owner, lease.description
            )));
        }
        Ok(())
    }

    /// Resolves the config's image to a cached base image, pulling it if needed.
    async fn resolve_image(
        &self,
        reference: &str,
    ) -> Result<aloft_image::store::ImageRecord, AgentError> {
        let invalid = |message: String| AgentError::Invalid {
            field: "config.image".into(),
            message,
        };
        if reference.trim().is_empty() {
            return Err(invalid("no image given".into()));
        }
        let normalised = aloft_image::normalise_reference(reference);
        if let Ok(rec) = self.inner.images.lookup(reference, normalised.as_deref()) {
            return Ok(rec);
        }
        let pulled = aloft_image::pull(
            &self.inner.images,
            reference,
            &self.cfg().pull,
            aloft_image::store::no_progress(),
        )
        .await
        .map_err(|e| invalid(format!("cannot resolve image {reference:?}: {e}")))?;
        Ok(pulled.record)
    }

    fn run_config(
        &self,
        app: &str,
        m: &Machine,
        extra: &MachineExtra,
        image: &aloft_image::store::ImageRecord,
        volumes: &[(String, PathBuf, String)],
    ) -> RunConfig {
        let group = m
            .config
            .metadata
            .get("fly_process_group")
            .cloned()
            .unwrap_or_else(|| "app".into());
        let image_ref = m.config.image.clone();
        let net = self.machine_net(extra);
        let private_ip = net
            .as_ref()
            .map_or_else(|| "10.0.2.15".to_string(), |n| n.ipv6.clone());
        let mut env = BTreeMap::new();
        let mut fly = |k: &str, v: &str| {
            env.insert(format!("FLY_{k}"), v.to_string());
            env.insert(format!("ALOFT_{k}"), v.to_string());
        };
        fly("APP_NAME", app);
        fly("MACHINE_ID", &m.id);
        fly("ALLOC_ID", &m.id);
        fly("REGION", &self.cfg().region);
        fly("PRIVATE_IP", &private_ip);
        fly("IMAGE_REF", &image_ref);
        fly("MACHINE_VERSION", &m.instance_id);
        fly("PROCESS_GROUP", &group);
        env.extend(extra.secrets.clone());
        let ic = &image.config;
        RunConfig {
            machine_id: m.id.clone(),
            app_name: app.to_string(),
            region: self.cfg().region.clone(),
            image_ref,
            machine_version: m.instance_id.clone(),
            hostname: m.id.clone(),
            process_group: group,
            config: m.config.clone(),
            image_config: guest::ImageConfig {
                entrypoint: ic.entrypoint.clone().unwrap_or_default(),
                cmd: ic.cmd.clone().unwrap_or_default(),
                env: ic.env.clone(),
                working_dir: ic.working_dir.clone().unwrap_or_default(),
                user: ic.user.clone().unwrap_or_default(),
                exposed_ports: ic.exposed_ports.clone(),
                labels: ic.labels.clone(),
            },
            extra_env: env,
            network: match &net {
                Some(n) => NetworkConfig {
                    interfaces: vec![InterfaceConfig {
                        name: "eth0".into(),
                        mac: n.mac.clone(),
                        addresses: vec![format!("{}/30", n.ipv4), format!("{}/112", n.ipv6)],
                        gateway4: Some(n.gateway4.clone()),
                        gateway6: Some(n.gateway6.clone()),
                        ..Default::default()
                    }],
                    dns_servers: vec![],
                    extra_hosts: vec![],
                },
                None => NetworkConfig {
                    interfaces: vec![InterfaceConfig {
                        name: "eth0".into(),
                        addresses: vec![format!("{private_ip}/24")],
                        gateway4: Some("10.0.2.2".into()),
                        ..Default::default()
                    }],
                    dns_servers: vec!["10.0.2.3".into()],
                    extra_hosts: vec![],
                },
            },
            volumes: volumes
                .iter()
                .enumerate()
                .map(|(i, (name, _, path))| VolumeMount {
                    name: name.clone(),
                    device: format!("/dev/vd{}", (b'b' + i as u8) as char),
                    path: path.clone(),
                    fs: "ext4".into(),
                })
                .collect(),
            ready_ports: m
                .config
                .services
                .iter()
                .filter_map(|s| u16::try_from(s.internal_port).ok())
                .collect(),
            kill_timeout_ms: stop_timeout(m, None).as_millis() as u64,
            kill_signal: stop_signal(m, None),
            root_device: "/dev/vda".into(),
        }
    }

    /// The volumes a machine's config mounts, as (name, file, guest path).
    fn machine_volumes(
        &self,
        app: &str,
        m: &Machine,
    ) -> Result<Vec<(String, PathBuf, String)>, AgentError> {
        let all = self.inner.db.volumes(Some(app)).map_err(internal)?;
        let mut out = Vec::new();
        for mount in &m.config.mounts {
            let found = all.iter().find(|(_, v, _)| {
                (!mount.volume.is_empty() && v.id == mount.volume)
                    || (mount.volume.is_empty() && v.name == mount.name)
            });
            match found {
                Some((_, v, path)) => out.push((v.name.clone(), path.clone(), mount.path.clone())),
                None => {
                    return Err(AgentError::Invalid {
                        field: "config.mounts".into(),
                        message: format!(
                            "volume {:?} does not exist on host {}",
                            if mount.volume.is_empty() {
                                &mount.name
                            } else {
                                &mount.volume
                            },
                            self.cfg().host_id
                        ),
                    });
                }
            }
        }
        Ok(out)
    }

    fn allocate_forwards(
        &self,
        m: &Machine,
        old: &[(u16, u16)],
    ) -> Result<Vec<(u16, u16)>, AgentError> {
        let mut out = Vec::new();
        let ports = m
            .config
            .services
            .iter()
            .map(|s| s.internal_port)
            .chain(m.config.checks.values().filter_map(|c| c.port));
        for port in ports {
            let Ok(guest) = u16::try_from(port) else {
                continue;
            };
            if out.iter().any(|(g, _)| *g == guest) {
                continue;
            }
            if let Some((_, host)) = old.iter().find(|(g, _)| *g == guest) {
                out.push((guest, *host));
                continue;
            }
            let listener = std::net::TcpListener::bind((self.cfg().forward_addr.as_str(), 0))
                .map_err(|e| {
                    internal(format!("no free port on {}: {e}", self.cfg().forward_addr))
                })?;
            let port = listener.local_addr().map_err(internal)?.port();
            out.push((guest, port));
        }
        Ok(out)
    }

    fn vm_spec(
        &self,
        m: &Machine,
        run: &RunConfig,
        rootfs: &Path,
        volumes: &[(String, PathBuf, String)],
        forwards: &[(u16, u16)],
        net: Option<&crate::net::MachineNet>,
    ) -> VmSpec {
        let guest = m.config.guest.clone().unwrap_or_default();
        VmSpec {
            dir: self.machine_dir(&m.id),
            kernel_dir: self.cfg().kernel_dir.clone(),
            init_bin: self.cfg().init_bin.clone(),
            cache_dir: self.cfg().data_dir.join("kernel-cache"),
            memory_mb: guest_memory(m),
            vcpus: guest.cpus.max(1) as u32,
            root_base: rootfs.to_path_buf(),
            volumes: volumes.iter().map(|(_, p, _)| p.clone()).collect(),
            network: match net {
                Some(n) => VmNetwork::Tap {
                    ifname: n.tap.clone(),
                    mac: n.mac.clone(),
                },
                None => VmNetwork::User {
                    forwards: forwards
                        .iter()
                        .map(|(guest, host)| PortForward {
                            host_addr: self.cfg().forward_addr.clone(),
                            host_port: *host,
                            guest_port: *guest,
                        })
                        .collect(),
                },
            },
            run_json: serde_json::to_vec(run).unwrap_or_default(),
            accel: self.cfg().accel,
            tcg_tb_size_mb: self.cfg().tcg_tb_size_mb,
        }
    }

    /// Boots a machine (fresh, or from its suspend file) and starts its supervisor.
    /// Called with the machine's lock held.
    async fn boot(&self, app: &str, id: &str, source: &str) -> Result<Machine, AgentError> {
        let (mut m, mut extra) = self.load(app, id)?;
        self.check_capacity(&m)?;
        let resume_from = self.machine_dir(id).join(aloft_vmm::VmFiles::STATE);
        let mut resuming = m.state == MachineState::Suspended && resume_from.exists();
        self.inner.db.begin_op(id, "start", "").map_err(internal)?;
        m.state = MachineState::Starting;
        extra.stop_requested = false;
        extra.restart_pending = false;
        // Check results belong to one boot of one version: start from none.
        if let Ok(mut c) = self.inner.checks.lock() {
            c.remove(id);
        }
        self.save(app, &mut m, &extra).await?;
        fault_point("start", 0);

        let result = async {
            let image = self.resolve_image(&m.config.image).await?;
            extra.image_digest = image.digest.clone();
            self.inner.db.op_step(id, 1).map_err(internal)?;
            fault_point("start", 1);
            let volumes = self.machine_volumes(app, &m)?;
            extra.forwards = self.allocate_forwards(&m, &extra.forwards)?;
            if self.inner.tap_network {
                if extra.net_slot.is_none() {
                    extra.net_slot = Some(self.allocate_slot(id)?);
                    self.inner
                        .db
                        .put_machine(app, &m, &extra)
                        .map_err(internal)?;
                }
                if let Some(n) = self.machine_net(&extra) {
                    crate::net::machine_up(&self.cfg().host_id, &n).map_err(internal)?;
                }
            }
            let net = self.machine_net(&extra);
            let run = self.run_config(app, &m, &extra, &image, &volumes);
            let spec_with = |forwards: &[(u16, u16)]| {
                self.vm_spec(&m, &run, &image.rootfs, &volumes, forwards, net.as_ref())
            };
            let mut spec = spec_with(&extra.forwards);
            self.inner.vmm.prepare(&spec).await.map_err(internal)?;
            // Persist the forwards and digest before QEMU uses them (recovery after
            // step 3 keeps this VM).
            self.inner
                .db
                .put_machine(app, &m, &extra)
                .map_err(internal)?;
            self.inner.db.op_step(id, 2).map_err(internal)?;
            fault_point("start", 2);
            // Start (or resume) until one works. Two failures start again:
            // - a forwarded host port chosen free but taken before QEMU bound it (e.g. as
            //   another connection's local port): new ports;
            // - a suspend file QEMU cannot load (damaged, or written for another device
            //   layout by an older aloft), at start or while loading: it must not strand
            //   the machine, so it boots fresh from its disk instead, as Fly does.
            let mut port_retries = 0;
            let vm: Arc<dyn Vm> = loop {
                let started = self
                    .inner
                    .vmm
                    .start(&spec, resuming.then_some(resume_from.as_path()))
                    .await;
                let failed = match started {
                    Ok(vm) if !resuming => break Arc::from(vm),
                    Ok(vm) => match vm.finish_resume().await {
                        Ok(()) => {
                            let _ = std::fs::remove_file(&resume_from);
                            break Arc::from(vm);
                        }
                        Err(e) => {
                            vm.kill();
                            e
                        }
                    },
                    Err(e) => e,
                };
                if failed.is_host_forward_taken() && port_retries < FORWARD_RETRIES {
                    port_retries += 1;
                    self.system_log(id, &format!("{failed}; starting again with new host ports"));
                    extra.forwards = self.allocate_forwards(&m, &[])?;
                    spec = spec_with(&extra.forwards);
                    self.inner
                        .db
                        .put_machine(app, &m, &extra)
                        .map_err(internal)?;
                } else if resuming {
                    self.discard_suspend_file(id, &resume_from, &failed);
                    resuming = false;
                } else {
                    return Err(internal(failed));
                }
            };
            self.inner.db.op_step(id, 3).map_err(internal)?;
            fault_point("start", 3);
            let channel = match GuestChannel::connect(vm.ctl_socket(), BOOT_TIMEOUT).await {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    let failure = vm.boot_failure();
                    let tail = vm.console_tail(15);
                    vm.kill();
                    return Err(AgentError::Internal(match failure {
                        Some(panic) => format!("machine {id} did not come up: {panic}"),
                        None => format!("machine {id} did not come up: {e}\nconsole:\n{tail}"),
                    }));
                }
            };
            // A machine with services counts as started once its app listens (the guest
            // reports it), so that the proxy never sends it requests too early.
            if !m.config.services.is_empty() && !resuming {
                match channel.wait_ready(READY_TIMEOUT).await {
                    Ok(_) => {}
                    Err(aloft_vmm::channel::ChannelError::Timeout { .. }) => {
                        self.system_log(
                            id,
                            "the app did not listen on a service port in time; published anyway",
                        );
                    }
                    Err(e) => {
                        let tail = vm.console_tail(15);
                        vm.kill();
                        return Err(AgentError::Internal(format!(
                            "machine {id}: the app ended before it listened: {e}\nconsole:\n{tail}"
                        )));
                    }
                }
            }
            Ok::<_, AgentError>((vm, channel, image))
        }
        .await;

        match result {
            Ok((vm, channel, image)) => {
                m.state = MachineState::Started;
                m.image_ref = Some(image_ref(&m.config.image, &image.digest));
                self.save(app, &mut m, &extra).await?;
                self.event(
                    id,
                    if resuming { "resume" } else { "start" },
                    "started",
                    source,
                    None,
                );
                self.attach_runtime(app, id, vm, Some(channel)).await;
                self.inner.db.end_op(id).map_err(internal)?;
                Ok(m)
            }
            Err(e) => {
                m.state = MachineState::Stopped;
                self.save(app, &mut m, &extra).await?;
                self.event(
                    id,
                    "start",
                    "failed",
                    source,
                    Some(serde_json::json!({"error": e.to_string()})),
                );
                self.system_log(id, &format!("start failed: {e}"));
                self.inner.db.end_op(id).map_err(internal)?;
                Err(e)
            }
        }
    }

    async fn attach_runtime(
        &self,
        app: &str,
        id: &str,
        vm: Arc<dyn Vm>,
        channel: Option<Arc<GuestChannel>>,
    ) {
        let agent = self.clone();
        let (app_s, id_s) = (app.to_string(), id.to_string());
        let (vm2, ch2) = (vm.clone(), channel.clone());
        let supervisor = tokio::spawn(agent.supervise_boxed(app_s, id_s, vm2, ch2));
        let mut rt = self.inner.runtimes.lock().await;
        rt.insert(
            id.to_string(),
            Runtime {
                vm,
                channel,
                supervisor,
            },
        );
    }

    /// [`Agent::supervise`] behind a named type: boot → supervise → restart → boot is
    /// a cycle the compiler cannot prove `Send` through opaque futures.
    fn supervise_boxed(
        self,
        app: String,
        id: String,
        vm: Arc<dyn Vm>,
        channel: Option<Arc<GuestChannel>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(self.supervise(app, id, vm, channel))
    }

    /// Watches one VM: stores its logs, and when it ends applies the restart policy.
    async fn supervise(
        self,
        app: String,
        id: String,
        vm: Arc<dyn Vm>,
        channel: Option<Arc<GuestChannel>>,
    ) {
        let mut events = channel.as_ref().map(|c| c.events());
        let mut exit: Option<(Option<i32>, Option<i32>, bool)> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                msg = async {
                    match events.as_mut() {
                        Some(rx) => loop {
                            match rx.recv().await {
                                Ok(m) => break Some(m),
                                // A log flood outran us: skip what was lost, keep going.
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                                Err(tokio::sync::broadcast::error::RecvError::Closed) => break None,
                            }
                        },
                        None => std::future::pending().await,
                    }
                } => {
                    match msg {
                        Some(guest::GuestMessage::Log { stream, line, .. }) => {
                            let s = match stream { guest::Stream::Stdout => "stdout", guest::Stream::Stderr => "stderr" };
                            let _ = self.inner.db.add_log(&id, now_ms(), s, &line);
                        }
                        Some(guest::GuestMessage::Exit { code, signal, oom }) => {
                            exit = Some((code, signal, oom));
                        }
                        Some(guest::GuestMessage::Error { message }) => {
                            self.system_log(&id, &format!("guest error: {message}"));
                        }
                        Some(_) => {}
                        None => { events = None; }
                    }
                }
                _ = tick.tick() => {
                    if vm.wait_exit(Duration::ZERO).await {
                        break;
                    }
                }
            }
        }
        // Drain what the guest said just before it powered off.
        if let Some(rx) = events.as_mut() {
            while let Ok(msg) = rx.try_recv() {
                if let guest::GuestMessage::Exit { code, signal, oom } = msg {
                    exit = Some((code, signal, oom));
                }
            }
        }
        // The state watch keeps the exit report even if the event stream lost it.
        if exit.is_none()
            && let Some(ch) = &channel
            && let Some(e) = ch.state().borrow().exit
        {
            exit = Some((e.code, e.signal, e.oom));
        }
        self.vm_ended(&app, &id, exit).await;
    }

    /// A VM ended on its own (the app exited, the guest crashed, QEMU died).
    async fn vm_ended(&self, app: &str, id: &str, exit: Option<(Option<i32>, Option<i32>, bool)>) {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        self.inner.runtimes.lock().await.remove(id);
        let Ok((mut m, mut extra)) = self.load(app, id) else {
            return;
        };
        if extra.stop_requested || m.state != MachineState::Started {
            return; // a stop, suspend or destroy in progress handles it
        }
        let (code, signal, oom) = exit.unwrap_or((None, None, false));
        let detail = serde_json::json!({"exit_event": {"exit_code": code, "signal": signal, "oom_killed": oom, "requested_stop": false}});
        self.event(id, "exit", "stopped", "flyd", Some(detail));
        self.system_log(
            id,
            &format!("machine exited: code {code:?}, signal {signal:?}, oom {oom}"),
        );
        let policy = m.config.restart.clone().unwrap_or_default();
        let failed = code != Some(0) || oom;
        let max = if policy.max_retries > 0 {
            policy.max_retries as u32
        } else {
            DEFAULT_MAX_RETRIES
        };
        let restart = match policy.policy.as_str() {
            "no" => false,
            "always" => true,
            _ => failed && extra.restarts < max,
        };
        if m.config.auto_destroy && !restart {
            drop(_held);
            let _ = self.destroy_inner(app, id, true, "flyd").await;
            return;
        }
        if !restart {
            m.state = if failed && policy.policy != "no" {
                MachineState::Failed
            } else {
                MachineState::Stopped
            };
            let _ = self.save(app, &mut m, &extra).await;
            if m.state == MachineState::Failed {
                self.system_log(
                    id,
                    &format!("restart policy gave up after {} restarts", extra.restarts),
                );
            }
            return;
        }
        extra.restarts += 1;
        m.state = MachineState::Stopped;
        let _ = self.save(app, &mut m, &extra).await;
        let backoff = Duration::from_millis(500 * (1u64 << extra.restarts.min(6)));
        self.event(id, "restart", "restarting", "flyd", Some(serde_json::json!({"attempt": extra.restarts, "backoff_ms": backoff.as_millis() as u64})));
        drop(_held);
        let agent = self.clone();
        let (app, id) = (app.to_string(), id.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            let lock = agent.lock_for(&id);
            let _held = lock.lock().await;
            if let Ok((m, extra)) = agent.load(&app, &id)
                && m.state == MachineState::Stopped
                && !extra.stop_requested
                && let Err(e) = agent.boot(&app, &id, "flyd").await
            {
                tracing::warn!(machine = %id, "restart failed: {e}");
            }
        });
    }

    /// Stops a running VM: the kill signal to the app, wait, power off, kill.
    async fn halt(&self, id: &str, m: &Machine, opts: &StopOptions) -> Result<(), AgentError> {
        let rt = self.inner.runtimes.lock().await.remove(id);
        let Some(rt) = rt else {
            return Ok(());
        };
        rt.supervisor.abort();
        // The machine is already published as no longer `started`: give the proxies a
        // moment to stop sending it requests and let those in flight finish.
        if !m.config.services.is_empty() {
            tokio::time::sleep(SERVICE_DRAIN).await;
        }
        let signal = signal_number(&opts.signal.clone().unwrap_or_else(|| stop_signal(m, None)))?;
        let timeout = stop_timeout(m, opts.timeout);
        if let Some(ch) = &rt.channel
            && let Ok(exit) = ch.stop(signal, timeout).await
        {
            self.event(id, "exit", "stopped", "user", Some(serde_json::json!({"exit_event": {"exit_code": exit.code, "signal": exit.signal, "oom_killed": exit.oom, "requested_stop": true}})));
        }
        if !rt.vm.wait_exit(Duration::from_secs(5)).await {
            let _ = rt.vm.powerdown().await;
            if !rt.vm.wait_exit(Duration::from_secs(5)).await {
                rt.vm.kill();
                rt.vm.wait_exit(Duration::from_secs(5)).await;
            }
        }
        Ok(())
    }

    async fn stop_inner(
        &self,
        app: &str,
        id: &str,
        opts: StopOptions,
        source: &str,
    ) -> Result<Machine, AgentError> {
        let (mut m, mut extra) = self.load(app, id)?;
        if !matches!(m.state, MachineState::Started | MachineState::Starting) {
            if matches!(
                m.state,
                MachineState::Stopped | MachineState::Created | MachineState::Failed
            ) {
                return Ok(m);
            }
            if m.state == MachineState::Suspended {
                let _ = std::fs::remove_file(self.machine_dir(id).join(aloft_vmm::VmFiles::STATE));
                m.state = MachineState::Stopped;
                self.save(app, &mut m, &extra).await?;
                return Ok(m);
            }
        }
        self.inner.db.begin_op(id, "stop", "").map_err(internal)?;
        extra.stop_requested = true;
        m.state = MachineState::Stopping;
        self.save(app, &mut m, &extra).await?;
        fault_point("stop", 0);
        self.halt(id, &m, &opts).await?;
        self.inner.db.op_step(id, 1).map_err(internal)?;
        fault_point("stop", 1);
        m.state = MachineState::Stopped;
        self.save(app, &mut m, &extra).await?;
        self.event(id, "stop", "stopped", source, None);
        self.inner.db.end_op(id).map_err(internal)?;
        Ok(m)
    }

    async fn destroy_inner(
        &self,
        app: &str,
        id: &str,
        force: bool,
        source: &str,
    ) -> Result<(), AgentError> {
        let (mut m, mut extra) = self.load(app, id)?;
        if !force && matches!(m.state, MachineState::Started | MachineState::Starting) {
            return Err(AgentError::Conflict(format!(
                "machine {id} is {}: stop it first or destroy with force",
                m.state
            )));
        }
        self.inner
            .db
            .begin_op(id, "destroy", "")
            .map_err(internal)?;
        extra.stop_requested = true;
        m.state = MachineState::Destroying;
        self.save(app, &mut m, &extra).await?;
        fault_point("destroy", 0);
        if let Some(rt) = self.inner.runtimes.lock().await.remove(id) {
            rt.supervisor.abort();
            rt.vm.kill();
            rt.vm.wait_exit(Duration::from_secs(5)).await;
        }
        self.kill_stray(id).await;
        self.inner.db.op_step(id, 1).map_err(internal)?;
        fault_point("destroy", 1);
        let _ = std::fs::remove_dir_all(self.machine_dir(id));
        if let Some(n) = self.machine_net(&extra) {
            crate::net::machine_down(&self.cfg().host_id, &n);
        }
        self.inner.db.op_step(id, 2).map_err(internal)?;
        fault_point("destroy", 2);
        self.event(id, "destroy", "destroyed", source, None);
        self.inner.db.delete_machine(id).map_err(internal)?;
        let _ = self
            .inner
            .store
            .delete(&catalog::machine_key(app, id), aloft_store::Expect::Any)
            .await;
        if let Ok(mut c) = self.inner.checks.lock() {
            c.remove(id);
        }
        self.inner.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Kills a QEMU left running in the machine's directory (after a crash).
    async fn kill_stray(&self, id: &str) {
        if let Ok(vm) = self.inner.vmm.attach(&self.machine_dir(id)).await {
            vm.kill();
            vm.wait_exit(Duration::from_secs(5)).await;
        } else if let Ok(pid) =
            std::fs::read_to_string(self.machine_dir(id).join(aloft_vmm::VmFiles::PIDFILE))
            && let Ok(pid) = pid.trim().parse::<i32>()
            && let Some(pid) = rustix::process::Pid::from_raw(pid)
        {
            // QMP busy or gone but the process may live: kill by pid.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }

    /// After a restart of the agent: re-attach to running VMs, finish interrupted work.
    async fn recover(&self) {
        let ops: HashMap<String, String> = self
            .inner
            .db
            .ops()
            .unwrap_or_default()
            .into_iter()
            .map(|o| (o.machine_id, o.kind))
            .collect();
        let machines = self.inner.db.list_machines(None).unwrap_or_default();
        // Each machine's recovery touches only that machine: they run side by side, so
        // re-attaching takes the slowest guest's channel handshake, not the sum of all.
        let mut set = tokio::task::JoinSet::new();
        for (app, m, extra) in machines {
            let op = ops.get(&m.id).cloned();
            let agent = self.clone();
            set.spawn(async move { agent.recover_machine(app, m, extra, op.as_deref()).await });
        }
        while set.join_next().await.is_some() {}
    }

    /// [`recover`](Self::recover) for one machine, given the operation that was under
    /// way on it when the agent went away.
    async fn recover_machine(
        &self,
        app: String,
        m: Machine,
        extra: MachineExtra,
        op: Option<&str>,
    ) {
        let id = m.id.clone();
        let dir = self.machine_dir(&id);
        let attached = self.inner.vmm.attach(&dir).await.ok();
        match (op, attached) {
            (Some("start"), None) => {
                // Interrupted before the VM came up: do the start again (a resume
                // stays a resume while its saved state is there).
                let _ = self.inner.db.end_op(&id);
                let mut m = m;
                let saved = dir.join(aloft_vmm::VmFiles::STATE);
                m.state = if saved.exists() {
                    MachineState::Suspended
                } else {
                    MachineState::Stopped
                };
                let _ = self.inner.db.put_machine(&app, &m, &extra);
                self.spawn_boot(&app, &id, "restarting an interrupted start");
            }
            (Some("update"), None) => {
                // The old VM is gone and the new config was not recorded: undo the
                // update by booting the machine as it was.
                let _ = self.inner.db.end_op(&id);
                let mut m = m;
                m.state = MachineState::Stopped;
                let _ = self.inner.db.put_machine(&app, &m, &extra);
                self.spawn_boot(&app, &id, "rolling back an interrupted update");
            }
            (Some("suspend"), Some(vm)) => {
                // The save did not finish: run the VM again as it was.
                let vm: Arc<dyn Vm> = Arc::from(vm);
                if vm.status().await.is_ok_and(|s| s != "running") {
                    let _ = vm.resume().await;
                }
                let _ = std::fs::remove_file(
                    dir.join(aloft_vmm::VmFiles::STATE)
                        .with_extension("partial"),
                );
                let ch = GuestChannel::connect(vm.ctl_socket(), Duration::from_secs(5))
                    .await
                    .ok()
                    .map(Arc::new);
                let mut m = m;
                let mut extra = extra;
                m.state = MachineState::Started;
                extra.stop_requested = false;
                let _ = self.save(&app, &mut m, &extra).await;
                let _ = self.inner.db.end_op(&id);
                self.attach_runtime(&app, &id, vm, ch).await;
            }
            (Some("destroy"), _) => {
                let _ = self.destroy_inner(&app, &id, true, "flyd").await;
            }
            (Some("stop"), Some(vm)) => {
                let vm: Arc<dyn Vm> = Arc::from(vm);
                let ch = GuestChannel::connect(vm.ctl_socket(), Duration::from_secs(5))
                    .await
                    .ok()
                    .map(Arc::new);
                self.attach_runtime(&app, &id, vm, ch).await;
                let _ = self
                    .stop_inner(&app, &id, StopOptions::default(), "flyd")
                    .await;
                if extra.restart_pending {
                    self.spawn_boot(&app, &id, "finishing an interrupted restart");
                }
            }
            (_, Some(vm))
                if matches!(
                    m.state,
                    MachineState::Started
                        | MachineState::Starting
                        | MachineState::Stopping
                        | MachineState::Replacing
                ) =>
            {
                // Still running: keep it, never restart it. A guest still booting
                // gets the whole boot time to answer.
                let vm: Arc<dyn Vm> = Arc::from(vm);
                // A volume snapshot cut short by the crash may have left it paused.
                if vm.status().await.is_ok_and(|s| s == "paused") {
                    let _ = vm.resume().await;
                }
                let wait = if m.state == MachineState::Starting {
                    BOOT_TIMEOUT
                } else {
                    Duration::from_secs(5)
                };
                let ch = GuestChannel::connect(vm.ctl_socket(), wait)
                    .await
                    .ok()
                    .map(Arc::new);
                let mut m = m;
                let mut extra = extra;
                if m.state != MachineState::Started {
                    m.state = MachineState::Started;
                    extra.stop_requested = false;
                    let _ = self.save(&app, &mut m, &extra).await;
                }
                let _ = self.inner.db.end_op(&id);
                self.attach_runtime(&app, &id, vm, ch).await;
            }
            (_, Some(vm)) => {
                // A VM for a machine that should not be running (stopped, suspended …).
                vm.kill();
                vm.wait_exit(Duration::from_secs(5)).await;
                let _ = self.inner.db.end_op(&id);
            }
            (_, None) => {
                let _ = self.inner.db.end_op(&id);
                match m.state {
                    MachineState::Started | MachineState::Starting => {
                        // It died while we were away: the restart policy decides.
                        let mut m2 = m.clone();
                        m2.state = MachineState::Started;
                        let mut e2 = extra.clone();
                        e2.stop_requested = false;
                        let _ = self.inner.db.put_machine(&app, &m2, &e2);
                        self.kill_stray(&id).await;
                        let agent = self.clone();
                        tokio::spawn(async move { agent.vm_ended(&app, &id, None).await });
                    }
                    MachineState::Stopping | MachineState::Replacing => {
                        let mut m = m;
                        m.state = MachineState::Stopped;
                        let _ = self.save(&app, &mut m, &extra).await;
                        if extra.restart_pending {
                            self.spawn_boot(&app, &id, "finishing an interrupted restart");
                        }
                    }
                    MachineState::Stopped if extra.restart_pending => {
                        self.spawn_boot(&app, &id, "finishing an interrupted restart");
                    }
                    MachineState::Suspending => {
                        let state = dir.join(aloft_vmm::VmFiles::STATE);
                        let mut m = m;
                        m.state = if state.exists() {
                            MachineState::Suspended
                        } else {
                            MachineState::Stopped
                        };
                        let _ = self.save(&app, &mut m, &extra).await;
                    }
                    _ => self.publish(&app, &m, &extra).await,
                }
            }
        }
    }

    fn spawn_background(&self) {
        // Host heartbeat under a lease: the record vanishes if this agent dies.
        let agent = self.clone();
        tokio::spawn(async move {
            let mut lease = None;
            loop {
                if lease.is_none() {
                    lease = agent.inner.store.grant_lease(HEARTBEAT_TTL).await.ok();
                }
                if let Some(l) = lease {
                    let (mem, cpus, count) = agent.committed().unwrap_or((0, 0, 0));
                    let rec = HostRecord {
                        schema: catalog::SCHEMA_VERSION,
                        id: agent.cfg().host_id.clone(),
                        region: agent.cfg().region.clone(),
                        address: String::new(),
                        memory_mb_total: agent.cfg().memory_mb_total,
                        memory_mb_committed: mem,
                        cpus_total: agent.cfg().cpus_total,
                        cpus_committed: cpus,
                        machines: count,
                        updated_at: rfc3339(now_ms()),
                    };
                    let key = catalog::host_key(&agent.cfg().host_id);
                    let value = serde_json::to_vec(&rec).unwrap_or_default();
                    let ok = agent.inner.store.keep_alive(l).await.is_ok()
                        && agent
                            .inner
                            .store
                            .put_with_lease(&key, value, l)
                            .await
                            .is_ok();
                    if !ok {
                        lease = None;
                    }
                }
                tokio::time::sleep(HEARTBEAT_TTL / 3).await;
            }
        });
        // Log retention.
        let agent = self.clone();
        tokio::spawn(async move {
            loop {
                let _ = agent.inner.db.prune_logs(now_ms() - 7 * 86_400_000);
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        });
        // Health checks.
        let agent = self.clone();
        tokio::spawn(async move { crate::health::run(agent).await });
    }

    /// Started machines with their app and forwards, for the health checker.
    pub(crate) fn started_machines(&self) -> Vec<(String, Machine, MachineExtra)> {
        self.inner
            .db
            .list_machines(None)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, m, _)| m.state == MachineState::Started)
            .collect()
    }

    /// Records check results; republishes the machine when they change.
    pub(crate) async fn set_checks(&self, app: &str, id: &str, results: Vec<CheckStatus>) {
        let changed = {
            let mut c = match self.inner.checks.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            let old = c.get(id);
            let same = old.is_some_and(|o| {
                o.len() == results.len()
                    && o.iter()
                        .zip(&results)
                        .all(|(a, b)| a.name == b.name && a.status == b.status)
            });
            c.insert(id.to_string(), results);
            !same
        };
        if changed && let Ok((m, extra)) = self.load(app, id) {
            self.inner.changes.send_modify(|n| *n += 1);
            self.publish(app, &m, &extra).await;
        }
    }

    /// The guest channel of a running machine.
    async fn channel(&self, id: &str) -> Result<Arc<GuestChannel>, AgentError> {
        let rt = self.inner.runtimes.lock().await;
        rt.get(id)
            .and_then(|r| r.channel.clone())
            .ok_or_else(|| AgentError::Conflict(format!("machine {id} is not running")))
    }

    /// How many VMs this agent supervises right now.
    pub async fn running_count(&self) -> usize {
        self.inner.runtimes.lock().await.len()
    }

    /// Boots a machine in the background under its lock (recovery work).
    fn spawn_boot(&self, app: &str, id: &str, why: &'static str) {
        let agent = self.clone();
        let (app, id) = (app.to_string(), id.to_string());
        tokio::spawn(async move {
            let lock = agent.lock_for(&id);
            let _held = lock.lock().await;
            if let Err(e) = agent.boot(&app, &id, "flyd").await {
                tracing::warn!(machine = %id, "{why} failed: {e}");
            }
        });
    }

    /// Stops every running machine gracefully, in parallel (for `aloft dev` exiting).
    pub async fn stop_all(&self) {
        let mut set = tokio::task::JoinSet::new();
        for (app, m, _) in self.started_machines() {
            let agent = self.clone();
            set.spawn(async move {
                let lock = agent.lock_for(&m.id);
                let _held = lock.lock().await;
                let _ = agent
                    .stop_inner(&app, &m.id, StopOptions::default(), "flyd")
                    .await;
            });
        }
        while set.join_next().await.is_some() {}
    }

    /// Stops supervising without touching the VMs (they keep running; a new agent
    /// re-attaches). For tests and graceful agent restarts.
    pub async fn detach_all(&self) {
        for (_, rt) in self.inner.runtimes.lock().await.drain() {
            rt.supervisor.abort();
        }
    }
}

fn guest_memory(m: &Machine) -> u32 {
    let mb = m
        .config
        .guest
        .as_ref()
        .map_or(256, |g| if g.memory_mb > 0 { g.memory_mb } else { 256 });
    u32::try_from(mb).unwrap_or(u32::MAX)
}

fn stop_signal(m: &Machine, asked: Option<&str>) -> String {
    asked
        .map(str::to_string)
        .or_else(|| m.config.stop_config.as_ref().and_then(|s| s.signal.clone()))
        .unwrap_or_else(|| "SIGINT".into())
}

fn stop_timeout(m: &Machine, asked: Option<Duration>) -> Duration {
    asked
        .or_else(|| {
            m.config
                .stop_config
                .as_ref()
                .and_then(|s| s.timeout.as_deref())
                .and_then(|t| aloft_types::appconfig::parse_go_duration(t).ok())
        })
        .unwrap_or(Duration::from_secs(5))
}

fn image_ref(reference: &str, digest: &str) -> ImageRef {
    let (repo, tag) = match reference.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, t),
        _ => (reference, "latest"),
    };
    let (registry, repository) = match repo.split_once('/') {
        Some((h, rest)) if h.contains('.') || h.contains(':') || h == "localhost" => (h, rest),
        _ => ("docker.io", repo),
    };
    ImageRef {
        registry: registry.to_string(),
        repository: repository.to_string(),
        tag: tag.to_string(),
        digest: digest.to_string(),
        labels: BTreeMap::new(),
    }
}

#[async_trait::async_trait]
impl AgentApi for Agent {
    fn host_id(&self) -> &str {
        &self.cfg().host_id
    }

    fn region(&self) -> &str {
        &self.cfg().region
    }

    async fn create_machine(&self, req: CreateMachine) -> Result<Machine, AgentError> {
        if let Some(r) = &req.region
            && !r.is_empty()
            && r != &self.cfg().region
        {
            return Err(AgentError::Invalid {
                field: "region".into(),
                message: format!(
                    "host {} is in region {}, not {r}",
                    self.cfg().host_id,
                    self.cfg().region
                ),
            });
        }
        if let Some(g) = &req.config.guest
            && g.memory_mb > 0
            && g.memory_mb < i64::from(aloft_vmm::qemu::MIN_MEMORY_MB)
        {
            return Err(AgentError::Invalid {
                field: "config.guest.memory_mb".into(),
                message: format!(
                    "{} MB is below the minimum of {} MB",
                    g.memory_mb,
                    aloft_vmm::qemu::MIN_MEMORY_MB
                ),
            });
        }
        // The image must resolve before anything is recorded.
        self.resolve_image(&req.config.image).await?;
        let id = random_hex(7);
        let now = rfc3339(now_ms());
        let mut m = Machine {
            id: id.clone(),
            name: req
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("m-{id}")),
            state: MachineState::Created,
            region: self.cfg().region.clone(),
            instance_id: new_version(),
            private_ip: "10.0.2.15".into(),
            config: req.config.clone(),
            image_ref: None,
            created_at: now.clone(),
            updated_at: now,
            events: vec![],
            checks: vec![],
            host_status: "ok".into(),
            nonce: None,
            cordoned: false,
        };
        self.machine_volumes(&req.app, &m)?;
        if !req.skip_launch {
            self.check_capacity(&m)?;
        }
        let extra = MachineExtra {
            secrets: req.secrets.clone(),
            org: if req.org.is_empty() {
                "personal".into()
            } else {
                req.org.clone()
            },
            ..Default::default()
        };
        let lock = self.lock_for(&id);
        let _held = lock.lock().await;
        self.save(&req.app, &mut m, &extra).await?;
        self.event(&id, "launch", "created", "user", None);
        if let Some(ttl) = req.lease_ttl {
            let lease = self.new_lease(
                &id,
                &m,
                Duration::from_secs(ttl),
                "created with the machine",
            )?;
            m.nonce = Some(lease.nonce);
        }
        if req.skip_launch {
            return Ok(m);
        }
        let nonce = m.nonce.clone();
        let mut started = self.boot(&req.app, &id, "user").await?;
        started.nonce = nonce;
        Ok(started)
    }

    async fn get_machine(&self, app: &str, id: &str) -> Result<Machine, AgentError> {
        let (mut m, _) = self.load(app, id)?;
        m.checks = self.check_results(id);
        m.events = self.inner.db.events(id).map_err(internal)?;
        Ok(m)
    }

    async fn list_machines(&self, app: &str) -> Result<Vec<Machine>, AgentError> {
        Ok(self
            .inner
            .db
            .list_machines(Some(app))
            .map_err(internal)?
            .into_iter()
            .map(|(_, mut m, _)| {
                m.checks = self.check_results(&m.id);
                m
            })
            .collect())
    }

    async fn update_machine(
        &self,
        app: &str,
        id: &str,
        req: UpdateMachine,
        lease_nonce: Option<&str>,
    ) -> Result<Machine, AgentError> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        self.check_lease(id, lease_nonce)?;
        let (mut m, mut extra) = self.load(app, id)?;
        if let Some(v) = &req.current_version
            && v != &m.instance_id
        {
            return Err(AgentError::Conflict(format!(
                "machine {id} is at version {}, not {v}",
                m.instance_id
            )));
        }
        self.resolve_image(&req.config.image).await?;
        let probe = Machine {
            config: req.config.clone(),
            ..m.clone()
        };
        self.machine_volumes(app, &probe)?;
        let was_running = matches!(m.state, MachineState::Started | MachineState::Starting);
        if was_running {
            self.inner.db.begin_op(id, "update", "").map_err(internal)?;
            extra.stop_requested = true;
            m.state = MachineState::Replacing;
            self.save(app, &mut m, &extra).await?;
            fault_point("update", 0);
            self.halt(id, &m, &StopOptions::default()).await?;
            self.inner.db.op_step(id, 1).map_err(internal)?;
            fault_point("update", 1);
        }
        let previous = m.instance_id.clone();
        m.config = req.config;
        if let Some(name) = req.name.filter(|n| !n.is_empty()) {
            m.name = name;
        }
        m.instance_id = new_version();
        extra.secrets = req.secrets;
        extra.restarts = 0;
        m.state = MachineState::Stopped;
        // A new root overlay: the new image (or config) starts from a clean disk.
        let _ = std::fs::remove_file(self.machine_dir(id).join(aloft_vmm::VmFiles::ROOT));
        self.save(app, &mut m, &extra).await?;
        self.event(
            id,
            "update",
            "replaced",
            "user",
            Some(serde_json::json!({"previous_version": previous})),
        );
        self.inner.db.end_op(id).map_err(internal)?;
        if req.skip_launch && !was_running {
            return Ok(m);
        }
        self.boot(app, id, "user").await
    }

    async fn start_machine(
        &self,
        app: &str,
        id: &str,
        lease_nonce: Option<&str>,
    ) -> Result<Machine, AgentError> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        self.check_lease(id, lease_nonce)?;
        let (m, mut extra) = self.load(app, id)?;
        match m.state {
            MachineState::Started | MachineState::Starting => Ok(m),
            MachineState::Destroying | MachineState::Destroyed => {
                Err(AgentError::Conflict(format!("machine {id} is {}", m.state)))
            }
            _ => {
                extra.restarts = 0;
                let mut m2 = m.clone();
                self.save(app, &mut m2, &extra).await?;
                self.boot(app, id, "user").await
            }
        }
    }

    async fn stop_machine(
        &self,
        app: &str,
        id: &str,
        opts: StopOptions,
        lease_nonce: Option<&str>,
    ) -> Result<Machine, AgentError> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        self.check_lease(id, lease_nonce)?;
        self.stop_inner(app, id, opts, "user").await
    }

    async fn restart_machine(
        &self,
        app: &str,
        id: &str,
        opts: StopOptions,
        lease_nonce: Option<&str>,
    ) -> Result<Machine, AgentError> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        self.check_lease(id, lease_nonce)?;
        let (m, mut extra) = self.load(app, id)?;
        extra.restart_pending = true;
        self.inner
            .db
            .put_machine(app, &m, &extra)
            .map_err(internal)?;
        self.stop_inner(app, id, opts, "user").await?;
        self.event(id, "restart", "restarting", "user", None);
        self.boot(app, id, "user").await
    }

    async fn suspend_machine(
        &self,
        app: &str,
        id: &str,
        lease_nonce: Option<&str>,
    ) -> Result<Machine, AgentError> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        self.check_lease(id, lease_nonce)?;
        let (mut m, mut extra) = self.load(app, id)?;
        if m.state != MachineState::Started {
            return Err(AgentError::Conflict(format!(
                "machine {id} is {}, only a started machine can be suspended",
                m.state
            )));
        }
        let rt = self.inner.runtimes.lock().await.remove(id);
        let Some(rt) = rt else {
            return Err(AgentError::Conflict(format!(
                "machine {id} has no running VM"
            )));
        };
        rt.supervisor.abort();
        self.inner
            .db
            .begin_op(id, "suspend", "")
            .map_err(internal)?;
        extra.stop_requested = true;
        m.state = MachineState::Suspending;
        self.save(app, &mut m, &extra).await?;
        fault_point("suspend", 0);
        let state = self.machine_dir(id).join(aloft_vmm::VmFiles::STATE);
        match rt.vm.suspend(&state).await {
            Ok(()) => {
                m.state = MachineState::Suspended;
                self.save(app, &mut m, &extra).await?;
                self.event(id, "suspend", "suspended", "user", None);
                self.inner.db.end_op(id).map_err(internal)?;
                Ok(m)
            }
            Err(e) => {
                // Still running: keep supervising it.
                m.state = MachineState::Started;
                extra.stop_requested = false;
                self.save(app, &mut m, &extra).await?;
                self.inner.db.end_op(id).map_err(internal)?;
                let (vm, ch) = (rt.vm.clone(), rt.channel.clone());
                drop(rt);
                self.attach_runtime(app, id, vm, ch).await;
                Err(internal(e))
            }
        }
    }

    async fn signal_machine(&self, app: &str, id: &str, signal: &str) -> Result<(), AgentError> {
        self.load(app, id)?;
        let n = signal_number(signal)?;
        self.channel(id).await?.signal(n).map_err(internal)
    }

    async fn destroy_machine(
        &self,
        app: &str,
        id: &str,
        force: bool,
        lease_nonce: Option<&str>,
    ) -> Result<(), AgentError> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        self.check_lease(id, lease_nonce)?;
        self.destroy_inner(app, id, force, "user").await
    }

    async fn cordon_machine(&self, app: &str, id: &str, cordoned: bool) -> Result<(), AgentError> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let (mut m, mut extra) = self.load(app, id)?;
        extra.cordoned = cordoned;
        self.save(app, &mut m, &extra).await
    }

    async fn wait_machine(
        &self,
        app: &str,
        id: &str,
        wait: WaitFor,
    ) -> Result<MachineState, AgentError> {
        let mut rx = self.inner.changes.subscribe();
        let deadline = tokio::time::Instant::now() + wait.timeout;
        loop {
            match self.inner.db.get_machine(id).map_err(internal)? {
                Some((a, m, _)) if a == app => {
                    let version_ok = wait
                        .instance_id
                        .as_deref()
                        .is_none_or(|v| v == m.instance_id);
                    let state_ok = wait.states.is_empty()
                        || wait.states.iter().any(|s| {
                            s == m.state.as_str() || (s == "settled" && m.state.is_settled())
                        });
                    if version_ok && state_ok {
                        return Ok(m.state);
                    }
                }
                _ if wait.states.iter().any(|s| s == "destroyed") => {
                    return Ok(MachineState::Destroyed);
                }
                _ => return Err(not_found(id)),
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(AgentError::WaitTimeout {
                    id: id.to_string(),
                    wanted: wait.states.join("|"),
                });
            }
        }
    }

    async fn machine_events(&self, app: &str, id: &str) -> Result<Vec<MachineEvent>, AgentError> {
        self.load(app, id)?;
        self.inner.db.events(id).map_err(internal)
    }

    async fn acquire_lease(
        &self,
        app: &str,
        id: &str,
        ttl: Duration,
        description: &str,
        existing_nonce: Option<&str>,
    ) -> Result<Lease, AgentError> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let (m, _) = self.load(app, id)?;
        if let Some(current) = self.inner.db.lease(id).map_err(internal)?
            && current.expires_at * 1000 > now_ms()
        {
            if existing_nonce == Some(current.nonce.as_str()) {
                let mut refreshed = current;
                refreshed.expires_at = (now_ms() / 1000) + ttl.as_secs() as i64;
                self.inner
                    .db
                    .put_lease(id, Some(&refreshed))
                    .map_err(internal)?;
                return Ok(refreshed);
            }
            return Err(AgentError::Conflict(format!(
                "machine {id} already has a lease held by {:?} until {}",
                current.owner,
                rfc3339(current.expires_at * 1000)
            )));
        }
        self.new_lease(id, &m, ttl, description)
    }

    async fn get_lease(&self, app: &str, id: &str) -> Result<Lease, AgentError> {
        self.load(app, id)?;
        match self.inner.db.lease(id).map_err(internal)? {
            Some(l) if l.expires_at * 1000 > now_ms() => Ok(l),
            _ => Err(AgentError::NotFound {
                kind: "lease on machine",
                id: id.to_string(),
            }),
        }
    }

    async fn release_lease(&self, app: &str, id: &str, nonce: &str) -> Result<(), AgentError> {
        self.load(app, id)?;
        match self.inner.db.lease(id).map_err(internal)? {
            Some(l) if l.nonce == nonce => self.inner.db.put_lease(id, None).map_err(internal),
            Some(l) if l.expires_at * 1000 > now_ms() => Err(AgentError::Conflict(format!(
                "lease on machine {id} has a different nonce"
            ))),
            _ => Ok(()),
        }
    }

    async fn exec(
        &self,
        app: &str,
        id: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput, AgentError> {
        self.load(app, id)?;
        if command.is_empty() {
            return Err(AgentError::Invalid {
                field: "command".into(),
                message: "empty command".into(),
            });
        }
        let ch = self.channel(id).await?;
        let req = aloft_vmm::channel::ExecRequest {
            cmd: command,
            ..Default::default()
        };
        let out = ch.exec(&req, timeout).await.map_err(|e| match e {
            aloft_vmm::channel::ChannelError::Timeout { .. } => AgentError::WaitTimeout {
                id: id.to_string(),
                wanted: "exec to finish".into(),
            },
            aloft_vmm::channel::ChannelError::ExecFailed { message, .. } => AgentError::Invalid {
                field: "command".into(),
                message,
            },
            other => internal(other),
        })?;
        Ok(ExecOutput {
            exit_code: out.code.unwrap_or(-1),
            exit_signal: out.signal.unwrap_or(0),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    async fn logs(
        &self,
        app: &str,
        id: &str,
        since_ms: Option<i64>,
    ) -> Result<Vec<LogLine>, AgentError> {
        self.load(app, id)?;
        Ok(self
            .inner
            .db
            .logs(id, since_ms.unwrap_or(0))
            .map_err(internal)?
            .into_iter()
            .map(|(ts, stream, message)| LogLine {
                machine_id: id.to_string(),
                region: self.cfg().region.clone(),
                timestamp: ts,
                stream,
                message,
            })
            .collect())
    }

    async fn metadata_get(
        &self,
        app: &str,
        id: &str,
    ) -> Result<BTreeMap<String, String>, AgentError> {
        let (_, extra) = self.load(app, id)?;
        Ok(extra.metadata)
    }

    async fn metadata_set(
        &self,
        app: &str,
        id: &str,
        key: &str,
        value: &str,
    ) -> Result<(), AgentError> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let (mut m, mut extra) = self.load(app, id)?;
        extra.metadata.insert(key.to_string(), value.to_string());
        self.save(app, &mut m, &extra).await?;
        if let Ok(ch) = self.channel(id).await {
            let _ = ch.metadata_set(key, value, Duration::from_secs(5)).await;
        }
        Ok(())
    }

    async fn metadata_delete(&self, app: &str, id: &str, key: &str) -> Result<(), AgentError> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let (mut m, mut extra) = self.load(app, id)?;
        extra.metadata.remove(key);
        self.save(app, &mut m, &extra).await
    }

    async fn create_volume(&self, req: CreateVolume) -> Result<Volume, AgentError> {
        crate::volumes::create(self, req).await
    }

    async fn list_volumes(&self, app: &str) -> Result<Vec<Volume>, AgentError> {
        Ok(self
            .inner
            .db
            .volumes(Some(app))
            .map_err(internal)?
            .into_iter()
            .map(|(_, v, _)| v)
            .collect())
    }

    async fn get_volume(&self, app: &str, id: &str) -> Result<Volume, AgentError> {
        self.volume(app, id).map(|(v, _)| v)
    }

    async fn extend_volume(&self, app: &str, id: &str, size_gb: i64) -> Result<Volume, AgentError> {
        crate::volumes::extend(self, app, id, size_gb).await
    }

    async fn destroy_volume(&self, app: &str, id: &str) -> Result<Volume, AgentError> {
        crate::volumes::destroy(self, app, id).await
    }

    async fn machine_ps(
        &self,
        app: &str,
        id: &str,
    ) -> Result<Vec<aloft_types::guest::ProcessStat>, AgentError> {
        self.load(app, id)?;
        let ch = self.channel(id).await?;
        Ok(guest_process_list(&ch, id).await?.0)
    }

    async fn get_memory(
        &self,
        app: &str,
        id: &str,
    ) -> Result<crate::api::MachineMemory, AgentError> {
        let (m, _) = self.load(app, id)?;
        let Some((vm, ch)) = self.running_vm(id).await else {
            return Ok(crate::api::MachineMemory {
                limit_mb: i64::from(guest_memory(&m)),
                available_mb: 0,
            });
        };
        let actual = vm.balloon_actual().await.map_err(internal)?;
        let available_kb = match ch {
            Some(ch) => guest_process_list(&ch, id).await?.1,
            None => 0,
        };
        Ok(crate::api::MachineMemory {
            limit_mb: (actual >> 20) as i64,
            available_mb: (available_kb / 1024) as i64,
        })
    }

    async fn set_memory_limit(
        &self,
        app: &str,
        id: &str,
        limit_mb: i64,
    ) -> Result<crate::api::MachineMemory, AgentError> {
        let (m, _) = self.load(app, id)?;
        let boot = i64::from(guest_memory(&m));
        if !(MIN_BALLOON_MB..=boot).contains(&limit_mb) {
            return Err(AgentError::Invalid {
                field: "limit_mb".into(),
                message: format!(
                    "{limit_mb} MB is not between {MIN_BALLOON_MB} MB and the machine's {boot} MB"
                ),
            });
        }
        let (vm, _) = self
            .running_vm(id)
            .await
            .ok_or_else(|| AgentError::Conflict(format!("machine {id} is not running")))?;
        let target = (limit_mb as u64) << 20;
        vm.set_balloon(target).await.map_err(internal)?;
        balloon_settle(vm.as_ref(), target).await?;
        self.get_memory(app, id).await
    }

    async fn reclaim_memory(&self, app: &str, id: &str, amount_mb: i64) -> Result<i64, AgentError> {
        self.load(app, id)?;
        if amount_mb <= 0 {
            return Err(AgentError::Invalid {
                field: "amount_mb".into(),
                message: format!("{amount_mb} MB: ask for a positive amount"),
            });
        }
        let (vm, _) = self
            .running_vm(id)
            .await
            .ok_or_else(|| AgentError::Conflict(format!("machine {id} is not running")))?;
        let before = vm.balloon_actual().await.map_err(internal)?;
        let target = before
            .saturating_sub((amount_mb as u64) << 20)
            .max((MIN_BALLOON_MB as u64) << 20);
        vm.set_balloon(target).await.map_err(internal)?;
        let inflated = balloon_settle(vm.as_ref(), target).await;
        // Give the guest its memory back; the pages it gave up stay with the host
        // until it touches them again.
        vm.set_balloon(before).await.map_err(internal)?;
        let after = inflated?;
        balloon_settle(vm.as_ref(), before).await?;
        let reclaimed = (before.saturating_sub(after) >> 20) as i64;
        self.event(
            id,
            "memory",
            "reclaimed",
            "user",
            Some(serde_json::json!({"requested_mb": amount_mb, "reclaimed_mb": reclaimed})),
        );
        Ok(reclaimed)
    }

    async fn create_volume_snapshot(
        &self,
        app: &str,
        volume_id: &str,
    ) -> Result<aloft_types::machine::VolumeSnapshot, AgentError> {
        crate::volumes::snapshot(self, app, volume_id).await
    }

    async fn list_volume_snapshots(
        &self,
        app: &str,
        volume_id: &str,
    ) -> Result<Vec<aloft_types::machine::VolumeSnapshot>, AgentError> {
        crate::volumes::snapshots(self, app, volume_id).await
    }

    async fn console(
        &self,
        app: &str,
        id: &str,
        req: crate::api::ConsoleRequest,
    ) -> Result<crate::api::ConsoleSession, AgentError> {
        self.load(app, id)?;
        if req.command.is_empty() {
            return Err(AgentError::Invalid {
                field: "command".into(),
                message: "empty command".into(),
            });
        }
        let ch = self.channel(id).await?;
        start_console(&ch, id, req).await
    }
}

/// How long a console command may take to start in the guest.
const CONSOLE_START: Duration = Duration::from_secs(15);
/// How long a console command may outlive its client after the hang-up.
const CONSOLE_HANGUP_GRACE: Duration = Duration::from_secs(10);
/// Output items a console's client queue holds (each at most
/// [`CONSOLE_ITEM_BYTES`]).
pub(crate) const CONSOLE_OUTPUT_FRAMES: usize = 16;
/// Largest output item: consecutive output of one stream is merged up to this size.
const CONSOLE_ITEM_BYTES: usize = 256 * 1024;
/// Output bytes a console may hold back for a client that reads slower than the
/// command writes, beyond its full queue. The guest protocol has no flow control, so a
/// client that falls this far behind is told so and the command is hung up, rather
/// than the host buffering without end. Counted in bytes, not frames: a shell on a
/// pty writes a frame per keystroke, and a client a few milliseconds behind must not
/// be hung up for that.
const CONSOLE_BACKLOG_BYTES: usize = 4 * 1024 * 1024;

/// Console output waiting for room in the client's queue, consecutive output of one
/// stream merged into items of at most [`CONSOLE_ITEM_BYTES`].
#[derive(Default)]
struct ConsoleBacklog {
    items: std::collections::VecDeque<crate::api::ConsoleOutput>,
    bytes: usize,
}

impl ConsoleBacklog {
    fn data_len(item: &crate::api::ConsoleOutput) -> usize {
        use crate::api::ConsoleOutput;
        match item {
            ConsoleOutput::Stdout(d) | ConsoleOutput::Stderr(d) => d.len(),
            ConsoleOutput::Exit { .. } => 0,
        }
    }

    fn push(&mut self, item: crate::api::ConsoleOutput) {
        use crate::api::ConsoleOutput;
        let len = Self::data_len(&item);
        self.bytes += len;
        let merged = match (self.items.back_mut(), &item) {
            (Some(ConsoleOutput::Stdout(b)), ConsoleOutput::Stdout(d))
            | (Some(ConsoleOutput::Stderr(b)), ConsoleOutput::Stderr(d))
                if b.len() + d.len() <= CONSOLE_ITEM_BYTES =>
            {
                b.extend_from_slice(d);
                true
            }
            _ => false,
        };
        if !merged {
            self.items.push_back(item);
        }
    }

    fn pop(&mut self) -> Option<crate::api::ConsoleOutput> {
        let item = self.items.pop_front()?;
        self.bytes -= Self::data_len(&item);
        Some(item)
    }

    /// Moves into `out_tx` what it has room for.
    fn flush(&mut self, out_tx: &tokio::sync::mpsc::Sender<crate::api::ConsoleOutput>) {
        while !self.items.is_empty() {
            let Ok(permit) = out_tx.try_reserve() else {
                return;
            };
            if let Some(item) = self.pop() {
                permit.send(item);
            }
        }
    }
}

/// Queues `item` for the console's client; `false` when the client has fallen
/// [`CONSOLE_BACKLOG_BYTES`] behind: what was held back is dropped and a note saying
/// why takes its place. A client that is gone (receiver dropped) is not an overrun:
/// its hang-up arrives through the input side.
fn console_forward(
    out_tx: &tokio::sync::mpsc::Sender<crate::api::ConsoleOutput>,
    backlog: &mut ConsoleBacklog,
    id: &str,
    item: crate::api::ConsoleOutput,
) -> bool {
    if out_tx.is_closed() {
        *backlog = ConsoleBacklog::default();
        return true;
    }
    backlog.push(item);
    backlog.flush(out_tx);
    if backlog.bytes <= CONSOLE_BACKLOG_BYTES {
        return true;
    }
    let note = format!(
        "\r\naloft: console on machine {id}: the client fell more than {} MiB of output \
         behind the command; hanging it up\r\n",
        CONSOLE_BACKLOG_BYTES >> 20
    );
    *backlog = ConsoleBacklog::default();
    backlog.push(crate::api::ConsoleOutput::Stderr(note.into_bytes()));
    backlog.flush(out_tx);
    false
}

/// Starts `req` in the guest behind `ch` and pumps it in a task: the client's input to
/// the exec session, the session's events to the output channel, until the command
/// exits, the app (and with it the VM) ends, or the client has been gone too long.
async fn start_console(
    ch: &GuestChannel,
    id: &str,
    req: crate::api::ConsoleRequest,
) -> Result<crate::api::ConsoleSession, AgentError> {
    use crate::api::{ConsoleInput, ConsoleOutput, ConsoleSession};
    use aloft_types::guest::Stream;
    use aloft_vmm::channel::{ExecEvent, ExecRequest};

    let tty = req.tty;
    let mut s = ch
        .start_exec(&ExecRequest {
            cmd: req.command,
            env: req.env,
            stdin: Vec::new(),
            tty,
            rows: req.rows,
            cols: req.cols,
        })
        .map_err(internal)?;
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(CONSOLE_OUTPUT_FRAMES);
    let mut backlog = ConsoleBacklog::default();
    let output = |stream: Stream, data: Vec<u8>| match stream {
        Stream::Stdout => ConsoleOutput::Stdout(data),
        Stream::Stderr => ConsoleOutput::Stderr(data),
    };
    let started = async {
        loop {
            match s.next_event().await {
                Some(ExecEvent::Started { pid }) => return Ok(Some(pid)),
                Some(ExecEvent::Output { stream, data }) => {
                    // Before `Started` nobody reads yet; the backlog bounds it.
                    console_forward(&out_tx, &mut backlog, id, output(stream, data));
                }
                Some(ExecEvent::Exit {
                    error: Some(message),
                    ..
                }) => {
                    return Err(AgentError::Invalid {
                        field: "command".into(),
                        message,
                    });
                }
                Some(ExecEvent::Exit { code, signal, .. }) => {
                    backlog.push(ConsoleOutput::Exit { code, signal });
                    backlog.flush(&out_tx);
                    return Ok(None);
                }
                None => {
                    return Err(AgentError::Internal(format!(
                        "machine {id}: the guest channel closed before the console command started"
                    )));
                }
            }
        }
    };
    let pid = match tokio::time::timeout(CONSOLE_START, started).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(AgentError::WaitTimeout {
                id: id.to_string(),
                wanted: "running the console command".into(),
            });
        }
    };
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<ConsoleInput>(64);
    let mut state = ch.state();
    let machine = id.to_string();
    if pid.is_some() {
        tokio::spawn(async move {
            let mut hangup_deadline: Option<tokio::time::Instant> = None;
            let mut overrun = false;
            let mut exit = None;
            loop {
                let hangup = async {
                    match hangup_deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    permit = out_tx.reserve(), if !backlog.items.is_empty() => match permit {
                        Ok(permit) => {
                            if let Some(item) = backlog.pop() {
                                permit.send(item);
                            }
                        }
                        // The client is gone: its hang-up comes through the input side.
                        Err(_) => backlog = ConsoleBacklog::default(),
                    },
                    ev = s.next_event() => match ev {
                        Some(ExecEvent::Started { .. }) => {}
                        Some(ExecEvent::Output { stream, data }) => {
                            if !overrun && !console_forward(&out_tx, &mut backlog, &machine, output(stream, data)) {
                                // As if the client had left: it sees the note, then
                                // the close (no more output); the command is hung up.
                                overrun = true;
                                if hangup_deadline.is_none() {
                                    hangup_deadline = Some(tokio::time::Instant::now() + CONSOLE_HANGUP_GRACE);
                                    let sent = if tty { s.stdin(b"\x03\x04", false) } else { s.stdin(&[], true) };
                                    if sent.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        Some(ExecEvent::Exit { code, signal, error }) => {
                            if overrun {
                                break;
                            }
                            if let Some(e) = error {
                                console_forward(&out_tx, &mut backlog, &machine, ConsoleOutput::Stderr(format!("{e}\n").into_bytes()));
                            }
                            exit = Some(ConsoleOutput::Exit { code, signal });
                            break;
                        }
                        None => break,
                    },
                    input = in_rx.recv(), if hangup_deadline.is_none() => {
                        let sent = match input {
                            Some(ConsoleInput::Stdin(data)) => s.stdin(&data, false),
                            Some(ConsoleInput::Eof) => s.stdin(&[], true),
                            Some(ConsoleInput::Resize { rows, cols }) => s.resize(rows, cols),
                            None => {
                                // The client went away: end stdin, or on a pty type
                                // ^C ^D as a terminal hang-up would end a shell.
                                hangup_deadline = Some(tokio::time::Instant::now() + CONSOLE_HANGUP_GRACE);
                                if tty { s.stdin(b"\x03\x04", false) } else { s.stdin(&[], true) }
                            }
                        };
                        if sent.is_err() {
                            break;
                        }
                    },
                    _ = hangup => {
                        tracing::info!(machine = %machine, "console command still running after its client left; no longer following it");
                        break;
                    }
                    _ = state.wait_for(|st| st.exit.is_some()) => {
                        tracing::info!(machine = %machine, "the machine's app exited during a console session");
                        break;
                    }
                }
            }
            // The command is over, so waiting for room cannot grow anything; a client
            // that reads nothing at all is not waited for past the grace.
            if let Some(exit) = exit {
                backlog.push(exit);
            }
            let _ = tokio::time::timeout(CONSOLE_HANGUP_GRACE, async {
                while let Some(item) = backlog.pop() {
                    if out_tx.send(item).await.is_err() {
                        return;
                    }
                }
            })
            .await;
        });
    }
    Ok(ConsoleSession {
        pid: pid.unwrap_or(0),
        input: in_tx,
        output: out_rx,
    })
}

impl Agent {
    fn new_lease(
        &self,
        id: &str,
        m: &Machine,
        ttl: Duration,
        description: &str,
    ) -> Result<Lease, AgentError> {
        let lease = Lease {
            nonce: random_hex(8),
            expires_at: now_ms() / 1000 + ttl.as_secs().max(1) as i64,
            owner: "user".into(),
            description: description.to_string(),
            version: m.instance_id.clone(),
        };
        self.inner
            .db
            .put_lease(id, Some(&lease))
            .map_err(internal)?;
        Ok(lease)
    }

    pub(crate) fn volume(&self, app: &str, id: &str) -> Result<(Volume, PathBuf), AgentError> {
        self.inner
            .db
            .volumes(Some(app))
            .map_err(internal)?
            .into_iter()
            .find(|(_, v, _)| v.id == id)
            .map(|(_, v, p)| (v, p))
            .ok_or_else(|| AgentError::NotFound {
                kind: "volume",
                id: id.to_string(),
            })
    }

    pub(crate) fn db(&self) -> &AgentDb {
        &self.inner.db
    }

    pub(crate) fn data_dir(&self) -> &Path {
        &self.cfg().data_dir
    }

    pub(crate) async fn publish_volume(&self, app: &str, v: &Volume) {
        let rec = aloft_types::catalog::VolumeRecord {
            schema: catalog::SCHEMA_VERSION,
            app: app.to_string(),
            host: self.cfg().host_id.clone(),
            volume: v.clone(),
        };
        let key = catalog::volume_key(app, &v.id);
        let r: Result<_, StoreError> = if v.state == "destroyed" {
            self.inner
                .store
                .delete(&key, aloft_store::Expect::Any)
                .await
        } else {
            self.inner
                .store
                .put(&key, serde_json::to_vec(&rec).unwrap_or_default())
                .await
        };
        if let Err(e) = r {
            tracing::warn!(volume = %v.id, "catalog publish failed: {e}");
        }
    }

    pub(crate) fn machines_using_volume(&self, app: &str, v: &Volume) -> Vec<String> {
        self.inner
            .db
            .list_machines(Some(app))
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, m, _)| {
                m.config
                    .mounts
                    .iter()
                    .any(|mt| mt.volume == v.id || (mt.volume.is_empty() && mt.name == v.name))
            })
            .map(|(_, m, _)| m.id)
            .collect()
    }

    pub(crate) fn region_name(&self) -> &str {
        &self.cfg().region
    }

    pub(crate) fn host_name(&self) -> &str {
        &self.cfg().host_id
    }

    pub(crate) fn new_id(&self) -> String {
        format!("vol_{}", random_hex(8))
    }

    pub(crate) fn now_rfc3339(&self) -> String {
        rfc3339(now_ms())
    }
}

/// How often a boot picks new host ports when QEMU finds a forwarded one taken.
const FORWARD_RETRIES: u32 = 3;

/// The smallest memory the balloon leaves a guest.
const MIN_BALLOON_MB: i64 = 64;
/// How long a guest may take to answer a process list.
const PS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the balloon may take to reach its target.
const BALLOON_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks the guest for its processes; returns them with its `MemAvailable` (kB).
async fn guest_process_list(
    ch: &GuestChannel,
    id: &str,
) -> Result<(Vec<aloft_types::guest::ProcessStat>, u64), AgentError> {
    use tokio::sync::broadcast::error::RecvError;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let request_id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut rx = ch.subscribe();
    ch.send(guest::HostMessage::ProcessList { request_id })
        .map_err(internal)?;
    let answer = async {
        loop {
            match rx.recv().await {
                Ok(guest::GuestMessage::ProcessList {
                    request_id: r,
                    processes,
                    mem_available_kb,
                    ..
                }) if r == request_id => return Ok((processes, mem_available_kb)),
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => {
                    return Err(AgentError::Conflict(format!(
                        "machine {id}: the guest channel closed"
                    )));
                }
            }
        }
    };
    tokio::time::timeout(PS_TIMEOUT, answer)
        .await
        .map_err(|_| AgentError::WaitTimeout {
            id: id.to_string(),
            wanted: "answering the process list".into(),
        })?
}

/// Asks the guest to flush its filesystems and waits for it to say so.
pub(crate) async fn guest_sync(ch: &GuestChannel, id: &str) -> Result<(), AgentError> {
    use tokio::sync::broadcast::error::RecvError;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let request_id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut rx = ch.subscribe();
    ch.send(guest::HostMessage::Sync { request_id })
        .map_err(internal)?;
    let answer = async {
        loop {
            match rx.recv().await {
                Ok(guest::GuestMessage::Synced { request_id: r }) if r == request_id => {
                    return Ok(());
                }
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => {
                    return Err(AgentError::Conflict(format!(
                        "machine {id}: the guest channel closed"
                    )));
                }
            }
        }
    };
    tokio::time::timeout(SYNC_TIMEOUT, answer)
        .await
        .map_err(|_| AgentError::WaitTimeout {
            id: id.to_string(),
            wanted: "flushing its filesystems".into(),
        })?
}

/// How long a guest may take to flush its filesystems.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until the balloon reaches `target` bytes, or stops moving for 2 s (a guest
/// that cannot give more). Returns where it ended.
async fn balloon_settle(vm: &dyn Vm, target: u64) -> Result<u64, AgentError> {
    let deadline = tokio::time::Instant::now() + BALLOON_TIMEOUT;
    let mut last = vm.balloon_actual().await.map_err(internal)?;
    let mut moved_at = tokio::time::Instant::now();
    loop {
        if last.abs_diff(target) < (1 << 20)
            || tokio::time::Instant::now() >= deadline
            || moved_at.elapsed() > Duration::from_secs(2)
        {
            return Ok(last);
        }
        // QEMU emits no event per balloon step; query it at a short interval.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = vm.balloon_actual().await.map_err(internal)?;
        if now != last {
            moved_at = tokio::time::Instant::now();
            last = now;
        }
    }
}

/// Unix ms of an RFC 3339 UTC time as [`rfc3339`] writes it.
pub(crate) fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days-from-civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400) + h * 3600 + mi * 60 + se) * 1000)
}

impl Agent {
    /// The VM and guest channel of a running machine.
    pub(crate) async fn running_vm(
        &self,
        id: &str,
    ) -> Option<(Arc<dyn Vm>, Option<Arc<GuestChannel>>)> {
        let rt = self.inner.runtimes.lock().await;
        rt.get(id).map(|r| (r.vm.clone(), r.channel.clone()))
    }

    /// The lock every operation on machine `id` holds.
    pub(crate) fn machine_lock(&self, id: &str) -> Arc<Mutex<()>> {
        self.lock_for(id)
    }

    /// Restarts a started machine whose health check kept failing (the check's
    /// `unhealthy = "restart"`), with an event saying why. Returns whether it did.
    pub(crate) async fn restart_unhealthy(&self, app: &str, id: &str, why: &str) -> bool {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let Ok((m, mut extra)) = self.load(app, id) else {
            return false;
        };
        if m.state != MachineState::Started || extra.stop_requested {
            return false;
        }
        // The restart policy's budget (reset by a user start) bounds these too.
        let max = match m.config.restart.as_ref().map_or(0, |r| r.max_retries) {
            n if n > 0 => n as u32,
            _ => DEFAULT_MAX_RETRIES,
        };
        if extra.restarts >= max {
            self.system_log(
                id,
                &format!("{why}; not restarting: {max} restarts used (start it to reset)"),
            );
            return false;
        }
        extra.restarts += 1;
        self.event(
            id,
            "restart",
            "restarting",
            "flyd",
            Some(serde_json::json!({"reason": "unhealthy", "detail": why, "attempt": extra.restarts})),
        );
        self.system_log(id, &format!("restarting: {why}"));
        extra.restart_pending = true;
        if self.inner.db.put_machine(app, &m, &extra).is_err() {
            return false;
        }
        if let Err(e) = self
            .stop_inner(app, id, StopOptions::default(), "flyd")
            .await
        {
            tracing::warn!(machine = %id, "unhealthy restart: stop failed: {e}");
            return false;
        }
        if let Err(e) = self.boot(app, id, "flyd").await {
            tracing::warn!(machine = %id, "unhealthy restart: start failed: {e}");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn rfc3339_parses_back() {
        for ms in [0, 1_700_000_000_000, 951_782_400_000, 4_102_444_799_000] {
            assert_eq!(parse_rfc3339_ms(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }

    #[test]
    fn versions_are_26_chars_and_ordered() {
        let a = new_version();
        std::thread::sleep(Duration::from_millis(2));
        let b = new_version();
        assert_eq!(a.len(), 26);
        assert!(a[..10] < b[..10], "{a} {b}");
    }

    #[test]
    fn image_refs_split() {
        let r = image_ref("127.0.0.1:5000/hello:v2", "sha256:ab");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_str()),
            ("127.0.0.1:5000", "hello", "v2")
        );
        let r = image_ref("nginx", "d");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_str()),
            ("docker.io", "nginx", "latest")
        );
    }
}

#[cfg(test)]
mod console_tests {
    use super::*;
    use crate::api::ConsoleOutput;

    /// A client that reads nothing gets its queue, then up to the byte bound held
    /// back, then a note that says why the session ends; many small frames (a shell
    /// echoing keystrokes) are merged and never end it; one that is gone is no overrun.
    #[tokio::test]
    async fn console_output_is_bounded_in_bytes() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(CONSOLE_OUTPUT_FRAMES);
        let mut backlog = ConsoleBacklog::default();
        // 10 000 one-byte frames: merged, never an overrun.
        for _ in 0..10_000 {
            assert!(console_forward(
                &tx,
                &mut backlog,
                "m1",
                ConsoleOutput::Stdout(b"x".to_vec())
            ));
        }
        let queued: usize = std::iter::from_fn(|| rx.try_recv().ok())
            .chain(std::iter::from_fn(|| backlog.pop()))
            .map(|item| ConsoleBacklog::data_len(&item))
            .sum();
        assert_eq!(queued, 10_000, "nothing lost");
        // Big frames nobody reads: refused once the queue and the backlog are full.
        let frame = || ConsoleOutput::Stdout(vec![b'x'; 64 * 1024]);
        let mut accepted = 0;
        while console_forward(&tx, &mut backlog, "m1", frame()) {
            accepted += 1;
            assert!(accepted < 1000, "never refused");
        }
        let held = accepted * 64 * 1024;
        assert!(held > CONSOLE_BACKLOG_BYTES, "{held}");
        assert!(
            held <= CONSOLE_BACKLOG_BYTES + CONSOLE_OUTPUT_FRAMES * CONSOLE_ITEM_BYTES + 64 * 1024,
            "{held}"
        );
        let mut items: Vec<ConsoleOutput> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        items.extend(std::iter::from_fn(|| backlog.pop()));
        match items.last() {
            Some(ConsoleOutput::Stderr(note)) => {
                let note = String::from_utf8_lossy(note);
                assert!(
                    note.contains("machine m1") && note.contains("behind"),
                    "{note}"
                );
            }
            other => panic!("last item {other:?}"),
        }
        drop(rx);
        assert!(console_forward(&tx, &mut backlog, "m1", frame()));
    }
}
