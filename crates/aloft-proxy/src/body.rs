//! Body types on both sides of the proxy.
//!
//! [`ReqBody`] is what goes upstream: empty, buffered (can be replayed on another
//! machine) or streamed. [`RespBody`] is what goes back to the client: a short body
//! written by the proxy, or the machine's body ([`UpstreamBody`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

pub use crate::upstream::{UpstreamBody, UpstreamBodyError};

/// A request body on its way upstream.
#[derive(Debug)]
pub enum ReqBody {
    Empty,
    /// The whole body, read before choosing a machine.
    Full(Option<Bytes>),
    /// The first bytes already read, then the rest of the client's body.
    Stream {
        prefix: Option<Bytes>,
        rest: Incoming,
    },
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ReqBody::Stream { prefix, rest } => {
                if let Some(p) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                Pin::new(rest).poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Full(d) => d.is_none(),
            ReqBody::Stream { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            ReqBody::Stream { prefix, rest } => {
                let p = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower() + p);
                if let Some(u) = r.upper() {
                    h.set_upper(u + p);
                }
                h
            }
        }
    }
}

/// A response body going to the client.
pub enum RespBody {
    /// Written by the proxy itself (errors, redirects).
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
}

impl RespBody {
    pub fn text(s: impl Into<Bytes>) -> Self {
        RespBody::Full(Some(s.into()))
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        match self.get_mut() {
            RespBody::Full(d) => Poll::Ready(d.take().map(|d| Ok(Frame::data(d)))),
            RespBody::Upstream(u) => Pin::new(u).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(d) => d.is_none(),
            RespBody::Upstream(u) => u.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            RespBody::Upstream(u) => u.size_hint(),
        }
    }
}
