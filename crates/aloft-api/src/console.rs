//! `GET /v1/apps/{app}/machines/{id}/console` — an Aloft extension behind
//! `aloft ssh console`: an interactive command in a machine, over a WebSocket.
//!
//! Query: `cmd` (a command line, run as `/bin/sh -c CMD`; absent: `/bin/sh`), `tty`
//! (`true` for a pseudo-terminal), `rows` and `cols` (its first size), `term` (the
//! guest's `TERM`). A deploy-role token for the app is required. The command is
//! started before the upgrade, so a bad machine, a stopped one or a command that
//! cannot start is an ordinary JSON error response.
//!
//! Frames, after the upgrade:
//! - binary, first byte the stream, the rest its bytes: `0` stdin (client to server),
//!   `1` stdout and `2` stderr (server to client; with a pty everything is stdout);
//! - text, one JSON object: client to server `{"type":"resize","rows":R,"cols":C}` and
//!   `{"type":"eof"}` (closes the command's stdin); server to client, last,
//!   `{"type":"exit","code":N|null,"signal":N|null}`, then a close frame. A close
//!   without `exit` means the machine's channel was lost.
//!
//! The client closing the socket ends the command: its stdin is closed, or on a pty
//! `^C ^D` is typed, as a terminal hang-up would end a shell. So does a client that
//! reads too slowly: the agent queues a bounded number of output frames, then sends a
//! note on stderr and closes without `exit`. Client messages are at most
//! [`MAX_CLIENT_MESSAGE`] bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use aloft_agent::api::{ConsoleInput, ConsoleOutput, ConsoleRequest, ConsoleSession};
use axum::Extension;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::auth::{Principal, Role};
use crate::error::ErrorResponse;
use crate::machines::machine_agent;
use crate::{ApiError, ApiState};

/// Stream byte of a stdin frame.
pub const STDIN: u8 = 0;
/// Stream byte of a stdout frame.
pub const STDOUT: u8 = 1;
/// Stream byte of a stderr frame.
pub const STDERR: u8 = 2;
/// The shell run without `cmd`, and the interpreter of `cmd`.
pub const SHELL: &str = "/bin/sh";
/// The largest WebSocket message (and frame) a console client may send: stdin comes
/// in chunks (the CLI's are 32 KiB), so a client cannot make the server hold more.
pub const MAX_CLIENT_MESSAGE: usize = 256 * 1024;

/// The query of the console route.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConsoleQuery {
    #[serde(default)]
    pub cmd: Option<String>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub rows: Option<u16>,
    #[serde(default)]
    pub cols: Option<u16>,
    #[serde(default)]
    pub term: Option<String>,
}

/// A text frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Control {
    Resize {
        rows: u16,
        cols: u16,
    },
    Eof,
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
}

impl ConsoleQuery {
    /// The agent's request: argv, environment and terminal.
    pub fn request(&self) -> ConsoleRequest {
        let command = match self.cmd.as_deref().filter(|c| !c.trim().is_empty()) {
            Some(c) => vec![SHELL.to_string(), "-c".into(), c.to_string()],
            None => vec![SHELL.to_string()],
        };
        let mut env = BTreeMap::new();
        if self.tty {
            let term = self.term.as_deref().filter(|t| !t.is_empty());
            env.insert("TERM".into(), term.unwrap_or("xterm").to_string());
        }
        ConsoleRequest {
            command,
            env,
            tty: self.tty,
            rows: self.rows.filter(|r| *r > 0).unwrap_or(24),
            cols: self.cols.filter(|c| *c > 0).unwrap_or(80),
        }
    }
}

/// The handler: checks the role, starts the command, then upgrades.
#[utoipa::path(get, path = "/apps/{app_name}/machines/{machine_id}/console", tag = "Machines",
    operation_id = "Machines_console",
    description = "An interactive command in a started machine over a WebSocket (an Aloft \
        extension, behind `aloft ssh console`). Binary frames carry the stream in their first \
        byte (0 stdin, 1 stdout, 2 stderr); text frames are JSON controls: \
        `{\"type\":\"resize\",\"rows\":R,\"cols\":C}` and `{\"type\":\"eof\"}` from the client, \
        `{\"type\":\"exit\",\"code\":N,\"signal\":N}` last from the server. Needs a deploy token.",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("machine_id" = String, Path, description = "Machine ID"),
        ("cmd" = Option<String>, Query, description = "Command line, run as `/bin/sh -c CMD` (default: `/bin/sh`)"),
        ("tty" = Option<bool>, Query, description = "Run on a pseudo-terminal"),
        ("rows" = Option<u16>, Query, description = "The terminal's first height (default 24)"),
        ("cols" = Option<u16>, Query, description = "The terminal's first width (default 80)"),
        ("term" = Option<String>, Query, description = "The command's TERM with a tty (default xterm)")),
    responses((status = 101, description = "Switching Protocols: the command runs; frames follow"),
        (status = 400, description = "Bad Request (not a WebSocket upgrade, or the command cannot start)", body = ErrorResponse),
        (status = 403, description = "Forbidden (the token is read-only)", body = ErrorResponse),
        (status = 404, description = "Not Found", body = ErrorResponse),
        (status = 409, description = "Conflict (the machine is not started)", body = ErrorResponse)))]
pub async fn console(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    principal: Option<Extension<Arc<Principal>>>,
    Query(q): Query<ConsoleQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let role = principal.map(|Extension(p)| p.role);
    if role.is_none_or(|r| r < Role::Deploy) {
        return Err(ApiError::Forbidden(format!(
            "token role {role:?} may not open a console on app {app:?} (needs Deploy)"
        )));
    }
    // Not a WebSocket request: refuse before anything runs in the machine.
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    let agent = machine_agent(&state, &app, &id).await?;
    let session = agent.console(&app, &id, q.request()).await?;
    tracing::info!(app = %app, machine = %id, pid = session.pid, tty = q.tty, "console opened");
    Ok(ws
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| pump(socket, session)))
}

/// Moves frames between the socket and the session until the command exits or the
/// client goes away.
async fn pump(mut socket: WebSocket, session: ConsoleSession) {
    let ConsoleSession {
        input, mut output, ..
    } = session;
    let mut input = Some(input);
    loop {
        tokio::select! {
            out = output.recv() => {
                let msg = match out {
                    Some(ConsoleOutput::Stdout(d)) => frame(STDOUT, &d),
                    Some(ConsoleOutput::Stderr(d)) => frame(STDERR, &d),
                    Some(ConsoleOutput::Exit { code, signal }) => {
                        let text = serde_json::to_string(&Control::Exit { code, signal })
                            .unwrap_or_default();
                        let _ = socket.send(Message::Text(text.into())).await;
                        let _ = socket.send(Message::Close(None)).await;
                        return;
                    }
                    None => {
                        let _ = socket.send(Message::Close(None)).await;
                        return;
                    }
                };
                if socket.send(msg).await.is_err() {
                    return;
                }
            }
            msg = socket.recv() => {
                let item = match msg {
                    Some(Ok(Message::Binary(b))) => match b.split_first() {
                        Some((&STDIN, data)) => Some(ConsoleInput::Stdin(data.to_vec())),
                        _ => None,
                    },
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<Control>(&t) {
                        Ok(Control::Resize { rows, cols }) => Some(ConsoleInput::Resize { rows, cols }),
                        Ok(Control::Eof) => Some(ConsoleInput::Eof),
                        _ => None,
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        // Dropping the input tells the agent the client left.
                        return;
                    }
                    Some(Ok(_)) => None,
                };
                if let (Some(item), Some(tx)) = (item, input.as_ref())
                    && tx.send(item).await.is_err()
                {
                    input = None;
                }
            }
        }
    }
}

fn frame(stream: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(stream);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_becomes_a_shell_command() {
        let q = ConsoleQuery {
            cmd: Some("echo hi; exit 3".into()),
            ..Default::default()
        };
        let r = q.request();
        assert_eq!(r.command, ["/bin/sh", "-c", "echo hi; exit 3"]);
        assert!(!r.tty && r.env.is_empty());
        let q = ConsoleQuery {
            tty: true,
            rows: Some(40),
            cols: Some(0),
            ..Default::default()
        };
        let r = q.request();
        assert_eq!(r.command, ["/bin/sh"]);
        assert_eq!((r.tty, r.rows, r.cols), (true, 40, 80));
        assert_eq!(r.env["TERM"], "xterm");
    }

    #[test]
    fn control_frames_are_tagged_json() {
        let t = serde_json::to_string(&Control::Resize { rows: 5, cols: 9 }).unwrap();
        assert_eq!(t, r#"{"type":"resize","rows":5,"cols":9}"#);
        let e: Control = serde_json::from_str(r#"{"type":"exit","code":3,"signal":null}"#).unwrap();
        assert_eq!(
            e,
            Control::Exit {
                code: Some(3),
                signal: None
            }
        );
    }

    /// The role check happens in the handler (the middleware lets any token GET):
    /// a read-only token is refused, a deploy token gets past it to the upgrade.
    #[tokio::test]
    async fn console_needs_a_deploy_token() {
        use axum::body::Body;
        use axum::http::Request;
        use tower::ServiceExt;

        let dir = tempfile::tempdir().unwrap();
        let store = aloft_store::SqliteStore::open(dir.path().join("catalog.db"))
            .await
            .unwrap();
        let state = ApiState::new(Arc::new(store), Vec::new(), dir.path())
            .await
            .unwrap();
        let token = |role| {
            let state = state.clone();
            async move {
                crate::create_token(&state, "t", "personal", None, role)
                    .await
                    .unwrap()
                    .token
            }
        };
        let (admin, deploy, ro) = (
            token(Role::Admin).await,
            token(Role::Deploy).await,
            token(Role::Readonly).await,
        );
        let router = crate::router(state);
        let send = |method: &str, uri: &str, token: &str, body: &str| {
            let req = Request::builder()
                .method(method)
                .uri(uri)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            router.clone().oneshot(req)
        };
        let created = send(
            "POST",
            "/v1/apps",
            &admin,
            r#"{"app_name":"web","org_slug":"personal"}"#,
        )
        .await
        .unwrap();
        assert!(created.status().is_success(), "{:?}", created.status());
        let uri = "/v1/apps/web/machines/m1/console?cmd=true";
        let resp = send("GET", uri, &ro, "").await.unwrap();
        assert_eq!(resp.status(), 403);
        let body = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("needs Deploy"));
        // A plain GET (no upgrade) with a deploy token is refused as not a WebSocket.
        let resp = send("GET", uri, &deploy, "").await.unwrap();
        assert!(resp.status().is_client_error() && resp.status() != 403);
    }
}
