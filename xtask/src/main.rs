//! `cargo xtask setup | test | demo | bench …`: the project's own commands. Set-up is
//! idempotent and needs nobody: on a fresh Debian bookworm machine with only the Rust
//! toolchain, Python, qemu-utils and git it installs everything else.

mod bench;
mod demo;
mod fuzz;
mod setup;
mod util;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install system packages, the musl target and the guest kernel (idempotent).
    Setup(setup::SetupArgs),
    /// Set up, then run the whole test suite (what CI runs).
    Test {
        /// Extra arguments passed to the test runner (e.g. a filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, then run the main job: `aloft dev` with a demo app behind the proxy.
    Demo {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Benchmarks, each against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Fuzz the Machines API of a fresh `aloft dev` with schemathesis (Fly's spec and ours).
    FuzzApi(fuzz::FuzzArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup(args) => setup::run(&args).map(|_| ()),
        Command::Test { args } => test(&args),
        Command::Demo { data_dir } => demo(data_dir),
        Command::Bench(cmd) => bench::run(cmd),
        Command::FuzzApi(args) => fuzz::run(&args),
    }
}

/// The README's test command: set-up, lint, then every test of the workspace.
fn test(extra: &[String]) -> Result<()> {
    let env = setup::run(&setup::SetupArgs::default())?;
    util::step("checking formatting");
    util::cargo(&["fmt", "--all", "--", "--check"], &[])?;
    util::step("clippy");
    util::cargo(
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    util::step("building the guest init (static musl)");
    setup::build_guest_init()?;
    let envs = env.test_env();
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    util::step("running the test suite");
    let mut args = vec!["nextest", "run", "--workspace", "--no-fail-fast"];
    if !util::have("cargo-nextest") {
        args = vec!["test", "--workspace", "--no-fail-fast"];
    }
    args.extend(extra.iter().map(String::as_str));
    util::cargo(&args, &envs)
}

fn demo(data_dir: Option<PathBuf>) -> Result<()> {
    let args = setup::SetupArgs {
        data_dir,
        ..Default::default()
    };
    let env = setup::run(&args)?;
    util::step("building aloft (release)");
    util::cargo(&["build", "--release", "-p", "aloft"], &[])?;
    util::step("building the guest init (static musl)");
    setup::build_guest_init()?;
    let repo = std::env::current_dir()?;
    demo::run(&repo, &env.data_dir)
}
