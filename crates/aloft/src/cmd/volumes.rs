//! `aloft volumes create|list|show|destroy|extend`.

use std::process::ExitCode;

use aloft_types::datadir::DataDir;
use aloft_types::machine::Volume;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::client::{Api, block_on, enc};
use super::common::{AppArgs, print_json, print_table};

#[derive(Args, Debug)]
pub struct VolumesArgs {
    #[command(flatten)]
    pub common: AppArgs,
    #[command(subcommand)]
    pub cmd: VolumesCommand,
}

#[derive(Subcommand, Debug)]
pub enum VolumesCommand {
    /// Create a volume.
    Create {
        name: String,
        /// Size in GB.
        #[arg(short = 's', long = "size", default_value_t = 1)]
        size: i64,
        #[arg(short = 'r', long)]
        region: Option<String>,
        /// Days of snapshots to keep.
        #[arg(long)]
        snapshot_retention: Option<i64>,
    },
    /// List the app's volumes.
    #[command(alias = "ls")]
    List,
    /// Show one volume.
    Show { id: String },
    /// Destroy a volume (it must not be attached).
    #[command(alias = "rm", alias = "delete")]
    Destroy { id: String },
    /// Grow a volume.
    Extend {
        id: String,
        /// The new size in GB.
        #[arg(short = 's', long = "size")]
        size: i64,
    },
}

fn row(v: &Volume) -> Vec<String> {
    vec![
        v.id.clone(),
        v.name.clone(),
        v.state.clone(),
        format!("{}GB", v.size_gb),
        v.region.clone(),
        v.attached_machine_id.clone().unwrap_or_else(|| "-".into()),
        v.created_at.clone(),
    ]
}

const HEADER: &[&str] = &[
    "ID", "NAME", "STATE", "SIZE", "REGION", "ATTACHED", "CREATED",
];

pub fn run(args: VolumesArgs, data_dir: &DataDir) -> Result<ExitCode> {
    let app = args.common.app()?;
    let json = args.common.json;
    let api = Api::connect(data_dir)?;
    block_on(async move {
        let base = format!("/apps/{}/volumes", enc(&app));
        match args.cmd {
            VolumesCommand::Create {
                name,
                size,
                region,
                snapshot_retention,
            } => {
                if size <= 0 {
                    bail!("--size must be a positive number of GB, got {size}");
                }
                let mut body = json!({ "name": name, "size_gb": size });
                if let Some(r) = region {
                    body["region"] = r.into();
                }
                if let Some(s) = snapshot_retention {
                    body["snapshot_retention"] = s.into();
                }
                let v: Volume = api
                    .post(&base, &body)
                    .await
                    .with_context(|| format!("creating volume {name} in app {app}"))?;
                if json {
                    print_json(&v)?;
                } else {
                    println!(
                        "created volume {} ({}, {}GB) in {} for app {app}",
                        v.id, v.name, v.size_gb, v.region
                    );
                }
            }
            VolumesCommand::List => {
                let vs: Vec<Volume> = api
                    .get(&base)
                    .await
                    .with_context(|| format!("listing the volumes of app {app}"))?;
                if json {
                    print_json(&vs)?;
                } else if vs.is_empty() {
                    println!("app {app} has no volumes");
                } else {
                    print_table(HEADER, &vs.iter().map(row).collect::<Vec<_>>());
                }
            }
            VolumesCommand::Show { id } => {
                let v: Volume = api
                    .get(&format!("{base}/{}", enc(&id)))
                    .await
                    .with_context(|| format!("volume {id} of app {app}"))?;
                if json {
                    print_json(&v)?;
                } else {
                    print_table(HEADER, &[row(&v)]);
                }
            }
            VolumesCommand::Destroy { id } => {
                let v = api
                    .delete(&format!("{base}/{}", enc(&id)))
                    .await
                    .with_context(|| format!("destroying volume {id} of app {app}"))?;
                if json {
                    print_json(&v)?;
                } else {
                    println!("destroyed volume {id} of app {app}");
                }
            }
            VolumesCommand::Extend { id, size } => {
                if size <= 0 {
                    bail!("--size must be a positive number of GB, got {size}");
                }
                let v: serde_json::Value = api
                    .put(
                        &format!("{base}/{}/extend", enc(&id)),
                        &json!({ "size_gb": size }),
                    )
                    .await
                    .with_context(|| format!("extending volume {id} of app {app}"))?;
                if json {
                    print_json(&v)?;
                } else {
                    let restart = v
                        .get("needs_restart")
                        .and_then(|b| b.as_bool())
                        .unwrap_or(false);
                    println!(
                        "volume {id} of app {app} is now {size}GB{}",
                        if restart {
                            " (restart its machine to use the new space)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}
