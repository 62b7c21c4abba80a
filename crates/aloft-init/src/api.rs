//! The app-facing metadata API on the unix socket `/.fly/api`: HTTP/1.0-style
//! `GET /v1/metadata`, `GET|POST|DELETE /v1/metadata/KEY`, one request per connection.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// A request that is still arriving.
pub struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

pub struct Api {
    listener: UnixListener,
    pub conns: Vec<Conn>,
}

const MAX_REQUEST: usize = 1 << 20;
const MAX_CONNS: usize = 64;

/// What a complete request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    List,
    Get(String),
    Set(String, String),
    Delete(String),
    Bad(u16, &'static str),
}

/// Parses a whole request if `buf` holds one; `None` while more bytes are needed.
pub fn parse_request(buf: &[u8]) -> Option<Request> {
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2))?;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.lines();
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Some(Request::Bad(400, "malformed request line"));
    };
    let content_length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    if buf.len() < head_end + content_length {
        return None;
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + content_length]).to_string();
    let path = path.split('?').next().unwrap_or_default();
    let key = match path.strip_prefix("/v1/metadata") {
        Some("") | Some("/") => None,
        Some(rest) => match rest.strip_prefix('/') {
            Some(k) => Some(k.to_string()),
            None => return Some(Request::Bad(404, "not found")),
        },
        None => return Some(Request::Bad(404, "not found")),
    };
    Some(match (method, key) {
        ("GET", None) => Request::List,
        ("GET", Some(k)) => Request::Get(k),
        ("POST" | "PUT", Some(k)) => {
            Request::Set(k, body.trim_end_matches(['\r', '\n']).to_string())
        }
        ("DELETE", Some(k)) => Request::Delete(k),
        _ => Request::Bad(405, "method not allowed"),
    })
}

/// Applies a request to the metadata; returns (status, content type, body).
pub fn answer(
    req: Request,
    metadata: &mut BTreeMap<String, String>,
) -> (u16, &'static str, String) {
    match req {
        Request::List => (
            200,
            "application/json",
            serde_json::to_string(metadata).unwrap_or_default(),
        ),
        Request::Get(k) => match metadata.get(&k) {
            Some(v) => (200, "text/plain", v.clone()),
            None => (404, "text/plain", format!("no metadata key {k:?}\n")),
        },
        Request::Set(k, v) => {
            metadata.insert(k, v);
            (204, "text/plain", String::new())
        }
        Request::Delete(k) => {
            metadata.remove(&k);
            (204, "text/plain", String::new())
        }
        Request::Bad(code, msg) => (code, "text/plain", format!("{msg}\n")),
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        _ => "Error",
    }
}

impl Api {
    pub fn bind(path: &Path) -> io::Result<Api> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        // World-accessible: the app may run as any user.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        Ok(Api {
            listener,
            conns: Vec::new(),
        })
    }

    pub fn pollfds(&self, out: &mut Vec<libc::pollfd>) {
        out.push(libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for c in &self.conns {
            out.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
    }

    /// Accepts, reads and answers whatever is ready; drops stalled connections.
    pub fn service(&mut self, metadata: &mut BTreeMap<String, String>, now: Instant) {
        while self.conns.len() < MAX_CONNS {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.conns.push(Conn {
                            stream,
                            buf: Vec::new(),
                            deadline: now + Duration::from_secs(5),
                        });
                    }
                }
                Err(_) => break,
            }
        }
        self.conns.retain_mut(|c| {
            let mut chunk = [0u8; 4096];
            let mut closed = false;
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let req = if c.buf.len() > MAX_REQUEST {
                Some(Request::Bad(413, "request too large"))
            } else {
                parse_request(&c.buf)
            };
            match req {
                Some(req) => {
                    let (code, ctype, body) = answer(req, metadata);
                    let resp = format!(
                        "HTTP/1.0 {code} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        reason(code),
                        body.len()
                    );
                    // Small responses fit the socket buffer; a client that does not
                    // read them loses them.
                    let _ = c.stream.set_nonblocking(false);
                    let _ = c.stream.set_write_timeout(Some(Duration::from_millis(200)));
                    let _ = c.stream.write_all(resp.as_bytes());
                    false
                }
                None => !closed && now < c.deadline,
            }
        });
    }

    /// Whether requests are in progress (the main loop then wakes to expire them).
    pub fn has_conns(&self) -> bool {
        !self.conns.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(parse_request(b"GET /v1/metadata/role HTTP/1.0\r\n"), None);
        assert_eq!(
            parse_request(b"GET /v1/metadata/role HTTP/1.0\r\n\r\n"),
            Some(Request::Get("role".into()))
        );
        assert_eq!(
            parse_request(b"GET /v1/metadata HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Request::List)
        );
        let post = b"POST /v1/metadata/role HTTP/1.0\r\nContent-Length: 7\r\n\r\nprim";
        assert_eq!(parse_request(post), None, "body incomplete");
        let post = b"POST /v1/metadata/role HTTP/1.0\r\ncontent-length: 7\r\n\r\nprimary";
        assert_eq!(
            parse_request(post),
            Some(Request::Set("role".into(), "primary".into()))
        );
        assert_eq!(
            parse_request(b"GET /other HTTP/1.0\r\n\r\n"),
            Some(Request::Bad(404, "not found"))
        );
        assert_eq!(
            parse_request(b"PATCH /v1/metadata/x HTTP/1.0\r\n\r\n"),
            Some(Request::Bad(405, "method not allowed"))
        );
        assert_eq!(
            parse_request(b"\r\n\r\n"),
            Some(Request::Bad(400, "malformed request line"))
        );
    }

    #[test]
    fn served_over_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("aloft-init-api-{}", std::process::id()));
        let path = dir.join("api");
        let mut api = Api::bind(&path).unwrap();
        let mut md = BTreeMap::new();
        let client = {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for req in [
                    "POST /v1/metadata/role HTTP/1.0\r\nContent-Length: 7\r\n\r\nprimary"
                        .to_string(),
                    "GET /v1/metadata/role HTTP/1.0\r\n\r\n".to_string(),
                    "GET /v1/metadata/none HTTP/1.0\r\n\r\n".to_string(),
                ] {
                    let mut s = UnixStream::connect(&path).unwrap();
                    s.write_all(req.as_bytes()).unwrap();
                    let mut resp = String::new();
                    s.read_to_string(&mut resp).unwrap();
                    out.push(resp);
                }
                out
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !client.is_finished() {
            assert!(Instant::now() < deadline, "client did not finish");
            let mut fds = Vec::new();
            api.pollfds(&mut fds);
            crate::sys::poll(&mut fds, 50).unwrap();
            api.service(&mut md, Instant::now());
        }
        let out = client.join().unwrap();
        assert!(out[0].starts_with("HTTP/1.0 204"), "{}", out[0]);
        assert!(
            out[1].starts_with("HTTP/1.0 200") && out[1].ends_with("\r\n\r\nprimary"),
            "{}",
            out[1]
        );
        assert!(out[2].starts_with("HTTP/1.0 404"), "{}", out[2]);
        assert_eq!(md["role"], "primary");
        let _ = std::fs::remove_dir_all(dir);
    }
}
