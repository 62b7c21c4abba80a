//! `aloft dev`: the whole platform in one process — SQLite catalog, one agent and one
//! edge proxy per simulated region, and the Machines API — with its address, proxy
//! and a dev token written to `<data-dir>/dev.json` for the CLI to find.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use aloft_agent::{Agent, AgentApi, AgentConfig};
use aloft_proxy::{Listener, ProxyConfig, Routes};
use aloft_store::{SqliteStore, Store};
use aloft_types::datadir::DataDir;
use aloft_vmm::{Accel, QemuVmm};
use anyhow::{Context, bail};
use clap::Args;

use crate::cmd::client::SavedEndpoint;

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where the Machines API listens.
    #[arg(long, default_value = "127.0.0.1:4280")]
    pub api_listen: SocketAddr,
    /// Where the first region's edge proxy listens (public port 80 for routing); each
    /// further region's proxy takes the next port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub proxy_listen: SocketAddr,
    /// Where the first region's proxy serves HTTPS (public port 443; each further
    /// region takes the next port). Off unless given. It serves `*<host-suffix>` with
    /// a certificate of the local CA kept in `<data-dir>/proxy-ca/` (trust its
    /// `ca.pem`), and the catalog's certificates.
    #[arg(long, value_name = "ADDR")]
    pub proxy_tls_listen: Option<SocketAddr>,
    /// Admin listener serving every proxy's Prometheus `GET /metrics` (port 0 picks
    /// a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_listen: SocketAddr,
    /// Simulated regions, one agent and one proxy each.
    #[arg(long, value_delimiter = ',', default_value = "local")]
    pub regions: Vec<String>,
    /// Simulated round trips between regions: `ams-iad=80ms,iad-syd=200ms`, or
    /// `@FILE` with such pairs (one per line). Unlisted pairs of Fly regions are
    /// estimated from geography. The proxy orders next-closest regions by it and
    /// delays every cross-region forward by it; `off` injects no delay.
    #[arg(long, default_value = "")]
    pub region_latency: String,
    /// Memory machines may commit on each simulated host (MB).
    #[arg(long, default_value_t = 8192)]
    pub memory_mb: u64,
    /// Host name suffix the proxy routes (`<app><suffix>`).
    #[arg(long, default_value = ".aloft.localhost")]
    pub host_suffix: String,
    /// Registries reached over plain HTTP besides loopback ones.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// Leave machines running when `aloft dev` exits (the next run re-attaches).
    #[arg(long)]
    pub keep_machines: bool,
    /// Accelerator: auto (KVM when it works, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// How long a machine must see no request before the proxy stops (or suspends) it,
    /// for services with `auto_stop_machines` (above `min_machines_running`).
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub autostop_idle: std::time::Duration,
    /// Machine networking: `user` (QEMU user-mode, host port forwards; no root needed)
    /// or `tap` (root: a routed TAP per machine with private IPv6/IPv4, NAT and
    /// organisation isolation).
    #[arg(long, default_value = "user")]
    pub network: String,
    /// ACME: every region's proxy issues and renews the catalog's ACME certificates.
    #[command(flatten)]
    pub acme: super::certs::AcmeArgs,
}

/// Finds the static guest init: `ALOFT_INIT_BIN`, then the musl build directories of
/// the workspace this binary was built in, then next to this binary. A dynamically
/// linked file is skipped: the guest has no loader, so the kernel could not run it.
pub fn find_init_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("ALOFT_INIT_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("ALOFT_INIT_BIN={} does not exist", p.display());
        }
        if !is_static_elf(&p) {
            bail!(
                "ALOFT_INIT_BIN={} is not a static executable (build it for x86_64-unknown-linux-musl)",
                p.display()
            );
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot find this binary's path")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let mut candidates = Vec::new();
    for up in ["..", "../.."] {
        for profile in ["release", "debug"] {
            candidates.push(
                dir.join(up)
                    .join("x86_64-unknown-linux-musl")
                    .join(profile)
                    .join("aloft-init"),
            );
        }
    }
    candidates.push(dir.join("aloft-init"));
    candidates
        .into_iter()
        .find(|p| p.is_file() && is_static_elf(p))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no static aloft-init found (set ALOFT_INIT_BIN, or build it: \
                 cargo build --release -p aloft-init --target x86_64-unknown-linux-musl)"
            )
        })
}

/// An ELF64 executable without a `PT_INTERP` program header (no dynamic loader).
fn is_static_elf(path: &Path) -> bool {
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let Ok(phoff) = <[u8; 8]>::try_from(&data[0x20..0x28]).map(u64::from_le_bytes) else {
        return false;
    };
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let at = phoff as usize + i * phentsize;
        data.get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            != Some(3)
    })
}

pub fn run(args: DevArgs, data_dir: &DataDir) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(args, data_dir))
}

async fn serve(args: DevArgs, data_dir: &DataDir) -> anyhow::Result<ExitCode> {
    let root = data_dir.root().to_path_buf();
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let kernel_dir = data_dir.kernel_dir();
    if !kernel_dir.join("vmlinux").is_file() {
        bail!(
            "no guest kernel in {} (run `cargo xtask setup`, or `cargo xtask setup --data-dir {}`)",
            kernel_dir.display(),
            root.display()
        );
    }
    let init_bin = find_init_bin()?;
    let accel = match args.accel.as_str() {
        "auto" => Accel::Auto,
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        other => bail!("--accel {other:?}: use auto, kvm or tcg"),
    };
    let mut regions = args.regions.clone();
    regions.retain(|r| !r.is_empty());
    if regions.is_empty() {
        bail!("--regions needs at least one region");
    }

    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(data_dir.catalog_db())
            .await
            .with_context(|| format!("cannot open {}", data_dir.catalog_db().display()))?,
    );
    let mut agents: Vec<Agent> = Vec::new();
    for region in &regions {
        let cfg = AgentConfig {
            host_id: format!("{region}-1"),
            region: region.clone(),
            data_dir: root.clone(),
            kernel_dir: kernel_dir.clone(),
            init_bin: init_bin.clone(),
            memory_mb_total: args.memory_mb,
            cpus_total: std::thread::available_parallelism().map_or(2, |n| n.get() as u32) * 4,
            accel,
            forward_addr: "127.0.0.1".into(),
            pull: aloft_image::PullOptions {
                insecure_registries: args.insecure_registries.clone(),
                ..Default::default()
            },
            tcg_tb_size_mb: Some(aloft_vmm::qemu::DEFAULT_TCG_TB_SIZE_MB),
        };
        let tap = match args.network.as_str() {
            "user" => false,
            "tap" => true,
            other => bail!("--network {other:?}: use user or tap"),
        };
        let agent = Agent::open_with_network(cfg, store.clone(), Arc::new(QemuVmm), tap)
            .await
            .map_err(|e| anyhow::anyhow!("agent for region {region}: {e}"))?;
        agents.push(agent);
    }
    let agent_apis: Vec<Arc<dyn AgentApi>> = agents
        .iter()
        .map(|a| Arc::new(a.clone()) as Arc<dyn AgentApi>)
        .collect();
    let agent_apis_for_proxy = agent_apis.clone();
    let state = aloft_api::ApiState::new(store.clone(), agent_apis, &root)
        .await
        .context("cannot start the API")?;
    let token = aloft_api::create_token(
        &state,
        "aloft dev",
        "personal",
        None,
        aloft_api::Role::Admin,
    )
    .await
    .context("cannot create the dev token")?;

    let api_listener = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("cannot listen on {} for the API", args.api_listen))?;
    let api_addr = api_listener.local_addr()?;
    let router = aloft_api::router(state);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut api_stop = stop_rx.clone();
    let api_task = tokio::spawn(async move {
        axum::serve(api_listener, router)
            .with_graceful_shutdown(async move {
                let _ = api_stop.wait_for(|s| *s).await;
            })
            .await
    });

    let inject_latency = args.region_latency != "off";
    let latency_text = match args.region_latency.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("--region-latency: cannot read {path}"))?,
        None if inject_latency => args.region_latency.clone(),
        None => String::new(),
    };
    let latency = aloft_proxy::LatencyMatrix::parse(&latency_text).context("--region-latency")?;
    let mut proxy_tasks = Vec::new();
    let mut proxy_addrs = Vec::new();
    let mut tls_addrs = Vec::new();
    for (i, region) in regions.iter().enumerate() {
        let mut addr = args.proxy_listen;
        addr.set_port(args.proxy_listen.port() + i as u16);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for the {region} proxy"))?;
        let local = listener.local_addr()?;
        proxy_addrs.push((region.clone(), local));
        let routes = Arc::new(Routes::new(region.clone()));
        routes.set_starter(Arc::new(AgentStarter {
            agents: agent_apis_for_proxy.clone(),
        }));
        // region latency: the RTT table orders the other regions (empty order here).
        routes.set_latency(latency.clone(), inject_latency);
        tokio::spawn(aloft_proxy::catalog::follow_catalog(
            store.clone(),
            routes.clone(),
            args.host_suffix.clone(),
            Vec::new(),
        ));
        tokio::spawn(aloft_proxy::catalog::autostop(
            routes.clone(),
            args.autostop_idle,
        ));
        let tls_listener = dev_tls_listener(&args, i, &routes, &store, &root).await?;
        // acme: each region's proxy runs a worker; one claims each hostname.
        let acme_challenges = args.acme.config()?.map(|cfg| {
            aloft_proxy::acme::start(
                store.clone(),
                cfg,
                tls_listener.as_ref().map(|_| Arc::clone(routes.certs())),
            )
        });
        if let Some(l) = &tls_listener {
            tls_addrs.push((region.clone(), l.listener.local_addr()?));
        }
        let mut stop = stop_rx.clone();
        proxy_tasks.push(tokio::spawn(aloft_proxy::serve(
            [
                Some(Listener {
                    listener,
                    public_port: 80,
                }),
                tls_listener,
            ]
            .into_iter()
            .flatten()
            .collect(),
            routes,
            ProxyConfig {
                tls_ports: Arc::from(vec![443]),
                acme_challenges,
                ..ProxyConfig::default()
            },
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )));
    }

    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {} for metrics", args.metrics_listen))?;
    let metrics_addr = metrics_listener.local_addr()?;
    let mut metrics_stop = stop_rx.clone();
    tokio::spawn(aloft_proxy::metrics::serve_admin(
        metrics_listener,
        async move {
            let _ = metrics_stop.wait_for(|s| *s).await;
        },
    ));

    let api_url = format!("http://{api_addr}");
    let proxy = proxy_addrs
        .first()
        .map(|(_, a)| format!("http://{a}"))
        .unwrap_or_default();
    let endpoint = SavedEndpoint {
        api_url: api_url.clone(),
        token: token.token.clone(),
        proxy: Some(proxy.clone()),
    };
    let dev_json = data_dir.dev_json();
    let tmp = dev_json.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&endpoint)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    set_private(&tmp);
    std::fs::rename(&tmp, &dev_json)
        .with_context(|| format!("cannot write {}", dev_json.display()))?;

    println!("aloft dev is running (data in {})", root.display());
    println!("  API:    {api_url}  (token in {})", dev_json.display());
    for (region, addr) in &proxy_addrs {
        println!(
            "  proxy:  http://{addr}  region {region}  (apps answer as <app>{})",
            args.host_suffix
        );
    }
    println!("  metrics: http://{metrics_addr}/metrics");
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            println!(
                "  latency: {a}-{b} {:?}{}",
                latency.rtt(a, b),
                if inject_latency { " (injected)" } else { "" }
            );
        }
    }
    for (region, addr) in &tls_addrs {
        println!(
            "  proxy:  https://{addr}  region {region}  (CA: {})",
            root.join("proxy-ca").join("ca.pem").display()
        );
    }
    println!(
        "  export ALOFT_API_URL={api_url} ALOFT_API_TOKEN={}",
        token.token
    );
    println!("Press Ctrl-C to stop.");

    wait_for_signal().await;
    println!("aloft dev: stopping");
    let _ = stop_tx.send(true);
    for t in proxy_tasks {
        let _ = t.await;
    }
    let _ = api_task.await;
    if !args.keep_machines {
        for agent in &agents {
            agent.stop_all().await;
        }
    }
    let _ = std::fs::remove_file(&dev_json);
    Ok(ExitCode::SUCCESS)
}

/// Autostart for the proxies: the agent that owns the machine starts it.
struct AgentStarter {
    agents: Vec<Arc<dyn AgentApi>>,
}

#[async_trait::async_trait]
impl aloft_proxy::MachineStarter for AgentStarter {
    async fn start_machine(&self, app: &str, machine_id: &str) -> Result<(), String> {
        for agent in &self.agents {
            match agent.start_machine(app, machine_id, None).await {
                Ok(_) => return Ok(()),
                Err(aloft_agent::AgentError::NotFound { .. }) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        Err(format!("no host knows machine {machine_id}"))
    }

    async fn stop_machine(&self, app: &str, machine_id: &str, suspend: bool) -> Result<(), String> {
        for agent in &self.agents {
            let r = if suspend {
                agent
                    .suspend_machine(app, machine_id, None)
                    .await
                    .map(|_| ())
            } else {
                agent
                    .stop_machine(app, machine_id, aloft_agent::StopOptions::default(), None)
                    .await
                    .map(|_| ())
            };
            match r {
                Ok(()) => return Ok(()),
                Err(aloft_agent::AgentError::NotFound { .. }) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        Err(format!("no host knows machine {machine_id}"))
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    aloft_types::appconfig::parse_go_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

fn set_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// tls: the HTTPS listener of the `i`th region's proxy (public port 443) when
/// `--proxy-tls-listen` is given, with the dev certificate (`*<suffix>` signed by the
/// local CA in `<data-dir>/proxy-ca/`) and the catalog's certificates followed live.
async fn dev_tls_listener(
    args: &DevArgs,
    i: usize,
    routes: &Arc<Routes>,
    store: &Arc<dyn Store>,
    root: &Path,
) -> anyhow::Result<Option<Listener>> {
    let Some(mut addr) = args.proxy_tls_listen else {
        return Ok(None);
    };
    if addr.port() != 0 {
        addr.set_port(addr.port() + i as u16);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for HTTPS"))?;
    aloft_proxy::tls::install_dev_certificate(
        routes.certs(),
        &root.join("proxy-ca"),
        &args.host_suffix,
    )?;
    tokio::spawn(aloft_proxy::tls::follow_certs(
        store.clone(),
        Arc::clone(routes.certs()),
    ));
    Ok(Some(Listener {
        listener,
        public_port: 443,
    }))
}

#[cfg(test)]
mod tests {
    use super::is_static_elf;
    use std::path::Path;

    #[test]
    fn tells_static_from_dynamic_executables() {
        assert!(
            is_static_elf(Path::new("/bin/busybox")),
            "busybox-static is static"
        );
        assert!(!is_static_elf(Path::new("/bin/ls")), "ls needs the loader");
        assert!(!is_static_elf(Path::new("/etc/hostname")));
    }
}
