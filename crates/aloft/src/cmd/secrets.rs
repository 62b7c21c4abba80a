//! `aloft secrets set|unset|list`: the app's encrypted secrets (names and digests only
//! ever come back), and the rolling update that lets machines pick new values up.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use aloft_types::datadir::DataDir;
use aloft_types::machine::MachineState;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::client::{Api, block_on, enc};
use super::common::{AppArgs, Progress, parse_duration, parse_kv, print_json, print_table};

#[derive(Args, Debug)]
pub struct SecretsArgs {
    #[command(flatten)]
    pub common: AppArgs,
    #[command(subcommand)]
    pub cmd: SecretsCommand,
}

#[derive(Subcommand, Debug)]
pub enum SecretsCommand {
    /// Set secrets (`NAME=VALUE`; `NAME=-` reads the value from stdin).
    Set {
        #[arg(required = true, value_name = "NAME=VALUE", value_parser = parse_kv)]
        pairs: Vec<(String, String)>,
        /// Only store them; machines pick them up on the next deploy.
        #[arg(long)]
        stage: bool,
        /// How long each machine may take to restart.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        wait_timeout: Duration,
    },
    /// Remove secrets.
    Unset {
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        #[arg(long)]
        stage: bool,
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        wait_timeout: Duration,
    },
    /// List secret names and digests (never values).
    #[command(alias = "ls")]
    List,
    /// Restart the app's machines so they pick up staged secrets.
    Deploy {
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        wait_timeout: Duration,
    },
}

fn secrets_of(v: &Value) -> Vec<Value> {
    v.get("secrets")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn text(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

pub fn run(args: SecretsArgs, data_dir: &DataDir) -> Result<ExitCode> {
    let app = args.common.app()?;
    let json = args.common.json;
    let api = Api::connect(data_dir)?;
    block_on(async move {
        let path = format!("/apps/{}/secrets", enc(&app));
        let (changes, stage, wait): (BTreeMap<String, Option<String>>, bool, Duration) = match args
            .cmd
        {
            SecretsCommand::List => {
                let v: Value = api
                    .get(&path)
                    .await
                    .with_context(|| format!("listing the secrets of app {app}"))?;
                let list = secrets_of(&v);
                if json {
                    print_json(&list)?;
                } else if list.is_empty() {
                    println!("app {app} has no secrets");
                } else {
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|s| vec![text(s, "name"), text(s, "digest"), text(s, "updated_at")])
                        .collect();
                    print_table(&["NAME", "DIGEST", "UPDATED"], &rows);
                }
                return Ok(ExitCode::SUCCESS);
            }
            SecretsCommand::Deploy { wait_timeout } => {
                let n = restart_all(&api, &app, wait_timeout).await?;
                if json {
                    print_json(&json!({ "app": app, "machines_updated": n }))?;
                } else {
                    println!("updated {n} machine(s) of app {app} with the current secrets");
                }
                return Ok(ExitCode::SUCCESS);
            }
            SecretsCommand::Set {
                pairs,
                stage,
                wait_timeout,
            } => {
                let mut m = BTreeMap::new();
                for (k, v) in pairs {
                    let v = if v == "-" {
                        let mut s = String::new();
                        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                            .context("reading a secret value from stdin")?;
                        s.trim_end_matches('\n').to_string()
                    } else {
                        v
                    };
                    m.insert(k, Some(v));
                }
                (m, stage, wait_timeout)
            }
            SecretsCommand::Unset {
                names,
                stage,
                wait_timeout,
            } => (
                names.into_iter().map(|n| (n, None)).collect(),
                stage,
                wait_timeout,
            ),
        };
        let names: Vec<String> = changes.keys().cloned().collect();
        let v: Value = api
            .post(&path, &json!({ "values": changes }))
            .await
            .with_context(|| format!("updating secrets {} of app {app}", names.join(", ")))?;
        let version = v.get("version").and_then(Value::as_i64).unwrap_or(0);
        let updated = if stage {
            0
        } else {
            restart_all(&api, &app, wait).await?
        };
        if json {
            print_json(&json!({
                "app": app,
                "names": names,
                "version": version,
                "staged": stage,
                "machines_updated": updated,
                "secrets": secrets_of(&v),
            }))?;
        } else if stage {
            println!(
                "staged secrets {} of app {app} (version {version}); run `aloft secrets deploy` or `aloft deploy` to apply",
                names.join(", ")
            );
        } else {
            println!(
                "set secrets {} of app {app} (version {version}); {updated} machine(s) updated",
                names.join(", ")
            );
        }
        Ok(ExitCode::SUCCESS)
    })?
}

/// Updates every machine with its own config, one at a time, so that it restarts with
/// the app's current secrets; running ones are waited for.
async fn restart_all(api: &Api, app: &str, wait: Duration) -> Result<usize> {
    let progress = Progress::new();
    let machines = api.list_machines(app).await?;
    let mut n = 0;
    for m in machines
        .iter()
        .filter(|m| !matches!(m.state, MachineState::Destroyed | MachineState::Destroying))
    {
        let running = m.state == MachineState::Started;
        progress.step(format!("updating machine {} to pick up secrets", m.id));
        let updated = api
            .update_machine(app, &m.id, &m.config, Some(&m.instance_id), !running)
            .await?;
        if running {
            let w = api
                .wait_machine(app, &m.id, "started", Some(&updated.instance_id), wait)
                .await?;
            if w.state != "started" {
                bail!("machine {} of app {app} did not restart: {}", m.id, w.state);
            }
        }
        progress.done(format!("machine {} updated", m.id));
        n += 1;
    }
    progress.finish();
    Ok(n)
}
