//! `aloft launch --image REF`: create an app and write its fly.toml (and deploy it
//! with `--deploy`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use aloft_types::appconfig;
use aloft_types::datadir::DataDir;
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use super::apps::create_app;
use super::client::{Api, block_on};
use super::common::{AppArgs, parse_duration, print_json};
use super::deploy::{DeployArgs, run as deploy_run};

#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// The image to run (written as `[build] image`).
    #[arg(short = 'i', long)]
    pub image: String,
    /// The app name (default: from the image name).
    #[arg(short = 'n', long)]
    pub name: Option<String>,
    /// The primary region.
    #[arg(short = 'r', long)]
    pub region: Option<String>,
    /// The port the app listens on inside the machine.
    #[arg(long, default_value_t = 8080)]
    pub internal_port: u16,
    /// The organisation.
    #[arg(long, default_value = "personal")]
    pub org: String,
    /// Where to write the config.
    #[arg(
        short = 'c',
        long = "config",
        value_name = "FILE",
        default_value = "fly.toml"
    )]
    pub config: PathBuf,
    /// Replace an existing config file.
    #[arg(long)]
    pub force: bool,
    /// Deploy right away.
    #[arg(long)]
    pub deploy: bool,
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub wait_timeout: Duration,
    #[arg(long)]
    pub json: bool,
}

/// The first region the installation serves (`GET /platform/regions`), if any.
async fn first_region(api: &Api) -> Result<Option<String>> {
    let v: serde_json::Value = api
        .get("/platform/regions")
        .await
        .context("asking the API for its regions (or pass --region)")?;
    Ok(v.get("regions")
        .and_then(|r| r.as_array())
        .and_then(|r| r.first())
        .and_then(|r| r.get("code"))
        .and_then(|c| c.as_str())
        .map(str::to_string))
}

/// A valid app name from an image reference: `reg:5000/team/my_app:1.2` -> `my-app`.
pub fn name_from_image(image: &str) -> String {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    let repo = last.split(':').next().unwrap_or(last);
    let mut name: String = repo
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while name.contains("--") {
        name = name.replace("--", "-");
    }
    let name = name.trim_matches('-').to_string();
    let name = if name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name
    } else {
        format!("app-{name}")
    };
    let mut name: String = name.chars().take(63).collect();
    while name.ends_with('-') {
        name.pop();
    }
    if name.len() < 2 { "app".into() } else { name }
}

fn toml_str(s: &str) -> String {
    // Basic TOML string: JSON escaping is a subset TOML accepts.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The fly.toml `aloft launch` writes.
pub fn render_fly_toml(app: &str, region: Option<&str>, image: &str, port: u16) -> String {
    let mut s = format!(
        "# fly.toml for {app}, written by `aloft launch`\n\napp = {}\n",
        toml_str(app)
    );
    if let Some(r) = region {
        s.push_str(&format!("primary_region = {}\n", toml_str(r)));
    }
    s.push_str(&format!(
        "\n[build]\n  image = {}\n\n[http_service]\n  internal_port = {port}\n  force_https = false\n  auto_stop_machines = \"stop\"\n  auto_start_machines = true\n  min_machines_running = 0\n",
        toml_str(image)
    ));
    s
}

pub fn run(args: LaunchArgs, data_dir: &DataDir) -> Result<ExitCode> {
    if args.config.exists() && !args.force {
        bail!(
            "{} already exists: deploy it with `aloft deploy`, or pass --force to replace it",
            args.config.display()
        );
    }
    let app = args
        .name
        .clone()
        .unwrap_or_else(|| name_from_image(&args.image));
    let api = Api::connect(data_dir)?;
    let region = match &args.region {
        Some(r) => Some(r.clone()),
        None => block_on(first_region(&api))??,
    };
    let text = render_fly_toml(&app, region.as_deref(), &args.image, args.internal_port);
    // What we write must be what a deploy accepts.
    if let Err(e) = appconfig::parse(&text, &args.config.display().to_string()) {
        bail!("internal error: the generated config is not valid: {e}");
    }
    let created = block_on(create_app(&api, &app, &args.org, None))??;
    std::fs::write(&args.config, &text)
        .with_context(|| format!("writing {}", args.config.display()))?;
    if !args.json {
        println!("created app {app} in organisation {}", args.org);
        println!("wrote {}", args.config.display());
    }
    if args.deploy {
        let code = deploy_run(
            DeployArgs {
                common: AppArgs {
                    app: Some(app.clone()),
                    config: Some(args.config.clone()),
                    json: args.json,
                },
                image: None,
                strategy: None,
                wait_timeout: Some(args.wait_timeout),
                regions: Vec::new(),
                only_groups: Vec::new(),
                skip_release_command: false,
            },
            data_dir,
        )?;
        return Ok(code);
    }
    if args.json {
        print_json(&json!({ "app": created, "config": args.config, "deployed": false }))?;
    } else {
        println!("deploy it with `aloft deploy`");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_images() {
        assert_eq!(name_from_image("127.0.0.1:5000/team/my_app:1.2"), "my-app");
        assert_eq!(name_from_image("busybox"), "busybox");
        assert_eq!(name_from_image("reg/9lives@sha256:abc"), "app-9lives");
    }

    #[test]
    fn written_config_is_valid() {
        let t = render_fly_toml("web", Some("ams"), "reg:5000/web:1", 8080);
        let l = appconfig::parse(&t, "fly.toml").unwrap();
        assert_eq!(l.config.app_name, "web");
        assert_eq!(l.config.primary_region, "ams");
        let hs = l.config.http_service.unwrap();
        assert_eq!(hs.internal_port, 8080);
        assert!(!hs.force_https);
        assert_eq!(hs.auto_stop_machines.as_deref(), Some("stop"));
        assert_eq!(hs.min_machines_running, Some(0));
    }
}
