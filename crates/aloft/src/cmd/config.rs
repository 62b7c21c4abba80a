//! `aloft config validate|show|machine`.

use std::path::PathBuf;
use std::process::ExitCode;

use aloft_types::appconfig::{self, ConfigError, LoadedConfig};
use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct ConfigFileArg {
    /// The config file (default: fly.toml, then aloft.toml, in the current directory).
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check a fly.toml and report every problem with its line and column.
    Validate {
        #[command(flatten)]
        file: ConfigFileArg,
    },
    /// Print the normalised app config.
    Show {
        #[command(flatten)]
        file: ConfigFileArg,
        /// Print JSON (the only format for now; accepted for compatibility).
        #[arg(long)]
        json: bool,
    },
    /// Print the Machines API `config` a deploy would send for a process group.
    Machine {
        #[command(flatten)]
        file: ConfigFileArg,
        /// The process group (default: `app`, or the first group).
        #[arg(long)]
        group: Option<String>,
        /// Print JSON (the only format for now; accepted for compatibility).
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCommand::Validate { file } => {
            let Some(loaded) = load_or_report(&file)? else {
                return Ok(ExitCode::FAILURE);
            };
            let c = &loaded.config;
            let groups = appconfig::process_names(c);
            let services = c.services.len() + usize::from(c.http_service.is_some());
            println!(
                "{}: valid: app {:?}, process groups [{}], {} service(s), {} check(s), {} mount(s), {} warning(s)",
                loaded.file,
                c.app_name,
                groups.join(", "),
                services,
                c.checks.len(),
                c.mounts.len(),
                loaded.warnings.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Show { file, json: _ } => {
            let Some(loaded) = load_or_report(&file)? else {
                return Ok(ExitCode::FAILURE);
            };
            println!("{}", serde_json::to_string_pretty(&loaded.config)?);
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Machine {
            file,
            group,
            json: _,
        } => {
            let Some(loaded) = load_or_report(&file)? else {
                return Ok(ExitCode::FAILURE);
            };
            let machine = appconfig::to_machine_config(&loaded.config, group.as_deref())
                .with_context(|| format!("{}: cannot build the machine config", loaded.file))?;
            println!("{}", serde_json::to_string_pretty(&machine)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads the config, printing warnings; prints every error and returns `None` when the
/// file is invalid.
fn load_or_report(arg: &ConfigFileArg) -> anyhow::Result<Option<LoadedConfig>> {
    let path = match &arg.config {
        Some(p) => p.clone(),
        None => appconfig::find_config(std::path::Path::new(".")).map_err(|_| {
            anyhow::anyhow!(
                "no fly.toml or aloft.toml in {}",
                std::env::current_dir().unwrap_or_default().display()
            )
        })?,
    };
    match appconfig::load(&path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            Ok(Some(loaded))
        }
        Err(ConfigError::Invalid {
            errors, warnings, ..
        }) => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            for e in &errors {
                eprintln!("{e}");
            }
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}
