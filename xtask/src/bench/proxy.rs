//! `cargo xtask bench proxy`: aloft's edge proxy against nginx and HAProxy, all in one
//! run, in front of the same keep-alive backend (nginx `return 200`).
//!
//! Throughput: `wrk -t1 -c50 -d5s`, three interleaved rounds per target, median
//! kept. Latency: p50/p99 from our own open-loop client (`aloft-proxy`'s
//! `fixed_rate` example, release build) at a fixed rate of half of nginx's maximum, measured from each request's scheduled send time (so a stall
//! counts against the proxy, not hidden by it). With two or more CPUs the load
//! generator runs on CPU 0 and the backend and proxy under test share CPU 1, so the
//! proxy's cost per request decides the result. Every proxy adds the same forwarding
//! headers (X-Forwarded-For/Proto/Port, a request id). All processes are killed at
//! the end, on error too.
//!
//! HTTP/2: `h2load -c50 -m10 -D5` with prior knowledge over cleartext (h2c) against
//! nginx (`listen … http2`), HAProxy (`bind … proto h2`) and aloft's plain port
//! (which takes h2c by its preface), each proxying to the same HTTP/1.1 backend;
//! three interleaved rounds, median req/s and server CPU µs per request. Then new
//! TLS connections per second (see `tls_rounds`).

use std::fmt::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{cargo, have, output, step, workspace_root};

const ROUNDS: usize = 3;
const CONNECTIONS: usize = 50;
const WRK_SECS: u64 = 5;
const RATE_SECS: u64 = 4;
/// h2load: connections, concurrent streams per connection, seconds.
const H2_CONNECTIONS: usize = 50;
const H2_STREAMS: usize = 10;
const H2_SECS: u64 = 5;

/// Child processes killed (and reaped) when dropped.
#[derive(Default)]
struct Procs(Vec<(String, Child)>);

impl Procs {
    fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> Result<()> {
        let out =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("could not start {name}: {cmd:?}"))?;
        self.0.push((name.to_string(), child));
        Ok(())
    }

    /// Fail with the log of any child that already exited.
    fn check(&mut self, dir: &Path) -> Result<()> {
        for (name, child) in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                let log =
                    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
                bail!("{name} exited early ({status}):\n{log}");
            }
        }
        Ok(())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Clone)]
struct Target {
    name: &'static str,
    port: u16,
}

#[derive(Default, Clone)]
struct Figures {
    rps: Vec<f64>,
    /// The server's CPU (user + system) per request in a throughput round, µs.
    cpu_us: Vec<f64>,
    p50_ms: Vec<f64>,
    p99_ms: Vec<f64>,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, procs: &mut Procs, dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        procs.check(dir)?;
        if Instant::now() > deadline {
            bail!(
                "nothing listens on 127.0.0.1:{port} after 10 s (see logs in {})",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `taskset -c CPU cmd…` when pinning, else `cmd…`.
fn pinned(cpu: Option<usize>, program: &Path, args: &[&str]) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(program).args(args);
            cmd
        }
        None => {
            let mut cmd = Command::new(program);
            cmd.args(args);
            cmd
        }
    }
}

fn nginx_common(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {d}/{name}-error.log warn;\n\
         pid {d}/{name}.pid;\nevents {{ worker_connections 8192; }}\n"
    )
}

fn nginx_http_common(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "access_log off;\nkeepalive_requests 10000000;\nkeepalive_timeout 60s;\n\
         client_body_temp_path {d}/t-body;\nproxy_temp_path {d}/t-proxy;\nfastcgi_temp_path {d}/t-fcgi;\n\
         uwsgi_temp_path {d}/t-uwsgi;\nscgi_temp_path {d}/t-scgi;\n"
    )
}

fn start_nginx(
    procs: &mut Procs,
    dir: &Path,
    name: &str,
    conf: &str,
    cpu: Option<usize>,
) -> Result<()> {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf)?;
    let p = path.display().to_string();
    let prefix = format!("{}/", dir.display());
    let cmd = pinned(
        cpu,
        Path::new("nginx"),
        &[
            "-p",
            &prefix,
            "-e",
            &format!("{prefix}{name}-error.log"),
            "-c",
            &p,
        ],
    );
    procs.spawn(name, cmd, &dir.join(format!("{name}.log")))
}

/// Requests/s and requests completed in one wrk run; fails on socket errors or
/// non-2xx answers.
fn wrk(port: u16, cpu: Option<usize>) -> Result<(f64, f64)> {
    let url = format!("http://127.0.0.1:{port}/");
    let secs = format!("{WRK_SECS}s");
    let conns = CONNECTIONS.to_string();
    let out = output(&mut pinned(
        cpu,
        Path::new("wrk"),
        &["-t1", "-c", &conns, "-d", &secs, "--latency", &url],
    ))?;
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        bail!("wrk against {url} saw errors:\n{out}");
    }
    wrk_figures(&out)
}

/// Requests/s and requests completed, from wrk's output.
fn wrk_figures(out: &str) -> Result<(f64, f64)> {
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{out}"))?;
    // "  123456 requests in 5.00s, …"
    let done = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse::<f64>().ok())
        .with_context(|| format!("no request count in wrk output:\n{out}"))?;
    Ok((rps, done))
}

/// CPU µs per unit of work from a process's clock ticks before and after `done`
/// units (ticks are 10 ms, USER_HZ 100); NaN without both readings or without work.
fn cpu_us_each(before: Option<u64>, after: Option<u64>, done: f64) -> f64 {
    match (before, after) {
        (Some(b), Some(a)) if done > 0.0 => (a - b) as f64 * 10_000.0 / done,
        _ => f64::NAN,
    }
}

/// p50/p99 (ms) from the release-built open-loop client (`aloft-proxy`'s
/// `fixed_rate` example) at `rate` requests/s; fails unless it kept up with the rate.
fn fixed_rate(
    client: &Path,
    port: u16,
    rate: f64,
    secs: u64,
    cpu: Option<usize>,
) -> Result<(f64, f64)> {
    let addr = format!("127.0.0.1:{port}");
    let out = output(&mut pinned(
        cpu,
        client,
        &[
            &addr,
            &format!("{rate}"),
            &secs.to_string(),
            &CONNECTIONS.to_string(),
        ],
    ))?;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("fixed_rate printed {out:?}"))?;
    let get = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("fixed_rate output lacks {k}: {out}"))
    };
    let achieved = get("achieved_rps")?;
    if achieved < rate * 0.9 {
        bail!("fixed-rate client reached only {achieved:.0} of {rate:.0} req/s on {addr}");
    }
    Ok((get("p50_ms")?, get("p99_ms")?))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

pub fn run() -> Result<()> {
    for bin in ["wrk", "nginx", "haproxy", "h2load"] {
        if !have(bin) {
            bail!("`{bin}` is not installed: run `cargo xtask setup` first");
        }
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = cpus >= 2 && have("taskset");
    let (load_cpu, server_cpu) = if pin {
        (Some(0), Some(1))
    } else {
        (None, None)
    };

    // ALOFT_BIN runs an already built binary (e.g. from a clean checkout) instead.
    let aloft = match std::env::var_os("ALOFT_BIN") {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            step("building aloft (release)");
            cargo(&["build", "--release", "-q", "-p", "aloft"], &[])?;
            workspace_root().join("target/release/aloft")
        }
    };
    cargo(
        &[
            "build",
            "--release",
            "-q",
            "-p",
            "aloft-proxy",
            "--example",
            "fixed_rate",
        ],
        &[],
    )?;
    let client = workspace_root().join("target/release/examples/fixed_rate");

    let tmp = tempfile::Builder::new()
        .prefix("aloft-bench-proxy")
        .tempdir()?;
    let dir = tmp.path().to_path_buf();
    let mut procs = Procs::default();
    let result = bench(&mut procs, &dir, &aloft, &client, load_cpu, server_cpu);
    drop(procs);
    result
}

fn bench(
    procs: &mut Procs,
    dir: &Path,
    aloft: &Path,
    client: &Path,
    load_cpu: Option<usize>,
    server_cpu: Option<usize>,
) -> Result<()> {
    let backend = free_port()?;
    let nginx_port = free_port()?;
    let haproxy_port = free_port()?;
    let aloft_port = free_port()?;
    let (nginx_h2, haproxy_h2) = (free_port()?, free_port()?);

    step(&format!(
        "starting backend and proxies (load on CPU {}, servers on CPU {})",
        load_cpu.map_or("any".into(), |c| c.to_string()),
        server_cpu.map_or("any".into(), |c| c.to_string())
    ));
    let backend_conf = format!(
        "{}http {{\n{}server {{ listen 127.0.0.1:{backend}; location / {{ return 200 \"hello\\n\"; }} }}\n}}\n",
        nginx_common(dir, "backend"),
        nginx_http_common(dir)
    );
    start_nginx(procs, dir, "backend", &backend_conf, server_cpu)?;

    // The same location twice: HTTP/1.1 on one port, h2c (prior knowledge) on another.
    // The idle upstream cache (`keepalive`) holds more than h2load's 500 concurrent
    // streams, else nginx closes and reopens backend connections all the time
    // (measured: 13k against 19k req/s); the HTTP/1 phase never has more than 50.
    let location = "location / { proxy_pass http://app; proxy_http_version 1.1;\n\
         proxy_set_header Connection \"\"; proxy_set_header Host $host;\n\
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme;\n\
         proxy_set_header X-Forwarded-Port $server_port; proxy_set_header X-Request-Id $request_id; }";
    let nginx_conf = format!(
        "{}http {{\n{}upstream app {{ server 127.0.0.1:{backend}; keepalive 1024; keepalive_requests 10000000; }}\n\
         server {{ listen 127.0.0.1:{nginx_port};\n {location} }}\n\
         server {{ listen 127.0.0.1:{nginx_h2} http2;\n {location} }}\n}}\n",
        nginx_common(dir, "nginx"),
        nginx_http_common(dir)
    );
    start_nginx(procs, dir, "nginx", &nginx_conf, server_cpu)?;

    let haproxy_conf = format!(
        "global\n  nbthread 1\n  maxconn 4000\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         option http-keep-alive\n  http-reuse always\n\
         frontend fe\n  bind 127.0.0.1:{haproxy_port}\n  option forwardfor\n\
         http-request set-header X-Forwarded-Proto http\n  http-request set-header X-Forwarded-Port %[dst_port]\n\
         unique-id-format %{{+X}}o%ci%cp%fi%fp%Ts%rt\n  http-request set-header X-Request-Id %[unique-id]\n\
         default_backend be\n\
         frontend fe_h2\n  bind 127.0.0.1:{haproxy_h2} proto h2\n  option forwardfor\n\
         http-request set-header X-Forwarded-Proto http\n  http-request set-header X-Forwarded-Port %[dst_port]\n\
         unique-id-format %{{+X}}o%ci%cp%fi%fp%Ts%rt\n  http-request set-header X-Request-Id %[unique-id]\n\
         default_backend be\n\
         backend be\n  server app 127.0.0.1:{backend} maxconn 1000\n"
    );
    let hconf = dir.join("haproxy.cfg");
    std::fs::write(&hconf, haproxy_conf)?;
    procs.spawn(
        "haproxy",
        pinned(
            server_cpu,
            Path::new("haproxy"),
            &["-db", "-f", &hconf.display().to_string()],
        ),
        &dir.join("haproxy.log"),
    )?;

    let routes = format!(
        "[[apps]]\nname = \"bench\"\nhostnames = [\"*\"]\n[[apps.services]]\ninternal_port = {backend}\n\
         ports = [{{ port = {aloft_port}, handlers = [\"http\"] }}]\n\
         concurrency = {{ type = \"requests\", soft_limit = 1000, hard_limit = 2000 }}\n\
         [[apps.machines]]\nid = \"m1\"\nregion = \"bench\"\naddress = \"127.0.0.1\"\nstate = \"started\"\n"
    );
    let rfile = dir.join("routes.toml");
    std::fs::write(&rfile, routes)?;
    let listen = format!("127.0.0.1:{aloft_port}");
    let rpath = rfile.display().to_string();
    let mut cmd = pinned(
        server_cpu,
        aloft,
        &[
            "proxy",
            "--listen",
            &listen,
            "--routes",
            &rpath,
            "--threads",
            "1",
            "--region",
            "bench",
        ],
    );
    cmd.env("ALOFT_LOG", "error");
    procs.spawn("aloft", cmd, &dir.join("aloft.log"))?;

    for port in [
        backend,
        nginx_port,
        haproxy_port,
        aloft_port,
        nginx_h2,
        haproxy_h2,
    ] {
        wait_port(port, procs, dir)?;
    }

    let targets = [
        Target {
            name: "direct",
            port: backend,
        },
        Target {
            name: "nginx",
            port: nginx_port,
        },
        Target {
            name: "haproxy",
            port: haproxy_port,
        },
        Target {
            name: "aloft",
            port: aloft_port,
        },
    ];
    let mut figs = vec![Figures::default(); targets.len()];
    // The process whose CPU each target costs ("direct" is the backend itself).
    let server_pid = |name: &str| {
        let proc_name = if name == "direct" { "backend" } else { name };
        procs
            .0
            .iter()
            .find(|(n, _)| n == proc_name)
            .map(|(_, c)| c.id())
    };
    let pids: Vec<Option<u32>> = targets.iter().map(|t| server_pid(t.name)).collect();

    // Warm-up: fill every pool.
    for t in &targets {
        fixed_rate(client, t.port, 2000.0, 1, load_cpu)
            .with_context(|| format!("warm-up of {}", t.name))?;
    }

    for round in 1..=ROUNDS {
        step(&format!(
            "throughput round {round}/{ROUNDS}: wrk -t1 -c{CONNECTIONS} -d{WRK_SECS}s"
        ));
        for ((t, f), pid) in targets.iter().zip(&mut figs).zip(&pids) {
            let before = pid.map(cpu_ticks).transpose()?;
            let (rps, done) =
                wrk(t.port, load_cpu).with_context(|| format!("wrk against {}", t.name))?;
            let after = pid.map(cpu_ticks).transpose()?;
            let us = cpu_us_each(before, after, done);
            println!(
                "    {:<8} {:>10.0} req/s  {:>6.1} µs CPU/req",
                t.name, rps, us
            );
            f.rps.push(rps);
            f.cpu_us.push(us);
            procs.check(dir)?;
        }
    }
    let nginx_rps = median(&figs[1].rps);
    let rate = (nginx_rps / 2.0).max(100.0);

    for round in 1..=ROUNDS {
        step(&format!(
            "latency round {round}/{ROUNDS}: {rate:.0} req/s (half of nginx's max) for {RATE_SECS}s"
        ));
        for (t, f) in targets.iter().zip(&mut figs) {
            let (p50, p99) = fixed_rate(client, t.port, rate, RATE_SECS, load_cpu)
                .with_context(|| format!("fixed-rate load on {}", t.name))?;
            println!("    {:<8} p50 {:>7.3} ms  p99 {:>7.3} ms", t.name, p50, p99);
            f.p50_ms.push(p50);
            f.p99_ms.push(p99);
            procs.check(dir)?;
        }
    }

    let nginx_p99 = median(&figs[1].p99_ms);
    let nginx_cpu = median(&figs[1].cpu_us);
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\n{:<8} {:>10} {:>9} {:>11} {:>9} {:>9} {:>13}",
        "target", "req/s", "vs nginx", "CPU µs/req", "p50 ms", "p99 ms", "p99 vs nginx"
    );
    let mut json = Vec::new();
    for (t, f) in targets.iter().zip(&figs) {
        let rps = median(&f.rps);
        let cpu_us = median(&f.cpu_us);
        let (p50, p99) = (median(&f.p50_ms), median(&f.p99_ms));
        let ratio = rps / nginx_rps;
        let _ = writeln!(
            table,
            "{:<8} {:>10.0} {:>8.2}x {:>11.1} {:>9.3} {:>9.3} {:>12.2}x",
            t.name,
            rps,
            ratio,
            cpu_us,
            p50,
            p99,
            p99 / nginx_p99
        );
        json.push(serde_json::json!({
            "bench": "proxy",
            "target": t.name,
            "rps": (rps * 10.0).round() / 10.0,
            "p50_ms": (p50 * 1000.0).round() / 1000.0,
            "p99_ms": (p99 * 1000.0).round() / 1000.0,
            "ratio_vs_nginx": (ratio * 1000.0).round() / 1000.0,
            "cpu_us_per_req": (cpu_us * 10.0).round() / 10.0,
            "cpu_ratio_vs_nginx": (cpu_us / nginx_cpu * 1000.0).round() / 1000.0,
            "fixed_rate_rps": rate.round(),
        }));
    }
    println!("{table}");
    println!(
        "(median of {ROUNDS} interleaved rounds; latency at a fixed {rate:.0} req/s over {CONNECTIONS} connections)"
    );
    for j in json {
        println!("{j}");
    }
    let pid = |name: &str| procs.0.iter().find(|(n, _)| n == name).map(|(_, c)| c.id());
    let h2_targets = [
        ("nginx", nginx_h2, pid("nginx")),
        ("haproxy", haproxy_h2, pid("haproxy")),
        ("aloft", aloft_port, pid("aloft")),
    ];
    h2_rounds(procs, dir, &h2_targets, load_cpu)?;
    tls_rounds(procs, dir, aloft, backend, load_cpu, server_cpu)?;
    Ok(())
}

/// One h2load run (h2c, prior knowledge): requests/s and requests succeeded; fails
/// on any failed, errored or timed-out request and on 4xx/5xx answers.
fn h2load(port: u16, cpu: Option<usize>) -> Result<(f64, f64)> {
    let url = format!("http://127.0.0.1:{port}/");
    let (c, m, d) = (
        H2_CONNECTIONS.to_string(),
        H2_STREAMS.to_string(),
        H2_SECS.to_string(),
    );
    let args = ["-c", &c, "-m", &m, "-D", &d, &url];
    let out = output(&mut pinned(cpu, Path::new("h2load"), &args))?;
    // "requests: 9 total, 10 started, 9 done, 9 succeeded, 0 failed, 0 errored, 0 timeout"
    // "status codes: 9 2xx, 0 3xx, 0 4xx, 0 5xx"
    let counts = |prefix: &str| -> Option<Vec<(String, u64)>> {
        let line = out.lines().find_map(|l| l.trim().strip_prefix(prefix))?;
        line.split(',')
            .map(|part| {
                let (n, label) = part.trim().split_once(' ')?;
                Some((label.trim().to_string(), n.parse().ok()?))
            })
            .collect()
    };
    let get = |list: &[(String, u64)], label: &str| {
        list.iter()
            .find(|(l, _)| l == label)
            .map(|(_, n)| *n)
            .with_context(|| format!("no {label:?} count in h2load output:\n{out}"))
    };
    let requests = counts("requests:")
        .with_context(|| format!("no requests line in h2load output:\n{out}"))?;
    let status = counts("status codes:")
        .with_context(|| format!("no status codes line in h2load output:\n{out}"))?;
    let succeeded = get(&requests, "succeeded")?;
    let bad = get(&requests, "failed")?
        + get(&requests, "errored")?
        + get(&requests, "timeout")?
        + get(&status, "4xx")?
        + get(&status, "5xx")?;
    if bad > 0 || succeeded == 0 {
        bail!("h2load against {url} saw errors:\n{out}");
    }
    // "finished in 5.00s, 17394.50 req/s, 883.97KB/s"
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("finished in "))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim().strip_suffix(" req/s"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no req/s in h2load output:\n{out}"))?;
    Ok((rps, succeeded as f64))
}

/// h2: HTTP/2 throughput through each proxy (h2c from the client, HTTP/1.1 to the
/// backend), with each proxy process's CPU time per request from `/proc`.
fn h2_rounds(
    procs: &mut Procs,
    dir: &Path,
    targets: &[(&str, u16, Option<u32>)],
    load_cpu: Option<usize>,
) -> Result<()> {
    // Per target: requests/s, and server CPU µs per request.
    let mut figs = vec![(Vec::new(), Vec::new()); targets.len()];
    for round in 1..=ROUNDS {
        step(&format!(
            "HTTP/2 round {round}/{ROUNDS}: h2load -c{H2_CONNECTIONS} -m{H2_STREAMS} -D{H2_SECS} (h2c prior knowledge)"
        ));
        for ((name, port, pid), (rates, cpu)) in targets.iter().zip(&mut figs) {
            let before = pid.map(cpu_ticks).transpose()?;
            let (rps, done) =
                h2load(*port, load_cpu).with_context(|| format!("h2load against {name}"))?;
            let after = pid.map(cpu_ticks).transpose()?;
            let us = cpu_us_each(before, after, done);
            println!("    {name:<8} {rps:>10.0} req/s over HTTP/2  {us:>6.1} µs CPU each");
            rates.push(rps);
            cpu.push(us);
            procs.check(dir)?;
        }
    }
    let (nginx, nginx_us) = (median(&figs[0].0), median(&figs[0].1));
    println!(
        "\n{:<8} {:>10} {:>9} {:>11} {:>9}",
        "target", "h2 req/s", "vs nginx", "CPU µs/req", "vs nginx"
    );
    let mut json = Vec::new();
    for ((name, _, _), (rates, cpu)) in targets.iter().zip(&figs) {
        let (v, us) = (median(rates), median(cpu));
        println!(
            "{name:<8} {v:>10.0} {:>8.2}x {us:>11.1} {:>8.2}x",
            v / nginx,
            us / nginx_us
        );
        json.push(serde_json::json!({
            "bench": "proxy",
            "case": "h2_rps",
            "target": name,
            "rps": (v * 10.0).round() / 10.0,
            "ratio_vs_nginx": (v / nginx * 1000.0).round() / 1000.0,
            "cpu_us_per_req": (us * 10.0).round() / 10.0,
            "cpu_ratio_vs_nginx": (us / nginx_us * 1000.0).round() / 1000.0,
            "connections": H2_CONNECTIONS,
            "streams_per_connection": H2_STREAMS,
        }));
    }
    println!(
        "(median of {ROUNDS} interleaved rounds; {H2_CONNECTIONS} h2c connections × {H2_STREAMS} streams, {H2_SECS} s each)"
    );
    for j in json {
        println!("{j}");
    }
    Ok(())
}

/// tls: new TLS connections per second, aloft-proxy against nginx with the same
/// ECDSA P-256 certificate (for `localhost`), each connection one request then
/// closed (`wrk -H 'Connection: close'` over https), proxied to the same backend.
fn tls_rounds(
    procs: &mut Procs,
    dir: &Path,
    aloft: &Path,
    backend: u16,
    load_cpu: Option<usize>,
    server_cpu: Option<usize>,
) -> Result<()> {
    let (cert, key) = (dir.join("tls.pem"), dir.join("tls.key"));
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let make = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
                -subj /CN=localhost -addext subjectAltName=DNS:localhost";
    let mut openssl = Command::new("openssl");
    openssl
        .args(make.split_whitespace())
        .args(["-keyout", &k, "-out", &c]);
    output(&mut openssl).context("openssl could not make the benchmark certificate")?;
    let (nginx_tls, aloft_tls) = (free_port()?, free_port()?);
    let conf = format!(
        "{}http {{\n{}upstream app {{ server 127.0.0.1:{backend}; keepalive 128; }}\n\
         server {{ listen 127.0.0.1:{nginx_tls} ssl; ssl_certificate {c}; ssl_certificate_key {k};\n\
         location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme; }} }}\n}}\n",
        nginx_common(dir, "nginx-tls"),
        nginx_http_common(dir)
    );
    start_nginx(procs, dir, "nginx-tls", &conf, server_cpu)?;
    let routes = format!(
        "[[certs]]\nhostname = \"localhost\"\ncert = \"{c}\"\nkey = \"{k}\"\n\
         [[apps]]\nname = \"bench\"\nhostnames = [\"*\"]\n[[apps.services]]\ninternal_port = {backend}\n\
         ports = [{{ port = {aloft_tls}, handlers = [\"tls\", \"http\"] }}]\n\
         concurrency = {{ type = \"requests\", soft_limit = 1000, hard_limit = 2000 }}\n\
         [[apps.machines]]\nid = \"m1\"\nregion = \"bench\"\naddress = \"127.0.0.1\"\nstate = \"started\"\n"
    );
    let rfile = dir.join("routes-tls.toml");
    std::fs::write(&rfile, routes)?;
    let (listen, rpath) = (
        format!("127.0.0.1:{aloft_tls}"),
        rfile.display().to_string(),
    );
    let args = [
        "proxy",
        "--listen",
        &listen,
        "--routes",
        &rpath,
        "--threads",
        "1",
    ];
    let mut cmd = pinned(server_cpu, aloft, &args);
    cmd.env("ALOFT_LOG", "error");
    procs.spawn("aloft-tls", cmd, &dir.join("aloft-tls.log"))?;
    for port in [nginx_tls, aloft_tls] {
        wait_port(port, procs, dir)?;
    }
    let pid = |name: &str| procs.0.iter().find(|(n, _)| n == name).map(|(_, c)| c.id());
    let targets = [
        ("nginx", nginx_tls, pid("nginx-tls")),
        ("aloft", aloft_tls, pid("aloft-tls")),
    ];
    // Per target: connections/s, and server CPU µs per connection.
    let mut figs = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    for round in 1..=ROUNDS {
        step(&format!(
            "new TLS connections round {round}/{ROUNDS}: wrk -c{CONNECTIONS} -H 'Connection: close' over https"
        ));
        for ((name, port, pid), (rates, cpu)) in targets.iter().zip(&mut figs) {
            let url = format!("https://localhost:{port}/");
            let (secs, conns) = (format!("{WRK_SECS}s"), CONNECTIONS.to_string());
            let wrk_args = [
                "-t1",
                "-c",
                &conns,
                "-d",
                &secs,
                "-H",
                "Connection: close",
                &url,
            ];
            let before = pid.map(cpu_ticks).transpose()?;
            let out = output(&mut pinned(load_cpu, Path::new("wrk"), &wrk_args))?;
            let after = pid.map(cpu_ticks).transpose()?;
            if out.contains("Non-2xx") {
                bail!("wrk against {name} over TLS saw errors:\n{out}");
            }
            let (rps, done) = wrk_figures(&out)?;
            let us = cpu_us_each(before, after, done);
            println!("    {name:<8} {rps:>10.0} new TLS connections/s  {us:>6.0} µs CPU each");
            rates.push(rps);
            cpu.push(us);
            procs.check(dir)?;
        }
    }
    let (nginx, nginx_us) = (median(&figs[0].0), median(&figs[0].1));
    println!(
        "\n{:<8} {:>12} {:>9} {:>12} {:>9}",
        "target", "TLS conns/s", "vs nginx", "CPU µs/conn", "vs nginx"
    );
    for ((name, _, _), (rates, cpu)) in targets.iter().zip(&figs) {
        let (v, us) = (median(rates), median(cpu));
        println!(
            "{name:<8} {v:>12.0} {:>8.2}x {us:>12.0} {:>8.2}x",
            v / nginx,
            us / nginx_us
        );
        let j = serde_json::json!({
            "bench": "proxy-tls-handshakes",
            "target": name,
            "new_tls_conns_per_s": v.round(),
            "ratio_vs_nginx": (v / nginx * 1000.0).round() / 1000.0,
            "cpu_us_per_conn": us.round(),
            "cpu_ratio_vs_nginx": (us / nginx_us * 1000.0).round() / 1000.0,
        });
        println!("{j}");
    }
    Ok(())
}

/// User plus system CPU time of process `pid`, in clock ticks (`/proc/PID/stat`).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    match (tick(11), tick(12)) {
        (Some(u), Some(s)) => Ok(u + s),
        _ => bail!("unexpected /proc/{pid}/stat: {stat}"),
    }
}
