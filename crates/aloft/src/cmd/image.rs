//! `aloft image pull|import|ls|inspect|rm|gc`.
//!
//! `pull` and `import` always end with one JSON object on stdout describing the image
//! (`digest`, `rootfs`, `config`, `size_bytes`, …). Progress goes to stderr: bars on a
//! terminal, JSON events (one per line) with `--json`.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aloft_image::{
    Credentials, ImageRecord, ImageStore, Progress, ProgressFn, PullOptions, normalise_reference,
};
use aloft_types::datadir::DataDir;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Pull an image from a registry and build its ext4 base image.
    Pull(PullArgs),
    /// Import a `docker save` tarball or an OCI image layout (directory or tar).
    Import(ImportArgs),
    /// List cached images.
    Ls(JsonFlag),
    /// Show one cached image (by reference, digest or digest prefix).
    Inspect {
        /// Reference (name:tag) or image digest.
        image: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Remove a tag (or, given a digest, every tag of that image). `gc` frees space.
    Rm {
        /// Reference (name:tag) or image digest.
        image: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Remove untagged images and blobs nothing references.
    Gc(JsonFlag),
}

#[derive(Args, Debug)]
pub struct JsonFlag {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Image reference, e.g. `registry.example/app:1` or `127.0.0.1:5000/app@sha256:…`.
    pub reference: String,
    /// JSON progress events on stderr instead of progress bars.
    #[arg(long)]
    pub json: bool,
    /// Registry user name (the password is read from stdin with --password-stdin).
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the registry password from stdin.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Registry (host[:port]) to reach over plain HTTP. Repeatable. Loopback
    /// registries always may.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// Layers downloaded at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// `docker save` tarball, OCI layout directory, or tar of an OCI layout.
    pub path: PathBuf,
    /// Tag to record for the image (in addition to names inside the archive).
    #[arg(long)]
    pub tag: Option<String>,
    /// JSON progress events on stderr instead of progress bars.
    #[arg(long)]
    pub json: bool,
}

/// The one object `pull` and `import` print.
#[derive(Serialize)]
struct ImageOut<'a> {
    digest: &'a str,
    rootfs: &'a std::path::Path,
    config: &'a aloft_image::ImageConfig,
    size_bytes: u64,
    manifest_digest: Option<&'a str>,
    tags: Vec<String>,
    cached: bool,
}

fn image_out(rec: &ImageRecord, tags: Vec<String>, cached: bool) -> ImageOut<'_> {
    ImageOut {
        digest: &rec.digest,
        rootfs: &rec.rootfs,
        config: &rec.config,
        size_bytes: rec.size_bytes,
        manifest_digest: rec.manifest_digest.as_deref(),
        tags,
        cached,
    }
}

fn print_json(v: &impl Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

pub fn run(cmd: ImageCommand, data_dir: &DataDir) -> Result<ExitCode> {
    let store = ImageStore::open(data_dir.images_dir()).with_context(|| {
        format!(
            "opening the image cache in {}",
            data_dir.images_dir().display()
        )
    })?;
    match cmd {
        ImageCommand::Pull(args) => pull(&store, args),
        ImageCommand::Import(args) => import(&store, args),
        ImageCommand::Ls(f) => {
            let list = store.list()?;
            if f.json {
                print_json(&list)?;
            } else {
                println!("{:<50} {:<20} {:>10}", "TAG", "DIGEST", "SIZE");
                for r in &list {
                    let short = &r.digest[..r.digest.len().min(7 + 12)];
                    let size = format!("{} MiB", r.size_bytes >> 20);
                    if r.tags.is_empty() {
                        println!("{:<50} {short:<20} {size:>10}", "<none>");
                    }
                    for t in &r.tags {
                        println!("{t:<50} {short:<20} {size:>10}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Inspect { image, json } => {
            let rec = store.lookup(&image, normalise_reference(&image).as_deref())?;
            if json.json {
                print_json(&rec)?;
            } else {
                println!("{}", serde_json::to_string_pretty(&rec)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Rm { image, json } => {
            let removed = store.remove(&image, normalise_reference(&image).as_deref())?;
            if json.json {
                print_json(&serde_json::json!({ "untagged": removed }))?;
            } else {
                for t in removed {
                    println!("untagged {t}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Gc(f) => {
            // Tags keep images, and so does every machine of every agent in this data
            // directory (by the digest it boots from).
            let in_use: HashSet<String> = aloft_agent::images_in_use(data_dir.root())
                .map_err(|e| anyhow::anyhow!("cannot read the machines' images: {e}"))?;
            let report = store.gc(&in_use)?;
            if f.json {
                print_json(&report)?;
            } else {
                println!(
                    "removed {} image(s) and {} blob(s), freed {} MiB",
                    report.images_removed.len(),
                    report.blobs_removed,
                    report.bytes_freed >> 20
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn pull(store: &ImageStore, args: PullArgs) -> Result<ExitCode> {
    let credentials = match (&args.username, args.password_stdin) {
        (Some(u), true) => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from stdin")?;
            let password = password.trim_end_matches(['\n', '\r']).to_string();
            if password.is_empty() {
                bail!("--password-stdin: stdin was empty");
            }
            Credentials::Basic {
                username: u.clone(),
                password,
            }
        }
        _ => Credentials::DockerConfig,
    };
    let opts = PullOptions {
        credentials,
        insecure_registries: args.insecure_registries,
        concurrency: args.concurrency,
        ..Default::default()
    };
    let (progress, bars) = progress_sink(args.json);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(aloft_image::pull(store, &args.reference, &opts, progress));
    if let Some(b) = bars {
        b.clear();
    }
    let pulled = result?;
    print_json(&image_out(
        &pulled.record,
        vec![pulled.reference.clone()],
        pulled.cached,
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn import(store: &ImageStore, args: ImportArgs) -> Result<ExitCode> {
    let extra = match &args.tag {
        Some(t) => Some(normalise_reference(t).with_context(|| format!("invalid --tag {t:?}"))?),
        None => None,
    };
    let (progress, bars) = progress_sink(args.json);
    let result = aloft_image::import(store, &args.path, &progress);
    if let Some(b) = bars {
        b.clear();
    }
    let imported = result?;
    let mut tags = imported.tags;
    if let Some(t) = extra {
        store.tag(&t, &imported.record.digest, None)?;
        tags.push(t);
    }
    print_json(&image_out(&imported.record, tags, false))?;
    Ok(ExitCode::SUCCESS)
}

/// Handle to clear progress bars once done.
struct Bars(MultiProgress);

impl Bars {
    fn clear(&self) {
        let _ = self.0.clear();
    }
}

/// Progress to stderr: JSON lines (`--json`), bars on a terminal, else nothing.
fn progress_sink(json: bool) -> (ProgressFn, Option<Bars>) {
    if json {
        let last: Mutex<HashMap<String, Instant>> = Mutex::new(HashMap::new());
        let f: ProgressFn = Arc::new(move |p: &Progress| {
            if let Progress::LayerBytes { digest, .. } = p {
                let now = Instant::now();
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                let entry = last
                    .entry(digest.clone())
                    .or_insert(now - Duration::from_secs(1));
                if now.duration_since(*entry) < Duration::from_millis(250) {
                    return;
                }
                *entry = now;
            }
            if let Ok(line) = serde_json::to_string(p) {
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            }
        });
        return (f, None);
    }
    if !std::io::stderr().is_terminal() {
        return (aloft_image::no_progress(), None);
    }
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:.bold} {bar:30} {bytes}/{total_bytes} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    let m = multi.clone();
    let f: ProgressFn = Arc::new(move |p: &Progress| {
        let mut bars = bars.lock().unwrap_or_else(|e| e.into_inner());
        let short = |d: &str| {
            d.trim_start_matches("sha256:")
                .chars()
                .take(12)
                .collect::<String>()
        };
        match p {
            Progress::LayerStart {
                digest,
                size,
                offset,
            } => {
                let bar = m.add(ProgressBar::new(size.unwrap_or(0)));
                bar.set_style(style.clone());
                bar.set_prefix(short(digest));
                bar.set_position(*offset);
                bars.insert(digest.clone(), bar);
            }
            Progress::LayerBytes { digest, bytes, .. } => {
                if let Some(b) = bars.get(digest) {
                    b.set_position(*bytes);
                }
            }
            Progress::LayerDone { digest, cached } => {
                let bar = bars.entry(digest.clone()).or_insert_with(|| {
                    let b = m.add(ProgressBar::new(0));
                    b.set_style(style.clone());
                    b.set_prefix(short(digest));
                    b
                });
                bar.finish_with_message(if *cached { "already present" } else { "done" });
            }
            Progress::Apply {
                digest,
                index,
                count,
            } => {
                let _ = m.println(format!(
                    "unpacking layer {}/{} {}",
                    index + 1,
                    count,
                    short(digest)
                ));
            }
            Progress::Ext4 { .. } => {
                let _ = m.println("building ext4 base image");
            }
            _ => {}
        }
    });
    (f, Some(Bars(multi)))
}
