//! `aloft ssh console [-a APP] [--machine ID] [-C CMD]`: an interactive shell (or one
//! command) in a machine of the app, over the API's console WebSocket
//! (`aloft_api::console` documents the frames).
//!
//! With a terminal on stdin the command runs on a pseudo-terminal: the local terminal
//! is put in raw mode (and restored on every way out), its size is sent at the start
//! and on SIGWINCH. Without one (pipes, scripts) stdin is streamed until EOF and
//! stdout and stderr stay apart. The remote command's exit code is the CLI's. An
//! `https://` API URL gives `wss://`, trusting the roots the HTTP client trusts.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use aloft_api::console::{Control, STDERR, STDIN, STDOUT};
use aloft_types::datadir::DataDir;
use aloft_types::machine::{Machine, MachineState};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use futures::{SinkExt, StreamExt};
use tokio::signal::unix::{SignalKind, signal};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::client::{Api, block_on, enc};
use super::common::{AppArgs, machine_group};

#[derive(Args, Debug)]
pub struct SshArgs {
    #[command(flatten)]
    pub common: AppArgs,
    #[command(subcommand)]
    pub cmd: SshCommand,
}

#[derive(Subcommand, Debug)]
pub enum SshCommand {
    /// Open a shell (or run -C CMD) in one of the app's machines.
    Console {
        /// The machine (default: a started machine of the app, `app` group first).
        #[arg(long = "machine", short = 's', value_name = "ID")]
        machine: Option<String>,
        /// Run this command line (with /bin/sh -c) instead of a shell.
        #[arg(short = 'C', long = "command", value_name = "CMD")]
        command: Option<String>,
        /// Use a pseudo-terminal even when stdin is not a terminal.
        #[arg(long, conflicts_with = "no_pty")]
        pty: bool,
        /// Never use a pseudo-terminal.
        #[arg(long = "no-pty")]
        no_pty: bool,
    },
}

pub fn run(args: SshArgs, data_dir: &DataDir) -> Result<ExitCode> {
    let app = args.common.app()?;
    let api = Api::connect(data_dir)?;
    match args.cmd {
        SshCommand::Console {
            machine,
            command,
            pty,
            no_pty,
        } => {
            let stdin_tty = std::io::stdin().is_terminal();
            let tty = pty || (!no_pty && stdin_tty);
            block_on(console(api, app, machine, command, tty, stdin_tty))?
        }
    }
}

/// The machine to open the console on: the one asked for, else a started one.
async fn pick_machine(api: &Api, app: &str, wanted: Option<String>) -> Result<String> {
    if let Some(id) = wanted {
        return Ok(id);
    }
    let mut started: Vec<Machine> = api
        .list_machines(app)
        .await?
        .into_iter()
        .filter(|m| m.state == MachineState::Started)
        .collect();
    started.sort_by_key(|m| machine_group(m) != aloft_types::appconfig::DEFAULT_GROUP);
    match started.first() {
        Some(m) => Ok(m.id.clone()),
        None => bail!("app {app} has no started machine; start one or pass --machine ID"),
    }
}

/// The terminal size of stdout (else stdin), if either is a terminal.
fn window_size() -> Option<(u16, u16)> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Raw mode on stdin's terminal while alive; the saved settings come back on drop.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).context("reading the terminal mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)
            .context("setting the terminal to raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// The console URL: the API's base with ws:// and the query.
fn console_url(
    api: &Api,
    app: &str,
    id: &str,
    command: Option<&str>,
    tty: bool,
    size: Option<(u16, u16)>,
) -> Result<String> {
    let base = api.base();
    let ws = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        bail!("unexpected API URL {base}");
    };
    let mut url = format!(
        "{ws}/apps/{}/machines/{}/console?tty={tty}",
        enc(app),
        enc(id)
    );
    if let Some(c) = command {
        url.push_str(&format!("&cmd={}", enc(c)));
    }
    if let Some((rows, cols)) = size {
        url.push_str(&format!("&rows={rows}&cols={cols}"));
    }
    if tty && let Ok(term) = std::env::var("TERM") {
        url.push_str(&format!("&term={}", enc(&term)));
    }
    Ok(url)
}

/// A byte stream the WebSocket runs over: plain TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// Opens the WebSocket of `req` (ws:// or wss://). wss:// trusts the roots the CLI's
/// HTTP client trusts (the platform verifier: the system store, `SSL_CERT_FILE`).
async fn open_ws(
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::UrlError;
    let uri = req.uri().clone();
    let tls = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err(WsError::Url(UrlError::UnsupportedUrlScheme)),
    };
    let host = uri
        .host()
        .ok_or(WsError::Url(UrlError::NoHostName))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = if tls {
        use rustls_platform_verifier::ConfigVerifierExt;
        let tls_err = |e: rustls::Error| WsError::Io(std::io::Error::other(e));
        let mut config = rustls::ClientConfig::with_platform_verifier().map_err(tls_err)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| WsError::Url(UrlError::NoHostName))?;
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        Box::new(connector.connect(name, tcp).await?)
    } else {
        Box::new(tcp)
    };
    let (ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    Ok(ws)
}

/// Reads stdin on a thread of its own (a blocked read must not hold up the exit):
/// chunks, then `None` at EOF or on an error.
fn stdin_reader() -> tokio::sync::mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

fn binary(stream: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(stream);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

fn control(c: &Control) -> Message {
    Message::Text(serde_json::to_string(c).unwrap_or_default().into())
}

/// The exit code of a `{"type":"exit"}` frame: the code, else 128 + the signal.
fn exit_code(code: Option<i32>, signal: Option<i32>) -> u8 {
    match (code, signal) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        (None, None) => 1,
    }
}

async fn console(
    api: Api,
    app: String,
    machine: Option<String>,
    command: Option<String>,
    tty: bool,
    stdin_tty: bool,
) -> Result<ExitCode> {
    let id = pick_machine(&api, &app, machine).await?;
    let size = if tty {
        Some(window_size().unwrap_or((24, 80)))
    } else {
        None
    };
    let url = console_url(&api, &app, &id, command.as_deref(), tty, size)?;
    let mut req = url
        .as_str()
        .into_client_request()
        .with_context(|| format!("console URL {url}"))?;
    if !api.token().is_empty() {
        let value = format!("Bearer {}", api.token())
            .parse()
            .context("the API token is not a valid header value")?;
        req.headers_mut().insert("authorization", value);
    }
    let ws = match open_ws(req).await {
        Ok(c) => c,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status();
            let body = resp.body().as_deref().unwrap_or_default();
            let message = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
            bail!("console on machine {id} of app {app}: {status}: {message}");
        }
        Err(e) => {
            bail!(
                "console on machine {id} of app {app}: cannot connect to {} (from {}): {e}",
                api.base(),
                api.source()
            )
        }
    };
    let (mut sink, mut stream) = ws.split();
    // From here on the terminal is raw until this guard drops (any return below).
    let _raw = if tty && stdin_tty {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let mut winch = signal(SignalKind::window_change()).context("watching SIGWINCH")?;
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut hup = signal(SignalKind::hangup()).context("watching SIGHUP")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let mut input = stdin_reader();
    let mut stdin_open = true;
    let mut last_size = size;
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => match b.split_first() {
                    Some((&STDOUT, data)) => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(data).and_then(|_| out.flush()).context("writing stdout")?;
                    }
                    Some((&STDERR, data)) => {
                        let mut err = std::io::stderr().lock();
                        err.write_all(data).and_then(|_| err.flush()).context("writing stderr")?;
                    }
                    _ => {}
                },
                Some(Ok(Message::Text(t))) => {
                    if let Ok(Control::Exit { code, signal }) = serde_json::from_str::<Control>(&t) {
                        let _ = sink.close().await;
                        return Ok(ExitCode::from(exit_code(code, signal)));
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    bail!("console on machine {id}: the connection closed before the command exited");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("console on machine {id}: {e}"),
            },
            chunk = input.recv(), if stdin_open => match chunk {
                Some(Some(data)) => sink.send(binary(STDIN, &data)).await.context("sending stdin")?,
                _ => {
                    stdin_open = false;
                    sink.send(control(&Control::Eof)).await.context("sending end of stdin")?;
                }
            },
            _ = winch.recv() => {
                if tty && let Some((rows, cols)) = window_size()
                    && last_size != Some((rows, cols))
                {
                    last_size = Some((rows, cols));
                    sink.send(control(&Control::Resize { rows, cols })).await.context("sending the window size")?;
                }
            }
            // Not in raw mode these end the session (the remote command sees the
            // connection go); in raw mode ^C is a byte sent to the remote side.
            _ = int.recv() => bail!("interrupted"),
            _ = term.recv() => bail!("terminated"),
            _ = hup.recv() => bail!("hung up"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(Some(3), None), 3);
        assert_eq!(exit_code(Some(256 + 7), None), 7);
        assert_eq!(exit_code(None, Some(9)), 137);
        assert_eq!(exit_code(None, None), 1);
    }
}
