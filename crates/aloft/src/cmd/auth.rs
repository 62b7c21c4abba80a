//! `aloft auth login|logout|whoami`: where the CLI finds the API when neither
//! `ALOFT_API_URL` nor `aloft dev`'s `dev.json` says so.

use std::process::ExitCode;

use aloft_types::datadir::DataDir;
use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::json;

use super::client::{self, Api, Endpoint, SavedEndpoint, block_on};
use super::common::print_json;

#[derive(Subcommand, Debug)]
pub enum AuthCommand {
    /// Save an API URL and token in ~/.config/aloft/config.json (checked first).
    Login {
        #[arg(long, value_name = "URL")]
        api_url: String,
        #[arg(
            long,
            value_name = "TOKEN",
            env = "ALOFT_API_TOKEN",
            hide_env_values = true
        )]
        token: String,
        /// Save without asking the API whether the token works.
        #[arg(long)]
        no_check: bool,
        #[arg(long)]
        json: bool,
    },
    /// Forget the saved API URL and token.
    Logout {
        #[arg(long)]
        json: bool,
    },
    /// Show which API and token the CLI would use, and what the API says about it.
    Whoami {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: AuthCommand, data_dir: &DataDir) -> Result<ExitCode> {
    match cmd {
        AuthCommand::Login {
            api_url,
            token,
            no_check,
            json,
        } => {
            let ep = Endpoint {
                api_url: api_url.clone(),
                token: token.clone(),
                source: "--api-url".into(),
            };
            let api = Api::new(&ep)?;
            if !no_check {
                block_on(async {
                    api.get::<serde_json::Value>("/tokens/current")
                        .await
                        .with_context(|| format!("checking the token against {api_url}"))
                })??;
            }
            let path = client::save_user_config(&SavedEndpoint {
                api_url: api_url.clone(),
                token,
                proxy: None,
            })?;
            if json {
                print_json(&json!({ "api_url": api_url, "saved_to": path }))?;
            } else {
                println!("saved API {api_url} to {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        AuthCommand::Logout { json } => {
            let path = client::user_config_path();
            let removed = match std::fs::remove_file(&path) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            };
            if json {
                print_json(&json!({ "removed": removed, "path": path }))?;
            } else if removed {
                println!("removed {}", path.display());
            } else {
                println!("nothing saved at {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        AuthCommand::Whoami { json } => {
            let ep = client::discover(data_dir)?;
            let api = Api::new(&ep)?;
            let who: serde_json::Value = block_on(async {
                api.get::<serde_json::Value>("/tokens/current")
                    .await
                    .with_context(|| format!("asking {} about the token", api.base()))
            })??;
            if json {
                print_json(&json!({ "api_url": ep.api_url, "source": ep.source, "token": who }))?;
            } else {
                println!("API    {} (from {})", ep.api_url, ep.source);
                println!("token  {who}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
