//! `cargo xtask fuzz-api`: drive Fly's Machines OpenAPI document (and our own
//! `/v1/openapi.json`) against a freshly started `aloft dev` with schemathesis, a
//! property-based API fuzzer, and report every 5xx and every response that does not
//! match the document. Exits non-zero when any 5xx (or fuzzer error) was seen.
//!
//! schemathesis lives in a venv under `target/fuzz-venv` (installed once, pinned);
//! `aloft dev` runs in a temporary data directory and is stopped on every exit path.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::Args;

use crate::util::{step, workspace_root};

/// Pinned fuzzer: schemathesis 3.x with the hypothesis release it was built against
/// (newer hypothesis breaks 3.39's strategies with "'many' object has no attribute 'more'").
const PINS: &[&str] = &["schemathesis==3.39.16", "hypothesis==6.130.13"];

/// Checks every response is put through (schemathesis 3.x names).
const CHECKS: &str = "not_a_server_error,response_schema_conformance";

/// The app every `{app_name}` path parameter is set to, created before the run.
const APP: &str = "fuzz";

#[derive(Args, Debug)]
pub struct FuzzArgs {
    /// Examples generated per API operation.
    #[arg(long, default_value_t = 10)]
    pub max_examples: u32,
    /// Wall-clock bound for all fuzzer runs together (seconds).
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
    /// Leave machine creation out (random configs; their image pulls fail fast offline).
    #[arg(long)]
    pub no_machine_create: bool,
    /// Skip the runs against a real, booted machine (`{machine_id}` operations).
    #[arg(long)]
    pub no_machine: bool,
    /// Checks to run (schemathesis names; 5xx and schema conformance by default, e.g.
    /// add status_code_conformance,content_type_conformance for undocumented answers).
    #[arg(long, default_value = CHECKS)]
    pub checks: String,
    /// Hypothesis seed, to replay a run.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// `aloft dev` in a temporary data directory; stopped (SIGINT, then SIGKILL, then any
/// stray process naming the directory) when dropped.
struct Dev {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // QEMU processes run in their own sessions; they name the data directory.
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &self.dir.path().display().to_string()])
            .status();
    }
}

/// One schemathesis invocation.
struct Run {
    name: &'static str,
    schema: String,
    extra: Vec<String>,
}

/// One failed check, kept once per (run, operation, check).
struct Finding {
    run: &'static str,
    operation: String,
    check: String,
    status: Option<u64>,
    repro: String,
    response: String,
    message: String,
}

#[derive(Default)]
struct Tally {
    operations: u64,
    /// Documented operations our router does not serve (404 "no such API route" or 405).
    unimplemented: std::collections::BTreeSet<String>,
    findings: Vec<Finding>,
    errors: Vec<String>,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    let repo = workspace_root();
    let started = Instant::now();
    let st = install_schemathesis(&repo)?;

    step("building aloft (debug) and the guest init");
    crate::util::cargo(&["build", "-p", "aloft"], &[])?;
    crate::setup::build_guest_init()?;

    let spec = repo.join("../shared/fly/machines-openapi.json");
    if !spec.exists() {
        bail!(
            "Fly's Machines OpenAPI document is missing: {}",
            spec.display()
        );
    }
    let out_dir = repo.join("target/fuzz-api");
    std::fs::create_dir_all(&out_dir)?;

    let dev = start_dev(&repo)?;
    if !args.no_machine {
        step("importing the hello image for a real machine");
        let layout = crate::demo::build_hello_layout(&repo, &dev.dir.path().join("hello"))?;
        crate::util::run(
            Command::new(repo.join("target/debug/aloft"))
                .arg("--data-dir")
                .arg(dev.dir.path())
                .args(["image", "import", "--json"])
                .arg(&layout)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
    }
    let (api_url, token) = wait_dev_json(&dev)?;
    step(&format!("creating app {APP:?} for path parameters"));
    let (status, body) = http(
        &api_url,
        "POST",
        "/v1/apps",
        &token,
        &format!(r#"{{"app_name":"{APP}","org_slug":"personal"}}"#),
    )?;
    if status != 201 {
        bail!("creating app {APP} answered {status}: {body}");
    }

    let machine = if args.no_machine {
        None
    } else {
        step("creating one real machine (hello:v1) for {machine_id} parameters");
        let (status, body) = http(
            &api_url,
            "POST",
            &format!("/v1/apps/{APP}/machines"),
            &token,
            r#"{"region":"local","config":{"image":"hello:v1","guest":{"cpus":1,"memory_mb":256}}}"#,
        )?;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        match (status, v["id"].as_str()) {
            (200 | 201, Some(id)) => Some(id.to_string()),
            _ => bail!("creating a machine answered {status}: {body}"),
        }
    };

    let mut common_excludes = vec!["--exclude-operation-id".to_string(), "Apps_delete".into()];
    if args.no_machine_create {
        common_excludes.extend(["--exclude-operation-id".into(), "Machines_create".into()]);
    }
    let set_paths: Vec<String> = [
        "--set-path",
        &format!("app_name={APP}"),
        "--set-path",
        "org_slug=personal",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut runs = vec![
        Run {
            name: "fly",
            schema: spec.display().to_string(),
            extra: [set_paths.clone(), common_excludes.clone()].concat(),
        },
        // Deleting apps with random names only (the fuzz app must survive the other runs).
        Run {
            name: "fly-delete-app",
            schema: spec.display().to_string(),
            extra: vec!["--include-operation-id".into(), "Apps_delete".into()],
        },
        Run {
            name: "own",
            schema: format!("{api_url}/v1/openapi.json"),
            extra: [
                set_paths.clone(),
                common_excludes,
                vec!["--experimental".into(), "openapi-3.1".into()],
            ]
            .concat(),
        },
    ];
    if let Some(id) = &machine {
        // Every {machine_id} operation against the live machine, except destroying it;
        // leases in a pass of their own, since a held lease turns the rest into 409s.
        let on_machine = [
            set_paths.clone(),
            vec![
                "--set-path".into(),
                format!("machine_id={id}"),
                // `wait` otherwise blocks for Fly's default 60 s per example.
                "--set-query".into(),
                "timeout=1".into(),
            ],
        ]
        .concat();
        let lease_ops = [
            "Machines_show_lease",
            "Machines_create_lease",
            "Machines_release_lease",
        ];
        let mut extra = on_machine.clone();
        extra.extend(["--include-path-regex".into(), r"\{machine_id\}".into()]);
        for op in lease_ops.iter().chain(&["Machines_delete"]) {
            extra.extend(["--exclude-operation-id".to_string(), op.to_string()]);
        }
        runs.push(Run {
            name: "fly-machine",
            schema: spec.display().to_string(),
            extra,
        });
        let mut extra = on_machine;
        for op in lease_ops {
            extra.extend(["--include-operation-id".to_string(), op.to_string()]);
        }
        runs.push(Run {
            name: "fly-machine-lease",
            schema: spec.display().to_string(),
            extra,
        });
    }

    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut tally = Tally::default();
    for r in &runs {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            tally
                .errors
                .push(format!("{}: not run, wall-clock bound reached", r.name));
            continue;
        }
        step(&format!(
            "schemathesis run {} ({} examples per operation, {} s left)",
            r.name,
            args.max_examples,
            remaining.as_secs()
        ));
        let debug = out_dir.join(format!("{}.jsonl", r.name));
        let log = out_dir.join(format!("{}.log", r.name));
        let _ = std::fs::remove_file(&debug);
        let mut cmd = Command::new(&st);
        cmd.arg("run")
            .arg(&r.schema)
            .args(["--base-url", &format!("{api_url}/v1")])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["--checks", &args.checks])
            .args(["--hypothesis-max-examples", &args.max_examples.to_string()])
            .args(["--request-timeout", "20000", "--workers", "1", "--no-color"])
            .args(["--hypothesis-suppress-health-check", "all"])
            .arg("--debug-output-file")
            .arg(&debug)
            .args(&r.extra)
            .env("SCHEMATHESIS_TELEMETRY", "false")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::from(std::fs::File::create(
                log.with_extension("err"),
            )?));
        if let Some(seed) = args.seed {
            cmd.args(["--hypothesis-seed", &seed.to_string()]);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", st.display()))?;
        let timed_out = wait_bounded(&mut child, remaining)?;
        if timed_out {
            tally.errors.push(format!(
                "{}: killed at the wall-clock bound; results so far are counted",
                r.name
            ));
        }
        let before = tally.findings.len();
        parse_debug(r.name, &debug, &mut tally)
            .with_context(|| format!("reading {}", debug.display()))?;
        println!(
            "    {}: {} failed checks, log {}",
            r.name,
            tally.findings.len() - before,
            log.display()
        );
    }
    drop(dev);

    print_summary(&tally, started.elapsed());
    let server_errors = count(&tally, "not_a_server_error");
    let nonconforming = count(&tally, "response_schema_conformance");
    println!(
        "{}",
        serde_json::json!({
            "check": "api_fuzz",
            "operations": tally.operations,
            "server_errors": server_errors,
            "nonconforming": nonconforming,
            "fuzzer_errors": tally.errors.len(),
            "unimplemented": tally.unimplemented.len(),
            "seconds": started.elapsed().as_secs(),
        })
    );
    if server_errors > 0 {
        bail!("{server_errors} operations answered with a 5xx");
    }
    if !tally.errors.is_empty() {
        bail!("{} fuzzer errors", tally.errors.len());
    }
    Ok(())
}

/// Number of distinct (run, operation) pairs failing `check`.
fn count(tally: &Tally, check: &str) -> usize {
    tally.findings.iter().filter(|f| f.check == check).count()
}

/// Create `target/fuzz-venv` and install the pinned fuzzer unless already there.
fn install_schemathesis(repo: &Path) -> Result<PathBuf> {
    let venv = repo.join("target/fuzz-venv");
    let st = venv.join("bin/st");
    let marker = venv.join("aloft-pins.txt");
    let want = PINS.join("\n");
    if st.exists() && std::fs::read_to_string(&marker).ok().as_deref() == Some(&want) {
        println!("    schemathesis: present in {}", venv.display());
        return Ok(st);
    }
    step(&format!(
        "installing {} into {}",
        PINS.join(" "),
        venv.display()
    ));
    if !venv.join("bin/pip").exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("running python3 -m venv")?
            .success();
        if !ok {
            // Debian splits ensurepip into python3-venv.
            crate::util::run(Command::new("apt-get").args(["install", "-y", "python3-venv"]))?;
            let _ = std::fs::remove_dir_all(&venv);
            crate::util::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        }
    }
    crate::util::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .args(PINS),
    )?;
    std::fs::write(&marker, want)?;
    Ok(st)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_dev(repo: &Path) -> Result<Dev> {
    let dir = tempfile::Builder::new().prefix("aloft-fuzz-").tempdir()?;
    let kernel = std::env::var_os("ALOFT_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/aloft/kernel"));
    if !kernel.join("kernel.json").exists() {
        bail!(
            "no guest kernel in {} (run `cargo xtask setup` or set ALOFT_KERNEL_DIR)",
            kernel.display()
        );
    }
    std::os::unix::fs::symlink(&kernel, dir.path().join("kernel"))?;
    let api = format!("127.0.0.1:{}", free_port()?);
    let proxy = format!("127.0.0.1:{}", free_port()?);
    step(&format!(
        "starting aloft dev in {} (API {api}, proxy {proxy})",
        dir.path().display()
    ));
    let log = std::fs::File::create(dir.path().join("dev.log"))?;
    let child = Command::new(repo.join("target/debug/aloft"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["dev", "--api-listen", &api, "--proxy-listen", &proxy])
        .env("ALOFT_INIT_BIN", crate::setup::guest_init_path())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting aloft dev")?;
    Ok(Dev { child, dir })
}

fn wait_dev_json(dev: &Dev) -> Result<(String, String)> {
    let path = dev.dir.path().join("dev.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let (Some(url), Some(token)) = (v["api_url"].as_str(), v["token"].as_str())
        {
            return Ok((url.to_string(), token.to_string()));
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dev.dir.path().join("dev.log")).unwrap_or_default();
            bail!("aloft dev wrote no {} within 60 s:\n{log}", path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Minimal HTTP/1.1 request with a JSON body; returns status and body.
fn http(base: &str, method: &str, path: &str, token: &str, body: &str) -> Result<(u16, String)> {
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in answer to {method} {path}"))?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

/// Wait for `child` up to `bound`; kill it past that. Returns whether it was killed.
fn wait_bounded(child: &mut Child, bound: Duration) -> Result<bool> {
    let deadline = Instant::now() + bound;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn b64(v: &serde_json::Value) -> Option<String> {
    let s = v.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn shorten(s: &str, n: usize) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() <= n {
        s
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Read schemathesis' debug event stream: operation count, failed checks, errors.
fn parse_debug(run: &'static str, path: &Path, tally: &mut Tally) -> Result<()> {
    let text = std::fs::read_to_string(path)?;
    let mut seen: BTreeMap<(String, String), ()> = BTreeMap::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match e["event_type"].as_str() {
            Some("Finished") => {
                for g in e["generic_errors"].as_array().into_iter().flatten() {
                    tally
                        .errors
                        .push(format!("{run}: {}", shorten(&g.to_string(), 300)));
                }
            }
            Some("AfterExecution") => {
                tally.operations += 1;
                let result = &e["result"];
                let op = result["verbose_name"].as_str().unwrap_or("?").to_string();
                for err in result["errors"].as_array().into_iter().flatten() {
                    let msg = err["exception"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| err.to_string());
                    tally
                        .errors
                        .push(format!("{run}: {op}: {}", shorten(&msg, 300)));
                }
                for c in result["checks"].as_array().into_iter().flatten() {
                    let status = c["response"]["status_code"].as_u64();
                    let body = b64(&c["response"]["body"]).unwrap_or_default();
                    if status == Some(405) || body.contains("no such API route") {
                        tally.unimplemented.insert(op.clone());
                    }
                    if c["value"] != "failure" {
                        continue;
                    }
                    let check = c["name"].as_str().unwrap_or("?").to_string();
                    if seen.insert((op.clone(), check.clone()), ()).is_some() {
                        continue;
                    }
                    let ex = &c["example"];
                    let mut repro = format!(
                        "curl -X {} {} -H \"Authorization: Bearer $TOKEN\"",
                        ex["method"].as_str().unwrap_or("GET"),
                        shell_quote(ex["url"].as_str().unwrap_or("?"))
                    );
                    if let Some(body) = c["request"]["body"]
                        .as_str()
                        .and_then(|_| b64(&c["request"]["body"]))
                    {
                        repro.push_str(&format!(
                            " -H 'Content-Type: application/json' --data-binary {}",
                            shell_quote(&shorten(&body, 400))
                        ));
                    }
                    let resp = &c["response"];
                    tally.findings.push(Finding {
                        run,
                        operation: op.clone(),
                        check,
                        status: resp["status_code"].as_u64(),
                        repro,
                        response: shorten(&b64(&resp["body"]).unwrap_or_default(), 300),
                        message: shorten(c["message"].as_str().unwrap_or(""), 400),
                    });
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn print_summary(tally: &Tally, elapsed: Duration) {
    step(&format!(
        "API fuzz summary: {} operations in {} s",
        tally.operations,
        elapsed.as_secs()
    ));
    let mut by_check: BTreeMap<&str, Vec<&Finding>> = BTreeMap::new();
    for f in &tally.findings {
        by_check.entry(f.check.as_str()).or_default().push(f);
    }
    if by_check.is_empty() {
        println!("    no failed checks");
    }
    for (check, findings) in &by_check {
        println!("  {check}: {} operations", findings.len());
        for f in findings {
            println!(
                "    [{}] {} -> {}",
                f.run,
                f.operation,
                f.status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into())
            );
            println!("        {}", f.repro);
            if !f.response.is_empty() {
                println!("        response: {}", f.response);
            }
            if !f.message.is_empty() && f.message != "Server error" {
                println!("        {}", f.message);
            }
        }
    }
    for op in &tally.unimplemented {
        println!("  not served (404 no such API route / 405): {op}");
    }
    for e in &tally.errors {
        println!("  fuzzer error: {e}");
    }
}
