//! `aloft status`: the app and a table of its machines.

use std::process::ExitCode;

use aloft_types::datadir::DataDir;
use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use super::client::{Api, block_on, enc};
use super::common::{AppArgs, checks_summary, machine_group, print_json, print_table};
use super::deploy::{METADATA_RELEASE_VERSION, by_group};

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: AppArgs,
}

pub fn run(args: StatusArgs, data_dir: &DataDir) -> Result<ExitCode> {
    let app = args.common.app()?;
    let api = Api::connect(data_dir)?;
    block_on(async move {
        let info: serde_json::Value = api
            .get(&format!("/apps/{}", enc(&app)))
            .await
            .with_context(|| format!("app {app}"))?;
        let machines = api.list_machines(&app).await?;
        if args.common.json {
            print_json(&json!({ "app": info, "machines": machines }))?;
            return Ok(ExitCode::SUCCESS);
        }
        let s = |k: &str| {
            info.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("-")
                .to_string()
        };
        let org = info
            .pointer("/organization/slug")
            .and_then(|v| v.as_str())
            .unwrap_or("-");
        println!("app      {app}");
        println!("org      {org}");
        println!("status   {}", s("status"));
        println!("network  {}", s("network"));
        println!("hostname {app}.aloft.localhost");
        println!();
        if machines.is_empty() {
            println!("no machines (deploy with `aloft deploy`)");
            return Ok(ExitCode::SUCCESS);
        }
        for (group, ms) in by_group(&machines) {
            println!("process group {group}: {} machine(s)", ms.len());
        }
        println!();
        let rows: Vec<Vec<String>> = machines
            .iter()
            .map(|m| {
                vec![
                    m.id.clone(),
                    machine_group(m),
                    m.region.clone(),
                    m.state.to_string(),
                    m.config
                        .metadata
                        .get(METADATA_RELEASE_VERSION)
                        .map(|v| format!("v{v}"))
                        .unwrap_or_else(|| "-".into()),
                    m.instance_id.clone(),
                    checks_summary(m),
                    m.config.image.clone(),
                    m.updated_at.clone(),
                ]
            })
            .collect();
        print_table(
            &[
                "ID", "PROCESS", "REGION", "STATE", "RELEASE", "VERSION", "CHECKS", "IMAGE",
                "UPDATED",
            ],
            &rows,
        );
        Ok(ExitCode::SUCCESS)
    })?
}
