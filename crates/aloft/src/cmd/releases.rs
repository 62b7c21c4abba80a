//! `aloft releases` and `aloft releases rollback [VERSION]`: the app's deploy history as
//! the API records it, and going back to an earlier release's configs.

use std::process::ExitCode;

use aloft_types::datadir::DataDir;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use super::client::{Api, block_on, enc};
use super::common::{AppArgs, print_json, print_table};

#[derive(Args, Debug)]
pub struct ReleasesArgs {
    #[command(flatten)]
    pub common: AppArgs,
    #[command(subcommand)]
    pub command: Option<ReleasesCommand>,
}

#[derive(Subcommand, Debug)]
pub enum ReleasesCommand {
    /// Put every machine back on an earlier release (default: the last complete one
    /// before the current).
    Rollback { version: Option<u64> },
}

pub fn run(args: ReleasesArgs, data_dir: &DataDir) -> Result<ExitCode> {
    let app = args.common.app()?;
    let api = Api::connect(data_dir)?;
    block_on(async move {
        let list: serde_json::Value = api
            .get(&format!("/apps/{}/releases", enc(&app)))
            .await
            .with_context(|| format!("releases of app {app}"))?;
        let releases = list
            .get("releases")
            .and_then(|r| r.as_array())
            .cloned()
            .unwrap_or_default();
        match args.command {
            None => {
                if args.common.json {
                    print_json(&releases)?;
                    return Ok(ExitCode::SUCCESS);
                }
                let s = |r: &serde_json::Value, k: &str| {
                    r.get(k)
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                        .unwrap_or_default()
                };
                let rows: Vec<Vec<String>> = releases
                    .iter()
                    .map(|r| {
                        vec![
                            format!("v{}", s(r, "version")),
                            s(r, "status"),
                            s(r, "image"),
                            s(r, "strategy"),
                            s(r, "description"),
                            s(r, "created_at"),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "VERSION",
                        "STATUS",
                        "IMAGE",
                        "STRATEGY",
                        "DESCRIPTION",
                        "CREATED",
                    ],
                    &rows,
                );
                Ok(ExitCode::SUCCESS)
            }
            Some(ReleasesCommand::Rollback { version }) => {
                let target = match version {
                    Some(v) => v,
                    None => {
                        // Newest first: skip the current one, take the next complete.
                        let complete: Vec<u64> = releases
                            .iter()
                            .filter(|r| {
                                r.get("status").and_then(|s| s.as_str()) == Some("complete")
                            })
                            .filter_map(|r| r.get("version").and_then(|v| v.as_u64()))
                            .collect();
                        match complete.get(1) {
                            Some(v) => *v,
                            None => {
                                bail!("app {app} has no earlier complete release to go back to")
                            }
                        }
                    }
                };
                let rel: serde_json::Value = api
                    .post(
                        &format!("/apps/{}/releases/{target}/rollback", enc(&app)),
                        &serde_json::json!({}),
                    )
                    .await
                    .with_context(|| format!("rolling app {app} back to release v{target}"))?;
                if args.common.json {
                    print_json(&rel)?;
                } else {
                    let status = rel.get("status").and_then(|s| s.as_str()).unwrap_or("?");
                    let version = rel.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
                    println!(
                        "rolled app {app} back to release v{target} (new release v{version}, {status})"
                    );
                }
                let failed = rel.get("status").and_then(|s| s.as_str()) == Some("failed");
                Ok(if failed {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                })
            }
        }
    })?
}
