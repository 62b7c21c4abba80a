//! The upstream side: HTTP/1.1 to machines, written inline in the client's task.
//!
//! Each client connection's task writes the request to a pooled upstream connection,
//! parses the response head (httparse) and streams the body itself, decoding
//! Content-Length, chunked and close-delimited framing. No extra task or channel
//! sits between the two sockets. A connection goes back to its backend's pool only
//! after its response body has been read to the end and the machine kept it alive.
//! Because requests are serialised from a borrowed head, a request whose body is
//! still unconsumed can be sent again to another machine.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::balance::Lease;
use crate::body::ReqBody;

/// Idle connections kept per backend; more are closed when they come back.
const MAX_IDLE: usize = 1024;
/// Largest response head accepted from a machine.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most header fields in a response head from a machine.
const MAX_RESPONSE_HEADERS: usize = 128;
/// Longest chunk-size or trailer line.
const MAX_CHUNK_LINE: usize = 4096;
/// Read size for upstream bodies.
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("connecting to {addr}: {source}")]
    Io { addr: SocketAddr, source: io::Error },
}

/// Why one upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("writing the request to {addr}: {source}")]
    Write { addr: SocketAddr, source: io::Error },
    #[error("reading the request body from the client: {0}")]
    ClientBody(hyper::Error),
    #[error("the client sent no request body data for {0:?}")]
    ClientBodyStalled(Duration),
    #[error("reading the response from {addr}: {source}")]
    Read { addr: SocketAddr, source: io::Error },
    #[error("{addr} sent no response head within {after:?}")]
    ResponseTimeout { addr: SocketAddr, after: Duration },
    #[error("{addr} closed the connection before responding")]
    ClosedEarly { addr: SocketAddr },
    #[error("{addr} sent a malformed response: {why}")]
    Malformed { addr: SocketAddr, why: String },
}

impl UpstreamError {
    /// Did it fail before the machine could have seen a complete request?
    pub(crate) fn before_response(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_)
                | UpstreamError::Write { .. }
                | UpstreamError::ClosedEarly { .. }
                | UpstreamError::Read { .. }
        )
    }
}

/// One keep-alive connection to a machine.
#[derive(Debug)]
pub(crate) struct UpConn {
    stream: TcpStream,
    addr: SocketAddr,
    buf: BytesMut,
    wbuf: Vec<u8>,
    /// Served at least one response before (a reused connection may have been closed
    /// by the machine meanwhile).
    pub(crate) reused: bool,
}

impl UpConn {
    /// The socket and any bytes already read past the response head.
    pub(crate) fn into_io(self) -> (TcpStream, BytesMut) {
        (self.stream, self.buf)
    }

    /// Is an idle connection still usable? Idle connections have nothing to read; a
    /// readable one has either been closed by the machine or sent garbage.
    fn alive(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// Idle upstream connections of one backend, reused LIFO.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Vec<UpConn>>,
}

impl Pool {
    pub(crate) fn new() -> Self {
        Pool::default()
    }

    fn pop(&self) -> Option<UpConn> {
        // A poisoned lock only means a thread panicked between push and pop; the Vec
        // is still a valid list of connections.
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    pub(crate) fn put(&self, conn: UpConn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// Number of idle connections (for tests and metrics).
    pub fn idle_len(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A live idle connection, or a new one to `addr`.
    pub(crate) async fn checkout(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<UpConn, ConnectError> {
        while let Some(mut conn) = self.pop() {
            if conn.alive() {
                return Ok(conn);
            }
        }
        connect(addr, connect_timeout).await
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<UpConn, ConnectError> {
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
    Ok(UpConn {
        stream,
        addr,
        buf: BytesMut::with_capacity(READ_CHUNK),
        wbuf: Vec::with_capacity(1024),
        reused: false,
    })
}

/// The HTTP/2 (h2c) connection to one machine, shared by all requests to it (services
/// with `h2_backend`, e.g. gRPC). A new one is made when it closes.
#[derive(Debug, Default)]
pub struct H2Conn {
    sender: Mutex<Option<hyper::client::conn::http2::SendRequest<ReqBody>>>,
}

impl H2Conn {
    /// The live connection to `addr`, or a new one.
    pub(crate) async fn get(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<hyper::client::conn::http2::SendRequest<ReqBody>, ConnectError> {
        {
            let cur = self.sender.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = cur.as_ref().filter(|s| !s.is_closed()) {
                return Ok(s.clone());
            }
        }
        let conn = connect(addr, timeout).await?;
        let handshake =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(conn.stream));
        let (sender, driver) = match tokio::time::timeout(timeout, handshake).await {
            Err(_) => {
                return Err(ConnectError::Timeout {
                    addr,
                    after: timeout,
                });
            }
            Ok(Err(e)) => {
                return Err(ConnectError::Io {
                    addr,
                    source: io::Error::other(e),
                });
            }
            Ok(Ok(x)) => x,
        };
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(%addr, error = %e, "h2 connection to machine ended");
            }
        });
        *self.sender.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
        Ok(sender)
    }
}

/// Send one request over the HTTP/2 connection `sender` to `addr`; the response head
/// comes back, its body (with trailers) streams.
pub(crate) async fn h2_request(
    mut sender: hyper::client::conn::http2::SendRequest<ReqBody>,
    addr: SocketAddr,
    head: &Head<'_>,
    authority: &str,
    body: ReqBody,
    response_timeout: Duration,
) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(head.target)
        .build()
        .map_err(|e| UpstreamError::Malformed {
            addr,
            why: format!("request target: {e}"),
        })?;
    let mut req = http::Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    let headers = req.headers_mut();
    headers.reserve(head.headers.len());
    for (name, value) in head.headers {
        // HTTP/2 carries the host in :authority.
        if name != header::HOST {
            headers.append(name, value.clone());
        }
    }
    let write_err = |e: hyper::Error| UpstreamError::Write {
        addr,
        source: io::Error::other(e),
    };
    if sender.ready().await.is_err() {
        return Err(UpstreamError::ClosedEarly { addr });
    }
    match tokio::time::timeout(response_timeout, sender.send_request(req)).await {
        Err(_) => Err(UpstreamError::ResponseTimeout {
            addr,
            after: response_timeout,
        }),
        Ok(Err(e)) => Err(write_err(e)),
        Ok(Ok(resp)) => Ok(resp),
    }
}

/// The parts of a request that go upstream, borrowed so they can be sent again.
pub(crate) struct Head<'a> {
    pub(crate) method: &'a Method,
    pub(crate) target: &'a str,
    pub(crate) headers: &'a HeaderMap,
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked(ChunkState),
    Eof,
    Done,
}

#[derive(Debug, Clone, Copy)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Whether any of the client's streamed body was taken (then no retry is possible).
pub(crate) struct Sent {
    pub(crate) body_pulled: bool,
}

/// Write `head` and `body` to `conn`. A streamed body is pulled from the client as it
/// is written; `sent.body_pulled` tells whether any of it was.
pub(crate) async fn write_request(
    conn: &mut UpConn,
    head: &Head<'_>,
    body: &mut ReqBody,
    sent: &mut Sent,
    body_stall: Duration,
) -> Result<(), UpstreamError> {
    let addr = conn.addr;
    let w = &mut conn.wbuf;
    w.clear();
    w.extend_from_slice(head.method.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(head.target.as_bytes());
    w.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in head.headers {
        w.extend_from_slice(name.as_str().as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(value.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    let has_len = head.headers.contains_key(header::CONTENT_LENGTH);
    let chunked = match body {
        ReqBody::Empty => false,
        ReqBody::Full(data) => {
            if !has_len {
                let n = data.as_ref().map_or(0, Bytes::len);
                w.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
            }
            false
        }
        ReqBody::Stream { .. } => {
            if !has_len {
                w.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
            !has_len
        }
    };
    w.extend_from_slice(b"\r\n");
    let write_err = |source| UpstreamError::Write { addr, source };
    match body {
        ReqBody::Empty => conn.stream.write_all(&conn.wbuf).await.map_err(write_err)?,
        ReqBody::Full(data) => {
            if let Some(d) = data {
                conn.wbuf.extend_from_slice(d);
            }
            conn.stream.write_all(&conn.wbuf).await.map_err(write_err)?;
        }
        ReqBody::Stream { prefix, rest } => {
            if let Some(p) = prefix {
                put_chunk(&mut conn.wbuf, p, chunked);
            }
            conn.stream.write_all(&conn.wbuf).await.map_err(write_err)?;
            loop {
                sent.body_pulled = true;
                let next = std::future::poll_fn(|cx| Pin::new(&mut *rest).poll_frame(cx));
                let frame = tokio::time::timeout(body_stall, next)
                    .await
                    .map_err(|_| UpstreamError::ClientBodyStalled(body_stall))?;
                match frame {
                    None => break,
                    Some(Err(e)) => return Err(UpstreamError::ClientBody(e)),
                    Some(Ok(f)) => {
                        if let Ok(data) = f.into_data() {
                            conn.wbuf.clear();
                            put_chunk(&mut conn.wbuf, &data, chunked);
                            conn.stream.write_all(&conn.wbuf).await.map_err(write_err)?;
                        }
                    }
                }
            }
            if chunked {
                conn.stream
                    .write_all(b"0\r\n\r\n")
                    .await
                    .map_err(write_err)?;
            }
        }
    }
    Ok(())
}

fn put_chunk(w: &mut Vec<u8>, data: &[u8], chunked: bool) {
    if data.is_empty() {
        return;
    }
    if chunked {
        w.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        w.extend_from_slice(data);
        w.extend_from_slice(b"\r\n");
    } else {
        w.extend_from_slice(data);
    }
}

/// A parsed response head.
pub(crate) struct ResponseHead {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
}

/// Read the response head (skipping 1xx interim responses) and decide the framing.
pub(crate) async fn read_response(
    mut conn: UpConn,
    method: &Method,
) -> Result<(ResponseHead, UpConn, BodyPlan), (UpstreamError, bool)> {
    let addr = conn.addr;
    let mut got_any = false;
    loop {
        if !conn.buf.is_empty() {
            got_any = true;
            match parse_head(&mut conn.buf, addr) {
                Err(e) => return Err((e, got_any)),
                Ok(None) => {}
                Ok(Some((head, version, keep_alive_hdr))) => {
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS
                    {
                        continue;
                    }
                    let plan = plan(&head, method, version, keep_alive_hdr)
                        .map_err(|why| (UpstreamError::Malformed { addr, why }, true))?;
                    return Ok((head, conn, plan));
                }
            }
            if conn.buf.len() >= MAX_RESPONSE_HEAD {
                return Err((
                    UpstreamError::Malformed {
                        addr,
                        why: format!("response head larger than {MAX_RESPONSE_HEAD} bytes"),
                    },
                    true,
                ));
            }
        }
        conn.buf.reserve(READ_CHUNK);
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) if got_any || !conn.buf.is_empty() => {
                return Err((
                    UpstreamError::Malformed {
                        addr,
                        why: "connection closed inside the response head".into(),
                    },
                    true,
                ));
            }
            Ok(0) => return Err((UpstreamError::ClosedEarly { addr }, false)),
            Ok(_) => {}
            Err(source) => return Err((UpstreamError::Read { addr, source }, got_any)),
        }
    }
}

/// Parse one response head from the front of `buf`; `None` if incomplete.
fn parse_head(
    buf: &mut BytesMut,
    addr: SocketAddr,
) -> Result<Option<(ResponseHead, Version, Option<bool>)>, UpstreamError> {
    let malformed = |why: String| UpstreamError::Malformed { addr, why };
    let mut slots = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(malformed(e.to_string())),
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| malformed(format!("status {code}")))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // One copy of the head backs every header value; the read buffer stays unshared
    // so it is reused for the next response without reallocating.
    let head_bytes = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr() as usize;
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    let mut keep_alive = None;
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| malformed(format!("header name {:?}", h.name)))?;
        let off = h.value.as_ptr() as usize - base;
        let value = HeaderValue::from_maybe_shared(head_bytes.slice(off..off + h.value.len()))
            .map_err(|_| malformed(format!("value of header {name}")))?;
        if name == header::CONNECTION {
            for token in value.to_str().unwrap_or("").split(',') {
                let t = token.trim();
                if t.eq_ignore_ascii_case("close") {
                    keep_alive = Some(false);
                } else if t.eq_ignore_ascii_case("keep-alive") && keep_alive.is_none() {
                    keep_alive = Some(true);
                }
            }
        }
        headers.append(name, value);
    }
    buf.advance(len);
    Ok(Some((
        ResponseHead { status, headers },
        version,
        keep_alive,
    )))
}

/// How the body will be read and whether the connection can be kept afterwards.
pub(crate) struct BodyPlan {
    framing: Framing,
    keep_alive: bool,
}

fn plan(
    head: &ResponseHead,
    method: &Method,
    version: Version,
    keep_alive_hdr: Option<bool>,
) -> Result<BodyPlan, String> {
    let keep_alive = match version {
        Version::HTTP_10 => keep_alive_hdr == Some(true),
        _ => keep_alive_hdr != Some(false),
    };
    let s = head.status;
    if *method == Method::HEAD
        || s.is_informational()
        || s == StatusCode::NO_CONTENT
        || s == StatusCode::NOT_MODIFIED
    {
        return Ok(BodyPlan {
            framing: Framing::Done,
            keep_alive,
        });
    }
    if let Some(te) = head.headers.get(header::TRANSFER_ENCODING) {
        let last = te
            .to_str()
            .unwrap_or("")
            .rsplit(',')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if head.headers.contains_key(header::CONTENT_LENGTH) {
            return Err("both Content-Length and Transfer-Encoding".into());
        }
        return Ok(if last == "chunked" {
            BodyPlan {
                framing: Framing::Chunked(ChunkState::Size),
                keep_alive,
            }
        } else {
            BodyPlan {
                framing: Framing::Eof,
                keep_alive: false,
            }
        });
    }
    let mut len: Option<u64> = None;
    for v in head.headers.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().map_err(|_| "bad Content-Length")?.split(',') {
            let n: u64 = part
                .trim()
                .parse()
                .map_err(|_| format!("bad Content-Length {part:?}"))?;
            if len.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length values".into());
            }
            len = Some(n);
        }
    }
    Ok(match len {
        Some(0) => BodyPlan {
            framing: Framing::Done,
            keep_alive,
        },
        Some(n) => BodyPlan {
            framing: Framing::Length(n),
            keep_alive,
        },
        None => BodyPlan {
            framing: Framing::Eof,
            keep_alive: false,
        },
    })
}

/// A response body being read from a machine; when it ends cleanly the connection
/// returns to the pool and the machine's slot is released.
pub struct UpstreamBody {
    conn: Option<UpConn>,
    framing: Framing,
    keep_alive: bool,
    lease: Option<Lease>,
    machine: std::sync::Arc<str>,
    /// An HTTP/2 response body from the machine (data and trailers pass through).
    h2: Option<Box<(hyper::body::Incoming, SocketAddr)>>,
    /// The access log line, written when the body ends or is dropped.
    access: Option<Box<crate::metrics::AccessLog>>,
}

/// A response body from a machine that broke off.
#[derive(Debug, thiserror::Error)]
#[error("response body from {addr}: {why}")]
pub struct UpstreamBodyError {
    addr: SocketAddr,
    why: String,
}

impl UpstreamBody {
    pub(crate) fn new(conn: UpConn, plan: BodyPlan, lease: Lease) -> Self {
        let mut body = UpstreamBody {
            conn: Some(conn),
            framing: plan.framing,
            keep_alive: plan.keep_alive,
            machine: std::sync::Arc::clone(&lease.backend().machine_id),
            lease: Some(lease),
            h2: None,
            access: None,
        };
        if matches!(body.framing, Framing::Done) {
            body.finish();
        }
        body
    }

    /// A machine's HTTP/2 response body; the lease is held until it ends.
    pub(crate) fn h2(body: hyper::body::Incoming, addr: SocketAddr, lease: Lease) -> Self {
        UpstreamBody {
            conn: None,
            framing: Framing::Eof,
            keep_alive: false,
            machine: std::sync::Arc::clone(&lease.backend().machine_id),
            lease: Some(lease),
            h2: Some(Box::new((body, addr))),
            access: None,
        }
    }

    /// Attach the request's access log line; it counts the body bytes sent and is
    /// written when the body is dropped (right after its end, or when the client
    /// goes away).
    pub(crate) fn set_access(&mut self, mut log: Box<crate::metrics::AccessLog>) {
        log.machine = Some(std::sync::Arc::clone(&self.machine));
        if matches!(self.framing, Framing::Done) {
            drop(log);
        } else {
            self.access = Some(log);
        }
    }

    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let (Some(mut conn), Some(lease)) = (self.conn.take(), self.lease.take()) {
            if self.keep_alive && conn.buf.is_empty() {
                conn.reused = true;
                lease.backend().pool.put(conn);
            }
            drop(lease);
        }
    }

    fn fail(&mut self, why: impl Into<String>) -> UpstreamBodyError {
        let addr = self
            .conn
            .as_ref()
            .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.addr);
        self.framing = Framing::Done;
        self.conn = None;
        self.lease = None;
        UpstreamBodyError {
            addr,
            why: why.into(),
        }
    }

    /// Decode what is buffered: `Some(frame)`, or `None` when more input is needed
    /// (or the body is done, see `framing`).
    fn decode(&mut self) -> Result<Option<Bytes>, UpstreamBodyError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let buf = &mut conn.buf;
        loop {
            match self.framing {
                Framing::Done => return Ok(None),
                Framing::Eof => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = buf.len();
                    return Ok(Some(take_bytes(buf, n)));
                }
                Framing::Length(rem) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = (rem as usize).min(buf.len());
                    let data = take_bytes(buf, take);
                    let left = rem - take as u64;
                    if left == 0 {
                        self.finish();
                    } else {
                        self.framing = Framing::Length(left);
                    }
                    return Ok(Some(data));
                }
                Framing::Chunked(ChunkState::Size) => {
                    let Some(pos) = find_crlf(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(self.fail("chunk size line too long"));
                        }
                        return Ok(None);
                    };
                    let line = &buf[..pos];
                    let digits = line.split(|&b| b == b';').next().unwrap_or(b"");
                    let text = std::str::from_utf8(digits).unwrap_or("").trim();
                    let size = match u64::from_str_radix(text, 16) {
                        Ok(n) => n,
                        Err(_) => {
                            let why = format!("bad chunk size {text:?}");
                            return Err(self.fail(why));
                        }
                    };
                    buf.advance(pos + 2);
                    self.framing = Framing::Chunked(if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    });
                }
                Framing::Chunked(ChunkState::Data(rem)) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = (rem as usize).min(buf.len());
                    let data = take_bytes(buf, take);
                    let left = rem - take as u64;
                    self.framing = Framing::Chunked(if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    });
                    return Ok(Some(data));
                }
                Framing::Chunked(ChunkState::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(self.fail("chunk not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.framing = Framing::Chunked(ChunkState::Size);
                }
                Framing::Chunked(ChunkState::Trailers) => {
                    let Some(pos) = find_crlf(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(self.fail("trailer line too long"));
                        }
                        return Ok(None);
                    };
                    buf.advance(pos + 2);
                    if pos == 0 {
                        self.finish();
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// The first `n` bytes of `buf`: small pieces are copied so the read buffer stays
/// unshared and is reused; big ones are split off without copying.
fn take_bytes(buf: &mut BytesMut, n: usize) -> Bytes {
    if n <= 8192 {
        let b = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        b
    } else {
        buf.split_to(n).freeze()
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        let this = self.get_mut();
        if let Some(h2) = this.h2.as_mut() {
            let (body, addr) = &mut **h2;
            return match Pin::new(body).poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => {
                    this.framing = Framing::Done;
                    this.lease = None;
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let (Some(a), Some(d)) = (this.access.as_mut(), frame.data_ref()) {
                        a.bytes += d.len() as u64;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    let err = UpstreamBodyError {
                        addr: *addr,
                        why: e.to_string(),
                    };
                    this.framing = Framing::Done;
                    this.lease = None;
                    Poll::Ready(Some(Err(err)))
                }
            };
        }
        loop {
            match this.decode() {
                Err(e) => return Poll::Ready(Some(Err(e))),
                Ok(Some(data)) => {
                    if let Some(a) = this.access.as_mut() {
                        a.bytes += data.len() as u64;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) => {}
            }
            if matches!(this.framing, Framing::Done) {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            conn.buf.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(this.fail(e.to_string())))),
                Poll::Ready(Ok(0)) => {
                    if matches!(this.framing, Framing::Eof) {
                        this.keep_alive = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(
                        this.fail("connection closed before the body ended")
                    )));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if let Some(h2) = &self.h2 {
            let b = &h2.0;
            return matches!(self.framing, Framing::Done) || b.is_end_stream();
        }
        matches!(self.framing, Framing::Done)
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(h2) = &self.h2 {
            let b = &h2.0;
            return b.size_hint();
        }
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> (ResponseHead, Version, Option<bool>) {
        let mut b = BytesMut::from(text);
        parse_head(&mut b, "127.0.0.1:1".parse().unwrap())
            .unwrap()
            .unwrap()
    }

    #[test]
    fn plans_framing() {
        let (h, v, k) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        let p = plan(&h, &Method::GET, v, k).unwrap();
        assert!(matches!(p.framing, Framing::Length(5)) && p.keep_alive);
        let (h, v, k) =
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
        let p = plan(&h, &Method::GET, v, k).unwrap();
        assert!(matches!(p.framing, Framing::Chunked(_)) && !p.keep_alive);
        let (h, v, k) = head("HTTP/1.0 200 OK\r\n\r\n");
        let p = plan(&h, &Method::GET, v, k).unwrap();
        assert!(matches!(p.framing, Framing::Eof) && !p.keep_alive);
        let (h, v, k) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        assert!(matches!(
            plan(&h, &Method::HEAD, v, k).unwrap().framing,
            Framing::Done
        ));
        let (h, v, k) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        assert!(plan(&h, &Method::GET, v, k).is_err());
    }
}
