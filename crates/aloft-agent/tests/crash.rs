//! Crash safety of the agent under real QEMU (TCG here) and the real guest init.
//!
//! The agent under test runs in a child process: this test binary re-executed with
//! [`CHILD_ENV`] set (see [`crash_child`]), so an injected fault (`ALOFT_AGENT_FAULT`,
//! an `abort()` right after a persisted step) or a SIGKILL ends only that process.
//! The parent then opens a fresh agent on the same data directory and checks that
//! every machine is settled (the operation finished or undone), that running VMs were
//! re-attached rather than restarted (same QEMU pid), that HTTP answers through the
//! forward of every started machine, and that nothing leaked: no QEMU for a stopped or
//! destroyed machine, no machine directory or catalog key of a destroyed one, no
//! unfinished operation record, no `*.tmp` / `*.partial` file.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aloft_agent::{
    Agent, AgentApi, AgentConfig, CreateMachine, FAULT_ENV, StopOptions, UpdateMachine, WaitFor,
};
use aloft_store::{SqliteStore, Store};
use aloft_testkit::{BusyboxHttpd, web_machine_config};
use aloft_types::machine::{MachineConfig, MachineRestart, MachineState};
use aloft_vmm::QemuVmm;

/// Set in a re-executed child: the data directory its agent works on.
const CHILD_ENV: &str = "ALOFT_CRASH_CHILD_DATA";
/// The child's operation: `create`, `hold:N`, `start`, `stop`, `restart`, `update`,
/// `suspend`, `destroy`.
const CHILD_OP: &str = "ALOFT_CRASH_CHILD_OP";
/// The machine the child's operation acts on.
const CHILD_ID: &str = "ALOFT_CRASH_CHILD_ID";
/// The image digest the child creates machines from.
const CHILD_IMAGE: &str = "ALOFT_CRASH_CHILD_IMAGE";
/// The restart policy of machines the child creates.
const CHILD_POLICY: &str = "ALOFT_CRASH_CHILD_POLICY";
/// Guest memory of machines the child creates.
const CHILD_MEMORY: &str = "ALOFT_CRASH_CHILD_MEMORY";

const APP: &str = "crash";

/// The VM tests of this binary run one at a time: on 2 cores, TCG boots of two tests
/// at once would slow each other past their deadlines.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}
const SETTLE: Duration = Duration::from_secs(90);

/// A busybox image serving /www on port 8080, imported into the image store at
/// `shared/images`; returns its digest.
fn busybox_image(shared: &Path) -> String {
    BusyboxHttpd::new("hello:v1")
        .import(shared, &shared.join("images"))
        .expect("busybox image (busybox-static: cargo xtask setup)")
}

fn agent_config(data: &Path) -> AgentConfig {
    AgentConfig {
        memory_mb_total: 16_384,
        cpus_total: 64,
        tcg_tb_size_mb: Some(16),
        ..aloft_testkit::agent_config(data).expect("static guest init")
    }
}

async fn open_agent(data: &Path) -> (Agent, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(data.join("catalog.db")).await.unwrap());
    let agent = Agent::open(agent_config(data), store.clone(), Arc::new(QemuVmm))
        .await
        .unwrap();
    (agent, store)
}

fn web_config(image: &str, version: &str, policy: &str, memory_mb: i64) -> MachineConfig {
    MachineConfig {
        env: BTreeMap::from([("CONFIG_VERSION".to_string(), version.to_string())]),
        restart: Some(MachineRestart {
            policy: policy.into(),
            ..Default::default()
        }),
        ..web_machine_config(image, memory_mb)
    }
}

// ---------------------------------------------------------------------------------
// The child: one agent process performing one operation.
// ---------------------------------------------------------------------------------

/// Only does something when re-executed by the tests below: opens the agent on
/// `$ALOFT_CRASH_CHILD_DATA` (re-attaching like any agent start) and performs one
/// operation. With `ALOFT_AGENT_FAULT` set, the agent aborts in the middle of it.
#[test]
fn crash_child() {
    let Some(data) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else {
        return;
    };
    let op = std::env::var(CHILD_OP).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (agent, _store) = open_agent(&data).await;
        let id = std::env::var(CHILD_ID).unwrap_or_default();
        let image = std::env::var(CHILD_IMAGE).unwrap_or_default();
        let policy = std::env::var(CHILD_POLICY).unwrap_or_else(|_| "no".into());
        let memory: i64 = std::env::var(CHILD_MEMORY)
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or(96);
        let create = |agent: Agent| {
            let config = web_config(&image, "1", &policy, memory);
            async move {
                agent
                    .create_machine(CreateMachine {
                        app: APP.into(),
                        config,
                        ..Default::default()
                    })
                    .await
            }
        };
        match op.as_str() {
            "create" => {
                let m = create(agent.clone()).await.unwrap();
                println!("\nID {}", m.id);
            }
            hold if hold.starts_with("hold:") => {
                // Boot N machines, a few at a time, then wait to be killed.
                let n: usize = hold["hold:".len()..].parse().unwrap();
                let mut left = n;
                while left > 0 {
                    let batch = left.min(4);
                    let mut set = tokio::task::JoinSet::new();
                    for _ in 0..batch {
                        set.spawn(create(agent.clone()));
                    }
                    while let Some(r) = set.join_next().await {
                        let m = r.unwrap().unwrap();
                        println!("\nID {}", m.id);
                    }
                    left -= batch;
                }
                println!("\nREADY");
                std::io::stdout().flush().unwrap();
                std::future::pending::<()>().await;
            }
            "start" => {
                agent.start_machine(APP, &id, None).await.unwrap();
            }
            "stop" => {
                agent
                    .stop_machine(APP, &id, StopOptions::default(), None)
                    .await
                    .unwrap();
            }
            "restart" => {
                agent
                    .restart_machine(APP, &id, StopOptions::default(), None)
                    .await
                    .unwrap();
            }
            "update" => {
                agent
                    .update_machine(
                        APP,
                        &id,
                        UpdateMachine {
                            config: web_config(&image, "2", &policy, memory),
                            ..Default::default()
                        },
                        None,
                    )
                    .await
                    .unwrap();
            }
            "suspend" => {
                agent.suspend_machine(APP, &id, None).await.unwrap();
            }
            "destroy" => {
                agent.destroy_machine(APP, &id, true, None).await.unwrap();
            }
            "recover" => {
                // Recovery ran in open(); wait for the boots it started.
                for m in agent.list_machines(APP).await.unwrap() {
                    wait_state(&agent, &m.id, "started").await;
                }
            }
            other => panic!("unknown child op {other:?}"),
        }
        std::io::stdout().flush().unwrap();
    });
}

struct ChildRun {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs one child agent on `data` to completion (or its injected abort).
fn run_child(data: &Path, op: &str, env: &[(&str, &str)], fault: Option<&str>) -> ChildRun {
    let n = std::fs::read_dir(data)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("child-"))
        .count();
    let out_path = data.join(format!("child-{n}.out"));
    let err_path = data.join(format!("child-{n}.err"));
    // Files, not pipes: a daemonized QEMU must not be able to hold our reader open.
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, data)
        .env(CHILD_OP, op)
        .env_remove(FAULT_ENV)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(f) = fault {
        cmd.env(FAULT_ENV, f);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "child {op} ({fault:?}) did not finish in 240 s: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ChildRun {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

fn child_ok(run: &ChildRun, what: &str) {
    assert!(
        run.status.success(),
        "child {what} failed ({:?}):\n{}\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
}

fn child_ids(run: &ChildRun) -> Vec<String> {
    run.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ID "))
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------
// Checks.
// ---------------------------------------------------------------------------------

/// Kills, by pid, every process whose command line names `root` (the QEMUs this test
/// started), even when an assertion failed.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in processes_naming(&self.0) {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}

/// Pids of processes whose command line contains `path` (never this process).
fn processes_naming(path: &Path) -> Vec<i32> {
    let needle = path.display().to_string();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        // A zombie has an empty command line and holds nothing.
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("qemu") && cmdline.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

fn machine_dir(data: &Path, id: &str) -> PathBuf {
    data.join("machines").join(id)
}

fn qemu_pid(data: &Path, id: &str) -> Option<i32> {
    std::fs::read_to_string(machine_dir(data, id).join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    // A zombie counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|st| st != "Z" && st != "X")
        })
        .unwrap_or(false)
}

fn http_get(port: u16) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

async fn catalog_record(
    store: &Arc<dyn Store>,
    id: &str,
) -> Option<aloft_types::catalog::MachineRecord> {
    let v = store
        .get(&aloft_types::catalog::machine_key(APP, id))
        .await
        .unwrap()?;
    Some(serde_json::from_slice(&v.value).unwrap())
}

async fn forward_port(store: &Arc<dyn Store>, id: &str) -> u16 {
    let rec = catalog_record(store, id).await.expect("machine published");
    let Some(addr) = rec.addresses.first() else {
        panic!("machine {id} is published without an address: {rec:?}")
    };
    addr.address.rsplit(':').next().unwrap().parse().unwrap()
}

async fn http_eventually(port: u16, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let last = match http_get(port) {
            Ok(body) if body.contains("200") && body.contains("hello from aloft") => return,
            Ok(body) => body,
            Err(e) => e.to_string(),
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "machine {id}: no HTTP answer on {port}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Unfinished operation records in the agent's database.
fn open_ops(data: &Path) -> Vec<(String, String, i64)> {
    let db = rusqlite::Connection::open_with_flags(
        data.join("agent-h1.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = db
        .prepare("SELECT machine_id, kind, step FROM ops")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Waits until no operation is recorded as in flight (recovery's work is async).
async fn ops_drained(data: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ops = open_ops(data);
        if ops.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "operations never finished: {ops:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Files an interrupted write left behind (the shared image store is a symlink and
/// not walked).
fn leftovers(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            leftovers(&path, out);
        } else {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") || name.ends_with(".partial") || name.contains(".tmp.") {
                out.push(path);
            }
        }
    }
}

async fn wait_state(agent: &Agent, id: &str, state: &str) -> MachineState {
    match agent
        .wait_machine(
            APP,
            id,
            WaitFor {
                states: vec![state.into()],
                instance_id: None,
                timeout: SETTLE,
            },
        )
        .await
    {
        Ok(s) => s,
        Err(e) => {
            let now = agent.get_machine(APP, id).await.map(|m| m.state);
            panic!("machine {id} never became {state} (now {now:?}): {e}")
        }
    }
}

/// Destroys every machine of `agent` and checks that nothing of them remains.
async fn destroy_all_and_check(agent: &Agent, store: &Arc<dyn Store>, data: &Path) {
    for m in agent.list_machines(APP).await.unwrap() {
        agent.destroy_machine(APP, &m.id, true, None).await.unwrap();
        assert_destroyed(store, data, &m.id).await;
    }
    let qemus = processes_naming(data);
    assert!(qemus.is_empty(), "QEMU left running: {qemus:?}");
}

async fn assert_destroyed(store: &Arc<dyn Store>, data: &Path, id: &str) {
    let dir = machine_dir(data, id);
    assert!(!dir.exists(), "machine {id}: {} left", dir.display());
    assert!(
        processes_naming(&dir).is_empty(),
        "machine {id}: QEMU left running"
    );
    assert!(
        catalog_record(store, id).await.is_none(),
        "machine {id}: catalog key left"
    );
}

// ---------------------------------------------------------------------------------
// The matrix: every operation, crashed after every step.
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Before {
    /// No machine yet (the operation is create).
    Nothing,
    Started,
    Stopped,
    Suspended,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum After {
    /// Started with the VM of before the crash (same QEMU pid).
    SameVm,
    /// Started, booted again (or for the first time) after the crash.
    Started,
    Stopped,
    Destroyed,
}

struct Case {
    op: &'static str,
    before: Before,
    fault: &'static str,
    after: After,
    /// The config version the machine runs at the end (updates are undone).
    version: &'static str,
    /// A second fault, hit by the agent that recovers from the first one.
    then: Option<&'static str>,
    /// The agent bug this case once showed (fixed; the case runs in
    /// [`crash_cases_with_known_agent_bugs`]).
    bug: Option<&'static str>,
}

const fn case(op: &'static str, before: Before, fault: &'static str, after: After) -> Case {
    Case {
        op,
        before,
        fault,
        after,
        version: "1",
        then: None,
        bug: None,
    }
}

impl Case {
    const fn then(mut self, fault: &'static str) -> Case {
        self.then = Some(fault);
        self
    }

    const fn bug(mut self, why: &'static str) -> Case {
        self.bug = Some(why);
        self
    }
}

const BUG_RESUME: &str = "recover() turns an interrupted resume into Stopped before booting \
    again, so boot() cold-boots (the suspended memory is lost) and suspend.state is left \
    in the machine directory";
const BUG_RESTART: &str = "restart records its stop half as a plain `stop` op; recovery \
    finishes the stop and the machine ends stopped, neither restarted nor as it was";

fn matrix() -> Vec<Case> {
    use After as A;
    use Before as B;
    vec![
        // create = record + start; the first start cannot have a VM to keep except
        // after step 3 (QEMU started, channel not yet connected).
        case("create", B::Nothing, "start:0", A::Started),
        case("create", B::Nothing, "start:1", A::Started),
        case("create", B::Nothing, "start:2", A::Started),
        case("create", B::Nothing, "start:3", A::SameVm),
        case("start", B::Stopped, "start:0", A::Started),
        case("start", B::Stopped, "start:1", A::Started),
        case("start", B::Stopped, "start:2", A::Started),
        case("start", B::Stopped, "start:3", A::SameVm),
        // Resume = start of a suspended machine.
        case("start", B::Suspended, "start:0", A::Started).bug(BUG_RESUME),
        case("start", B::Suspended, "start:1", A::Started).bug(BUG_RESUME),
        case("start", B::Suspended, "start:2", A::Started).bug(BUG_RESUME),
        case("start", B::Suspended, "start:3", A::SameVm),
        case("stop", B::Started, "stop:0", A::Stopped),
        case("stop", B::Started, "stop:1", A::Stopped),
        case("destroy", B::Started, "destroy:0", A::Destroyed),
        case("destroy", B::Started, "destroy:1", A::Destroyed),
        case("destroy", B::Started, "destroy:2", A::Destroyed),
        case("destroy", B::Stopped, "destroy:0", A::Destroyed),
        // update: undone (the old config keeps running or runs again).
        case("update", B::Started, "update:0", A::SameVm),
        case("update", B::Started, "update:1", A::Started),
        case("suspend", B::Started, "suspend:0", A::SameVm),
        // restart = stop + start: finished (started) either way.
        case("restart", B::Started, "stop:0", A::Started).bug(BUG_RESTART),
        case("restart", B::Started, "stop:1", A::Started).bug(BUG_RESTART),
        case("restart", B::Started, "start:0", A::Started),
        case("restart", B::Started, "start:1", A::Started),
        case("restart", B::Started, "start:2", A::Started),
        case("restart", B::Started, "start:3", A::SameVm),
        // The recovering agent crashes too.
        case("create", B::Nothing, "start:1", A::SameVm).then("start:3"),
        case("update", B::Started, "update:1", A::Started).then("start:2"),
        case("stop", B::Started, "stop:0", A::Stopped).then("stop:1"),
        case("destroy", B::Started, "destroy:0", A::Destroyed).then("destroy:1"),
    ]
}

struct Shared {
    root: PathBuf,
    image: String,
}

impl Shared {
    fn new(root: &Path) -> Shared {
        let shared = root.join("shared");
        std::fs::create_dir_all(shared.join("kernel-cache")).unwrap();
        let image = busybox_image(&shared);
        Shared {
            root: root.to_path_buf(),
            image,
        }
    }

    /// A fresh agent data directory using the shared image store and kernel cache.
    fn data_dir(&self, name: &str) -> PathBuf {
        let data = self.root.join(name);
        std::fs::create_dir_all(&data).unwrap();
        let shared = self.root.join("shared");
        std::os::unix::fs::symlink(shared.join("images"), data.join("images")).unwrap();
        std::os::unix::fs::symlink(shared.join("kernel-cache"), data.join("kernel-cache")).unwrap();
        data
    }

    fn env(&self) -> Vec<(&'static str, &str)> {
        vec![(CHILD_IMAGE, self.image.as_str())]
    }
}

fn run_case(shared: &Shared, c: &Case) {
    let name = format!(
        "{}-{:?}-{}{}",
        c.op,
        c.before,
        c.fault.replace(':', "-"),
        c.then
            .map(|f| format!("-then-{}", f.replace(':', "-")))
            .unwrap_or_default()
    );
    let data = shared.data_dir(&name);
    let _reaper = Reaper(data.clone());
    let env = shared.env();

    // Before: the machine in its starting state, made by an agent that then exits.
    let mut id = String::new();
    if c.before != Before::Nothing {
        let run = run_child(&data, "create", &env, None);
        child_ok(&run, "create");
        id = child_ids(&run)
            .pop()
            .unwrap_or_else(|| panic!("no id from child: {}\n{}", run.stdout, run.stderr));
        let mut env = env.clone();
        env.push((CHILD_ID, id.as_str()));
        match c.before {
            Before::Stopped => child_ok(&run_child(&data, "stop", &env, None), "stop"),
            Before::Suspended => child_ok(&run_child(&data, "suspend", &env, None), "suspend"),
            _ => {}
        }
    }
    let pid_before = if c.before == Before::Started {
        Some(qemu_pid(&data, &id).expect("a started machine has a pid"))
    } else {
        None
    };

    // The operation, crashed after its step.
    let mut op_env = env.clone();
    if !id.is_empty() {
        op_env.push((CHILD_ID, id.as_str()));
    }
    let crashes = std::iter::once((c.op, c.fault)).chain(c.then.map(|f| ("recover", f)));
    for (op, fault) in crashes {
        let run = run_child(&data, op, &op_env, Some(fault));
        assert_eq!(
            run.status.signal(),
            Some(libc_sigabrt()),
            "{name}: {op}: fault {fault} was not reached ({:?}):\n{}\n{}",
            run.status,
            run.stdout,
            run.stderr
        );
        assert!(
            run.stderr.contains(&format!("injected fault at {fault}")),
            "{name}: {}",
            run.stderr
        );
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (agent, store) = open_agent(&data).await;
        if id.is_empty() {
            let all = agent.list_machines(APP).await.unwrap();
            assert_eq!(all.len(), 1, "{name}: {all:?}");
            id = all[0].id.clone();
        }
        // The VM that ran when the agent died, if any.
        let pid_at_crash = qemu_pid(&data, &id).filter(|p| alive(*p)).or(pid_before);
        match c.after {
            After::SameVm | After::Started => {
                wait_state(&agent, &id, "started").await;
                ops_drained(&data).await;
                let m = agent.get_machine(APP, &id).await.unwrap();
                assert_eq!(m.state, MachineState::Started, "{name}");
                let pid = qemu_pid(&data, &id).expect("pid of a started machine");
                assert!(alive(pid), "{name}: QEMU {pid} is not running");
                if c.after == After::SameVm {
                    assert_eq!(
                        Some(pid),
                        pid_at_crash,
                        "{name}: the running VM was restarted"
                    );
                }
                assert_eq!(
                    m.config.env.get("CONFIG_VERSION").map(String::as_str),
                    Some(c.version),
                    "{name}: config"
                );
                assert_eq!(agent.running_count().await, 1, "{name}: not supervised");
                let port = forward_port(&store, &id).await;
                http_eventually(port, &id).await;
                // The guest channel is attached: exec works.
                let out = agent
                    .exec(
                        APP,
                        &id,
                        vec!["/bin/sh".into(), "-c".into(), "echo $CONFIG_VERSION".into()],
                        Duration::from_secs(20),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{name}: exec after recovery: {e}"));
                assert_eq!(out.stdout.trim(), c.version, "{name}: {out:?}");
                assert!(
                    !machine_dir(&data, &id).join("suspend.state").exists(),
                    "{name}: a started machine keeps a suspend file"
                );
                // Exactly one QEMU for it.
                let qemus = processes_naming(&machine_dir(&data, &id));
                assert_eq!(qemus, vec![pid], "{name}: QEMUs");
            }
            After::Stopped => {
                wait_state(&agent, &id, "stopped").await;
                ops_drained(&data).await;
                let qemus = processes_naming(&machine_dir(&data, &id));
                assert!(
                    qemus.is_empty(),
                    "{name}: QEMU of a stopped machine: {qemus:?}"
                );
                if let Some(p) = pid_at_crash {
                    assert!(!alive(p), "{name}: QEMU {p} still alive");
                }
                assert_eq!(agent.running_count().await, 0, "{name}");
            }
            After::Destroyed => {
                wait_state(&agent, &id, "destroyed").await;
                ops_drained(&data).await;
                assert!(agent.get_machine(APP, &id).await.is_err(), "{name}");
                assert_destroyed(&store, &data, &id).await;
                if let Some(p) = pid_at_crash {
                    assert!(!alive(p), "{name}: QEMU {p} still alive");
                }
            }
        }
        // The catalog agrees with the agent.
        if c.after != After::Destroyed {
            let rec = catalog_record(&store, &id).await.expect("published");
            let m = agent.get_machine(APP, &id).await.unwrap();
            assert_eq!(rec.machine.state, m.state, "{name}: catalog state");
        }
        let mut left = Vec::new();
        leftovers(&data, &mut left);
        assert!(left.is_empty(), "{name}: files left: {left:?}");
        destroy_all_and_check(&agent, &store, &data).await;
    });
    rt.shutdown_timeout(Duration::from_secs(5));
}

fn libc_sigabrt() -> i32 {
    rustix::process::Signal::ABORT.as_raw()
}

/// Runs the matrix cases that `pick` selects, sequentially, and reports the failures
/// together with each case's time.
fn run_matrix(pick: impl Fn(&Case) -> bool) {
    let work = tempfile::tempdir().unwrap();
    let shared = Shared::new(work.path());
    let only = std::env::var("ALOFT_CRASH_ONLY").ok();
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for c in matrix().into_iter().filter(|c| pick(c)) {
        let then = c
            .then
            .map(|f| format!(", again at {f}"))
            .unwrap_or_default();
        let label = format!("{} ({:?}) crash at {}{then}", c.op, c.before, c.fault);
        if only.as_deref().is_some_and(|o| !label.contains(o)) {
            continue;
        }
        let t = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(&shared, &c)));
        let took = t.elapsed();
        match r {
            Ok(()) => report.push(format!("ok    {label:40} {took:.1?}")),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                report.push(format!("FAIL  {label:40} {took:.1?}"));
                let why = c.bug.map(|b| format!(" [known: {b}]")).unwrap_or_default();
                failures.push(format!("{label}: {msg}{why}"));
            }
        }
    }
    eprintln!("crash matrix:\n{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Every operation killed after each of its persisted steps, then recovered by a new
/// agent.
#[test]
fn every_operation_survives_a_crash_at_every_step() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let _serial = serial();
    run_matrix(|c| c.bug.is_none());
}

/// The crash cases of two agent bugs, now fixed: an interrupted resume stays a resume
/// (its saved state is kept), and an interrupted restart finishes with a start.
#[test]
fn crash_cases_with_known_agent_bugs() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let _serial = serial();
    run_matrix(|c| c.bug.is_some());
}

/// Starts a child agent that boots `n` machines and then waits to be killed; returns
/// it with the machine ids once all are started.
fn hold_child(data: &Path, n: usize, env: &[(&str, &str)]) -> (std::process::Child, Vec<String>) {
    use std::io::BufRead;
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, data)
        .env(CHILD_OP, format!("hold:{n}"))
        .env_remove(FAULT_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(data.join("hold.err")).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    // Reads until READY (not EOF: the daemonized QEMUs never had this pipe, but the
    // child keeps it open while it waits).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60 + 30 * n as u64);
    let mut ids = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == "READY" => break,
            Ok(line) => {
                if let Some(id) = line.strip_prefix("ID ") {
                    ids.push(id.to_string());
                }
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "holding child ended or stalled after {} machines ({e}):\n{}",
                    ids.len(),
                    std::fs::read_to_string(data.join("hold.err")).unwrap_or_default()
                );
            }
        }
    }
    (child, ids)
}

/// 20 running machines survive a SIGKILL of their agent: the next agent re-attaches
/// to every one (same QEMU pids), each answers HTTP, and destroying them all leaves
/// no QEMU behind.
#[test]
fn twenty_machines_survive_agent_sigkill() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let _serial = serial();
    const N: usize = 20;
    let work = tempfile::tempdir().unwrap();
    let shared = Shared::new(work.path());
    let data = shared.data_dir("twenty");
    let _reaper = Reaper(data.clone());
    let mut env = shared.env();
    env.push((CHILD_MEMORY, "96"));
    let t = Instant::now();
    let (mut child, ids) = hold_child(&data, N, &env);
    let booted = t.elapsed();
    assert_eq!(ids.len(), N);
    let pids: Vec<i32> = ids
        .iter()
        .map(|id| qemu_pid(&data, id).expect("pid"))
        .collect();
    assert!(pids.iter().all(|p| alive(*p)));

    // kill -9 the agent.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(rustix::process::Signal::KILL.as_raw())
    );
    assert!(pids.iter().all(|p| alive(*p)), "a VM died with its agent");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let t = Instant::now();
        let (agent, store) = open_agent(&data).await;
        let reopened = t.elapsed();
        assert_eq!(agent.running_count().await, N);
        for (id, pid) in ids.iter().zip(&pids) {
            let m = agent.get_machine(APP, id).await.unwrap();
            assert_eq!(m.state, MachineState::Started, "machine {id}");
            assert_eq!(qemu_pid(&data, id), Some(*pid), "machine {id} was restarted");
            assert!(alive(*pid), "machine {id}: QEMU {pid} gone");
            let port = forward_port(&store, id).await;
            http_eventually(port, id).await;
        }
        // No restart happened: exactly one start event each.
        for id in &ids {
            let events = agent.machine_events(APP, id).await.unwrap();
            let starts = events.iter().filter(|e| e.kind == "start").count();
            assert_eq!(starts, 1, "machine {id}: {events:#?}");
        }
        ops_drained(&data).await;
        let t = Instant::now();
        destroy_all_and_check(&agent, &store, &data).await;
        eprintln!(
            "{N} machines: booted in {booted:.1?}, agent re-opened in {reopened:.1?}, destroyed in {:.1?}",
            t.elapsed()
        );
        for p in &pids {
            assert!(!alive(*p), "QEMU {p} survived destroy");
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
}

/// A VM killed while its agent is down is noticed when the agent comes back: policy
/// `always` boots it again, policy `no` leaves it stopped.
#[test]
fn vm_dead_while_agent_down_follows_restart_policy() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let shared = Shared::new(work.path());
    let data = shared.data_dir("policy");
    let _reaper = Reaper(data.clone());
    let mut ids = BTreeMap::new();
    for policy in ["always", "no"] {
        let mut env = shared.env();
        env.push((CHILD_POLICY, policy));
        let run = run_child(&data, "create", &env, None);
        child_ok(&run, "create");
        ids.insert(policy, child_ids(&run).pop().unwrap());
    }
    // The agent is down (its process exited); kill -9 both QEMUs.
    let mut old = BTreeMap::new();
    for (policy, id) in &ids {
        let pid = qemu_pid(&data, id).unwrap();
        let p = rustix::process::Pid::from_raw(pid).unwrap();
        rustix::process::kill_process(p, rustix::process::Signal::KILL).unwrap();
        old.insert(*policy, pid);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while old.values().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "QEMU survived SIGKILL");
        std::thread::sleep(Duration::from_millis(10));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (agent, store) = open_agent(&data).await;
        let always = &ids["always"];
        let no = &ids["no"];
        wait_state(&agent, no, "stopped").await;
        // `always` goes stopped → starting → started (after its backoff).
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let m = agent.get_machine(APP, always).await.unwrap();
            if m.state == MachineState::Started && qemu_pid(&data, always) != Some(old["always"]) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "machine {always} not restarted: {:?}",
                m.state
            );
            wait_state(&agent, always, "started").await;
        }
        let pid = qemu_pid(&data, always).unwrap();
        assert!(alive(pid));
        let port = forward_port(&store, always).await;
        http_eventually(port, always).await;
        let events = agent.machine_events(APP, always).await.unwrap();
        assert!(
            events.iter().any(|e| e.kind == "exit"),
            "no exit event: {events:#?}"
        );
        assert!(
            events.iter().any(|e| e.kind == "restart"),
            "no restart event: {events:#?}"
        );
        assert!(processes_naming(&machine_dir(&data, no)).is_empty());
        assert_eq!(
            catalog_record(&store, no).await.unwrap().machine.state,
            MachineState::Stopped
        );
        ops_drained(&data).await;
        destroy_all_and_check(&agent, &store, &data).await;
    });
    rt.shutdown_timeout(Duration::from_secs(5));
}
