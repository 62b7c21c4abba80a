//! `aloft apps create|list|destroy`.

use std::process::ExitCode;

use aloft_types::datadir::DataDir;
use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::{Value, json};

use super::client::{Api, block_on, enc};
use super::common::{print_json, print_table};

#[derive(Subcommand, Debug)]
pub enum AppsCommand {
    /// Create an app.
    Create {
        name: String,
        /// The organisation.
        #[arg(long, default_value = "personal")]
        org: String,
        /// The private network (default: the organisation's).
        #[arg(long)]
        network: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List apps.
    List {
        /// The organisation whose apps to list.
        #[arg(long, default_value = "personal")]
        org: String,
        #[arg(long)]
        json: bool,
    },
    /// Destroy an app and everything in it.
    Destroy {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

/// Creates an app; shared with `aloft launch`.
pub async fn create_app(api: &Api, name: &str, org: &str, network: Option<&str>) -> Result<Value> {
    let mut body = json!({ "app_name": name, "org_slug": org });
    if let Some(n) = network {
        body["network"] = n.into();
    }
    let v: Value = api
        .post("/apps", &body)
        .await
        .with_context(|| format!("creating app {name}"))?;
    Ok(v)
}

/// The apps in a list answer: Fly's `{"apps": [...]}` or a bare array.
pub fn apps_of(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Object(o) => o
            .get("apps")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn field(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(Value::Object(o)) => o
            .get("slug")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        Some(other) => other.to_string(),
    }
}

pub fn run(cmd: AppsCommand, data_dir: &DataDir) -> Result<ExitCode> {
    let api = Api::connect(data_dir)?;
    block_on(async move {
        match cmd {
            AppsCommand::Create {
                name,
                org,
                network,
                json,
            } => {
                let v = create_app(&api, &name, &org, network.as_deref()).await?;
                if json {
                    print_json(&v)?;
                } else {
                    println!("created app {name} in organisation {org}");
                }
            }
            AppsCommand::List { org, json } => {
                let path = format!("/apps?org_slug={}", enc(&org));
                let v: Value = api
                    .get(&path)
                    .await
                    .with_context(|| format!("listing the apps of organisation {org}"))?;
                let apps = apps_of(&v);
                if json {
                    print_json(&apps)?;
                } else if apps.is_empty() {
                    println!("no apps");
                } else {
                    let rows: Vec<Vec<String>> = apps
                        .iter()
                        .map(|a| {
                            vec![
                                field(a, "name"),
                                field(a, "organization"),
                                field(a, "machine_count"),
                                field(a, "network"),
                            ]
                        })
                        .collect();
                    print_table(&["NAME", "ORG", "MACHINES", "NETWORK"], &rows);
                }
            }
            AppsCommand::Destroy { name, json } => {
                api.delete(&format!("/apps/{}", enc(&name)))
                    .await
                    .with_context(|| format!("destroying app {name}"))?;
                if json {
                    print_json(&json!({ "app": name, "destroyed": true }))?;
                } else {
                    println!("destroyed app {name}");
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}
