//! The `aloft` binary: the command-line interface and the daemons (`aloft dev`,
//! `aloft proxy`, …). It owns argument parsing, the data directory choice and the
//! printing of errors a person can act on; the work itself lives in the library
//! crates.

mod cmd;
mod datadir;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the proxy allocates a few small buffers per
/// request, and glibc's arena bookkeeping was ~3% of its CPU per request (S9.4).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "aloft",
    version,
    about = "Run container images as micro-VMs close to their users"
)]
struct Cli {
    /// Directory holding all of this instance's state (default: /var/lib/aloft as root,
    /// ~/.local/share/aloft otherwise).
    #[arg(long, global = true, env = aloft_types::datadir::DATA_DIR_ENV)]
    data_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate and inspect fly.toml (or aloft.toml) files.
    #[command(subcommand)]
    Config(cmd::config::ConfigCommand),
    /// Pull, import and manage OCI images and their root filesystems.
    #[command(subcommand)]
    Image(cmd::image::ImageCommand),
    /// Run the edge proxy.
    Proxy(cmd::proxy::ProxyArgs),
    /// Run everything on this host: API, agent and proxy per region, SQLite catalog.
    Dev(cmd::dev::DevArgs),
    /// Create, list and destroy apps.
    #[command(subcommand)]
    Apps(cmd::apps::AppsCommand),
    /// Run and manage individual machines.
    Machine(cmd::machine::MachineArgs),
    /// Deploy the app in fly.toml: release command, then a rolling, health-checked update.
    Deploy(cmd::deploy::DeployArgs),
    /// Show the app's machine logs.
    Logs(cmd::logs::LogsArgs),
    /// Create an app and write its fly.toml.
    Launch(cmd::launch::LaunchArgs),
    /// Show the app and its machines.
    Status(cmd::status::StatusArgs),
    /// Change the number of machines or their memory.
    Scale(cmd::scale::ScaleArgs),
    /// Manage the app's secrets.
    Secrets(cmd::secrets::SecretsArgs),
    /// Manage the app's TLS certificates (ACME-issued or uploaded).
    Certs(cmd::certs::CertsArgs),
    /// Open a shell or run a command in one of the app's machines.
    Ssh(cmd::ssh::SshArgs),
    /// Manage the app's volumes.
    Volumes(cmd::volumes::VolumesArgs),
    /// List the app's releases, or roll back to one.
    Releases(cmd::releases::ReleasesArgs),
    /// Run one VM in the foreground, like `docker run`.
    #[command(subcommand)]
    Vm(cmd::vm::VmCommand),
    /// Save or show the API the CLI talks to.
    #[command(subcommand)]
    Auth(cmd::auth::AuthCommand),
    /// Create, list and revoke API tokens of the organisation.
    Tokens(cmd::tokens::TokensArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ALOFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let data_dir = datadir::resolve(cli.data_dir);
    let result = match cli.command {
        Command::Config(c) => cmd::config::run(c),
        Command::Image(c) => cmd::image::run(c, &data_dir),
        Command::Proxy(a) => cmd::proxy::run(a, &data_dir),
        Command::Dev(a) => cmd::dev::run(a, &data_dir),
        Command::Apps(c) => cmd::apps::run(c, &data_dir),
        Command::Machine(a) => cmd::machine::run(a, &data_dir),
        Command::Deploy(a) => cmd::deploy::run(a, &data_dir),
        Command::Logs(a) => cmd::logs::run(a, &data_dir),
        Command::Launch(a) => cmd::launch::run(a, &data_dir),
        Command::Status(a) => cmd::status::run(a, &data_dir),
        Command::Scale(a) => cmd::scale::run(a, &data_dir),
        Command::Secrets(a) => cmd::secrets::run(a, &data_dir),
        Command::Certs(a) => cmd::certs::run(a, &data_dir),
        Command::Ssh(a) => cmd::ssh::run(a, &data_dir),
        Command::Volumes(a) => cmd::volumes::run(a, &data_dir),
        Command::Auth(c) => cmd::auth::run(c, &data_dir),
        Command::Tokens(a) => cmd::tokens::run(a, &data_dir),
        Command::Releases(a) => cmd::releases::run(a, &data_dir),
        Command::Vm(c) => cmd::vm::run(c, &data_dir),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
