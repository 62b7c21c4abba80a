//! `aloft tokens create|list|revoke`: the organisation's API tokens, through Aloft's
//! own `/v1/tokens` endpoints (organisation admin tokens only). A new token is
//! printed once; the API keeps only its hash.

use std::process::ExitCode;

use aloft_types::datadir::DataDir;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::client::{Api, block_on, enc};
use super::common::{print_json, print_table};

#[derive(Args, Debug)]
pub struct TokensArgs {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: TokensCommand,
}

#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// Create a token (deploy role unless told otherwise); it is shown only once.
    Create {
        /// Limit the token to this app.
        #[arg(long, short = 'a')]
        app: Option<String>,
        /// Read-only: may look but not change anything.
        #[arg(long, conflicts_with_all = ["deploy", "admin"])]
        read_only: bool,
        /// Deploy: may change machines, volumes, secrets and IPs (the default).
        #[arg(long, conflicts_with = "admin")]
        deploy: bool,
        /// Organisation admin: may also create and delete apps and manage tokens.
        #[arg(long, conflicts_with = "app")]
        admin: bool,
        /// Lifetime as a duration ("720h", "30m"); no expiry when absent.
        #[arg(long)]
        expiry: Option<String>,
        /// A label shown by `aloft tokens list`.
        #[arg(long)]
        name: Option<String>,
    },
    /// List the organisation's tokens (never their secrets).
    #[command(alias = "ls")]
    List,
    /// Revoke a token by id; it stops working at once.
    Revoke {
        #[arg(value_name = "ID")]
        id: String,
    },
}

fn text(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

/// The request body `create` sends.
fn create_body(
    app: Option<String>,
    read_only: bool,
    admin: bool,
    expiry: Option<String>,
    name: Option<String>,
) -> Value {
    let role = if read_only {
        "readonly"
    } else if admin {
        "admin"
    } else {
        "deploy"
    };
    let mut body = json!({ "role": role });
    for (k, v) in [("app", app), ("expiry", expiry), ("name", name)] {
        if let Some(v) = v {
            body[k] = json!(v);
        }
    }
    body
}

pub fn run(args: TokensArgs, data_dir: &DataDir) -> Result<ExitCode> {
    let api = Api::connect(data_dir)?;
    block_on(exec(&api, args))?
}

/// Runs a tokens command against `api`.
pub async fn exec(api: &Api, args: TokensArgs) -> Result<ExitCode> {
    match args.cmd {
        TokensCommand::Create {
            app,
            read_only,
            deploy: _,
            admin,
            expiry,
            name,
        } => {
            let body = create_body(app, read_only, admin, expiry, name);
            let v: Value = api
                .post("/tokens", &body)
                .await
                .context("creating a token")?;
            if args.json {
                print_json(&v)?;
            } else {
                let scope = v.get("app").and_then(Value::as_str).map_or_else(
                    || format!("organization {}", text(&v, "org_slug")),
                    |a| format!("app {a}"),
                );
                eprintln!(
                    "created {} token {} for {scope}{}; it is shown only this once:",
                    text(&v, "role"),
                    text(&v, "id"),
                    v.get("expires_at")
                        .and_then(Value::as_str)
                        .map(|e| format!(" (expires {e})"))
                        .unwrap_or_default()
                );
                println!("{}", text(&v, "token"));
            }
        }
        TokensCommand::List => {
            let v: Value = api.get("/tokens").await.context("listing tokens")?;
            let list = v
                .get("tokens")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if args.json {
                print_json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|t| {
                        let role = match t.get("scope").and_then(Value::as_str) {
                            Some(s) => format!("{} ({s})", text(t, "role")),
                            None => text(t, "role"),
                        };
                        let app = t.get("app").and_then(Value::as_str).unwrap_or("*");
                        let expires = t
                            .get("expires_at")
                            .and_then(Value::as_str)
                            .unwrap_or("never");
                        vec![
                            text(t, "id"),
                            text(t, "name"),
                            app.to_string(),
                            role,
                            text(t, "created_at"),
                            expires.to_string(),
                        ]
                    })
                    .collect();
                print_table(&["ID", "NAME", "APP", "ROLE", "CREATED", "EXPIRES"], &rows);
            }
        }
        TokensCommand::Revoke { id } => {
            let v = api
                .delete(&format!("/tokens/{}", enc(&id)))
                .await
                .with_context(|| format!("revoking token {id}"))?;
            if args.json {
                print_json(&v)?;
            } else {
                println!("revoked token {id} ({})", text(&v, "name"));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::client::Endpoint;
    use std::sync::Arc;

    #[test]
    fn roles_map_to_the_api() {
        assert_eq!(
            create_body(None, false, false, None, None),
            json!({"role": "deploy"})
        );
        assert_eq!(
            create_body(Some("a".into()), true, false, Some("1h".into()), None),
            json!({"role": "readonly", "app": "a", "expiry": "1h"})
        );
        assert_eq!(
            create_body(None, false, true, None, Some("ops".into())),
            json!({"role": "admin", "name": "ops"})
        );
    }

    #[tokio::test]
    async fn create_list_revoke_against_a_real_api() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn aloft_store::Store> = Arc::new(
            aloft_store::SqliteStore::open(dir.path().join("c.db"))
                .await
                .unwrap(),
        );
        let state = aloft_api::ApiState::new(store, Vec::new(), dir.path())
            .await
            .unwrap();
        let admin = aloft_api::create_token(&state, "a", "personal", None, aloft_api::Role::Admin)
            .await
            .unwrap()
            .token;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(aloft_api::serve(listener, state.clone(), async {
            let _ = stop_rx.await;
        }));
        let api = Api::new(&Endpoint {
            api_url: format!("http://{addr}"),
            token: admin,
            source: "test".into(),
        })
        .unwrap();
        let args = |cmd| TokensArgs { json: true, cmd };
        exec(
            &api,
            args(TokensCommand::Create {
                app: None,
                read_only: true,
                deploy: false,
                admin: false,
                expiry: Some("2h".into()),
                name: Some("viewer".into()),
            }),
        )
        .await
        .unwrap();
        let listed: Value = api.get("/tokens").await.unwrap();
        let viewer = listed["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "viewer")
            .cloned()
            .expect("the new token is listed");
        assert_eq!(viewer["role"], "readonly");
        let id = viewer["id"].as_str().unwrap().to_string();
        exec(&api, args(TokensCommand::List)).await.unwrap();
        exec(&api, args(TokensCommand::Revoke { id: id.clone() }))
            .await
            .unwrap();
        let listed: Value = api.get("/tokens").await.unwrap();
        assert!(
            !listed["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["id"] == id.as_str())
        );
        // Revoking again is an error naming the token.
        let err = exec(&api, args(TokensCommand::Revoke { id: id.clone() }))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains(&id), "{err:#}");
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
