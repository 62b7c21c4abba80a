//! `aloft certs add|list|show|check|remove`: the app's TLS certificates (ACME-issued by
//! the proxies, or uploaded), and the `--acme-*` flags of the proxy daemons.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::client::{Api, block_on, enc};
use super::common::{AppArgs, print_json, print_table};
use aloft_types::datadir::DataDir;

#[derive(Args, Debug)]
pub struct CertsArgs {
    #[command(flatten)]
    pub common: AppArgs,
    #[command(subcommand)]
    pub cmd: CertsCommand,
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Ask for a certificate for HOSTNAME (issued by ACME), or upload one with
    /// --cert/--key.
    #[command(alias = "create")]
    Add {
        hostname: String,
        /// PEM chain (leaf first) to upload instead of asking the CA.
        #[arg(long, value_name = "FILE", requires = "key")]
        cert: Option<PathBuf>,
        /// PEM private key of the uploaded certificate.
        #[arg(long, value_name = "FILE", requires = "cert")]
        key: Option<PathBuf>,
    },
    /// List the app's certificates.
    #[command(alias = "ls")]
    List {
        /// Only hostnames containing this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Show one certificate: status, issuer, expiry, last error.
    Show { hostname: String },
    /// Resolve the hostname and retry a failed issuance.
    Check { hostname: String },
    /// Remove the certificate (the proxies stop serving it).
    #[command(alias = "rm", alias = "delete")]
    Remove { hostname: String },
}

/// ACME issuance by the proxy (`aloft proxy`, `aloft dev`).
#[derive(Args, Debug, Clone, Default)]
pub struct AcmeArgs {
    /// ACME directory URL; the proxy then issues and renews the catalog's ACME
    /// certificates (e.g. https://acme-v02.api.letsencrypt.org/directory).
    #[arg(long, value_name = "URL")]
    pub acme_directory: Option<String>,
    /// Contact e-mail of the ACME account.
    #[arg(long, value_name = "EMAIL", requires = "acme_directory")]
    pub acme_email: Option<String>,
    /// PEM root CA to trust for the ACME directory (e.g. pebble's test CA).
    #[arg(long, value_name = "FILE", requires = "acme_directory")]
    pub acme_ca_file: Option<PathBuf>,
    /// Challenge used when the CA offers both: http-01 (port 80) or tls-alpn-01 (443).
    #[arg(long, value_name = "KIND", default_value = "http-01", value_parser = parse_challenge)]
    pub acme_challenge: aloft_proxy::acme::ChallengePreference,
}

fn parse_challenge(s: &str) -> Result<aloft_proxy::acme::ChallengePreference, String> {
    s.parse()
}

impl AcmeArgs {
    /// The worker's configuration, when a directory is given.
    pub fn config(&self) -> Result<Option<aloft_proxy::acme::AcmeConfig>> {
        let Some(dir) = &self.acme_directory else {
            return Ok(None);
        };
        if !dir.starts_with("https://") {
            anyhow::bail!("--acme-directory {dir}: an ACME directory is an https:// URL");
        }
        if let Some(f) = &self.acme_ca_file
            && !f.is_file()
        {
            anyhow::bail!("--acme-ca-file {}: no such file", f.display());
        }
        let mut cfg = aloft_proxy::acme::AcmeConfig::new(dir.clone());
        cfg.contact_email = self.acme_email.clone();
        cfg.ca_file = self.acme_ca_file.clone();
        cfg.prefer = self.acme_challenge;
        Ok(Some(cfg))
    }
}

fn text(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn read_file(p: &PathBuf) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

/// The human view of a `CertificateDetail`.
fn print_detail(v: &Value) {
    println!("Hostname:   {}", text(v, "hostname"));
    println!("Status:     {}", text(v, "status"));
    println!("Configured: {}", text(v, "configured"));
    for c in v
        .get("certificates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let source = match text(c, "source").as_str() {
            "fly" => "acme".to_string(),
            s => s.to_string(),
        };
        println!("Source:     {source} ({})", text(c, "status"));
        if !text(c, "issuer").is_empty() {
            println!("Issuer:     {}", text(c, "issuer"));
        }
        if !text(c, "expires_at").is_empty() {
            println!("Expires:    {}", text(c, "expires_at"));
        }
    }
    for e in v
        .get("validation_errors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        println!("Error:      {}", text(e, "message"));
        println!("            {}", text(e, "remediation"));
    }
    if let Some(d) = v.get("dns_records") {
        let addrs: Vec<String> = d
            .get("resolved_addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        println!(
            "Resolves:   {}",
            if addrs.is_empty() {
                "(nothing)".to_string()
            } else {
                addrs.join(", ")
            }
        );
    }
    if !text(v, "warning").is_empty() {
        println!("Warning:    {}", text(v, "warning"));
    }
}

pub fn run(args: CertsArgs, data_dir: &DataDir) -> Result<ExitCode> {
    let app = args.common.app()?;
    let json = args.common.json;
    let api = Api::connect(data_dir)?;
    block_on(async move {
        let base = format!("/apps/{}/certificates", enc(&app));
        match args.cmd {
            CertsCommand::Add {
                hostname,
                cert,
                key,
            } => {
                let v: Value = match (cert, key) {
                    (Some(c), Some(k)) => {
                        let body = json!({
                            "hostname": hostname,
                            "fullchain": read_file(&c)?,
                            "private_key": read_file(&k)?,
                        });
                        api.post(&format!("{base}/custom"), &body)
                            .await
                            .with_context(|| {
                                format!("uploading a certificate for {hostname} to app {app}")
                            })?
                    }
                    _ => api
                        .post(&format!("{base}/acme"), &json!({ "hostname": hostname }))
                        .await
                        .with_context(|| {
                            format!("requesting a certificate for {hostname} in app {app}")
                        })?,
                };
                if json {
                    print_json(&v)?;
                } else {
                    print_detail(&v);
                    if text(&v, "configured") != "true" {
                        println!(
                            "\nThe proxies are obtaining it. Point {hostname}'s DNS at them, then \
                             follow with `aloft certs show {hostname}`."
                        );
                    }
                }
            }
            CertsCommand::List { filter } => {
                let mut certs = Vec::new();
                let mut cursor: Option<String> = None;
                loop {
                    let mut path = format!("{base}?limit=500");
                    if let Some(f) = &filter {
                        path.push_str(&format!("&filter={}", enc(f)));
                    }
                    if let Some(c) = &cursor {
                        path.push_str(&format!("&cursor={}", enc(c)));
                    }
                    let v: Value = api
                        .get(&path)
                        .await
                        .with_context(|| format!("listing the certificates of app {app}"))?;
                    certs.extend(
                        v.get("certificates")
                            .and_then(Value::as_array)
                            .cloned()
                            .unwrap_or_default(),
                    );
                    match v.get("next_cursor").and_then(Value::as_str) {
                        Some(c) if !c.is_empty() => cursor = Some(c.to_string()),
                        _ => break,
                    }
                }
                if json {
                    print_json(&certs)?;
                } else if certs.is_empty() {
                    println!("app {app} has no certificates");
                } else {
                    let rows: Vec<Vec<String>> = certs
                        .iter()
                        .map(|c| {
                            let source = if c.get("has_custom_certificate") == Some(&json!(true)) {
                                "custom"
                            } else {
                                "acme"
                            };
                            vec![
                                text(c, "hostname"),
                                source.to_string(),
                                text(c, "status"),
                                text(c, "created_at"),
                            ]
                        })
                        .collect();
                    print_table(&["HOSTNAME", "SOURCE", "STATUS", "ADDED"], &rows);
                }
            }
            CertsCommand::Show { hostname } => {
                let v: Value = api
                    .get(&format!("{base}/{}", enc(&hostname)))
                    .await
                    .with_context(|| format!("showing the certificate for {hostname}"))?;
                if json {
                    print_json(&v)?;
                } else {
                    print_detail(&v);
                }
            }
            CertsCommand::Check { hostname } => {
                let v: Value = api
                    .post(&format!("{base}/{}/check", enc(&hostname)), &json!({}))
                    .await
                    .with_context(|| format!("checking the certificate for {hostname}"))?;
                if json {
                    print_json(&v)?;
                } else {
                    print_detail(&v);
                }
            }
            CertsCommand::Remove { hostname } => {
                api.delete(&format!("{base}/{}", enc(&hostname)))
                    .await
                    .with_context(|| format!("removing the certificate for {hostname}"))?;
                if json {
                    print_json(&json!({ "app": app, "hostname": hostname, "removed": true }))?;
                } else {
                    println!("removed the certificate for {hostname} from app {app}");
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}
