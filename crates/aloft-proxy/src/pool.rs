//! Upstream HTTP/1.1 connections, kept alive per backend and reused LIFO.
//!
//! A connection goes back to its pool only once its response body has ended (see
//! [`crate::body::UpstreamBody`]); a checked-out one is waited on until hyper says it
//! can take the next request, and dropped if it closed meanwhile.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::ReqBody;

/// Idle connections kept per backend; more are closed when they come back.
const MAX_IDLE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("connecting to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Vec<SendRequest<ReqBody>>>,
}

impl Pool {
    pub(crate) fn new() -> Self {
        Pool::default()
    }

    fn pop(&self) -> Option<SendRequest<ReqBody>> {
        // A poisoned lock only means another thread panicked mid-push/pop; the Vec is
        // still a valid list of connections.
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.pop()
    }

    /// Return a connection whose last response has ended.
    pub(crate) fn put(&self, sender: SendRequest<ReqBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    /// Number of idle connections (for tests and metrics).
    pub fn idle_len(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// An idle connection ready for a request, or a new one to `addr`. The flag says
    /// whether it was reused (a reused one may have been closed by the peer meanwhile).
    pub(crate) async fn checkout(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<(SendRequest<ReqBody>, bool), ConnectError> {
        while let Some(mut sender) = self.pop() {
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Ok((sender, true));
            }
        }
        connect(addr, connect_timeout).await.map(|s| (s, false))
    }
}

/// Open a new HTTP/1.1 connection to `addr`; its driver runs as its own task.
pub(crate) async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<SendRequest<ReqBody>, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(ConnectError::Timeout {
                addr,
                after: timeout,
            });
        }
        Ok(Err(source)) => return Err(ConnectError::Io { addr, source }),
        Ok(Ok(s)) => s,
    };
    stream
        .set_nodelay(true)
        .map_err(|source| ConnectError::Io { addr, source })?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ConnectError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}
