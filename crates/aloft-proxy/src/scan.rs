//! A client stream that notices request heads carrying both `Content-Length` and
//! `Transfer-Encoding`.
//!
//! hyper itself handles such a request safely (Transfer-Encoding wins, the
//! Content-Length header is dropped and the connection closes after the response), but
//! it leaves no trace of the conflict, and the proxy refuses such requests with 400
//! before any machine sees them. This wrapper scans the header block of each read
//! (the bytes up to the first blank line in that read) and raises a flag the request
//! handler consumes. A head split over several reads is not scanned across the split;
//! hyper's normalisation still applies to it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub(crate) struct ScanStream<S> {
    inner: S,
    conflict: Arc<AtomicBool>,
}

impl<S> ScanStream<S> {
    pub(crate) fn new(inner: S, conflict: Arc<AtomicBool>) -> Self {
        ScanStream { inner, conflict }
    }

    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// Does the header block at the start of `buf` name both framing headers?
pub(crate) fn has_cl_and_te(buf: &[u8]) -> bool {
    let mut cl = false;
    let mut te = false;
    let mut i = 0;
    while let Some(off) = buf[i..].iter().position(|&b| b == b'\n') {
        let line = i + off + 1;
        let rest = &buf[line..];
        if rest.first() == Some(&b'\r') || rest.first() == Some(&b'\n') {
            break; // end of the header block
        }
        cl |= starts_with_ci(rest, b"content-length:");
        te |= starts_with_ci(rest, b"transfer-encoding:");
        if cl && te {
            return true;
        }
        i = line;
    }
    false
}

fn starts_with_ci(hay: &[u8], needle: &[u8]) -> bool {
    hay.len() >= needle.len() && hay[..needle.len()].eq_ignore_ascii_case(needle)
}

impl<S: AsyncRead + Unpin> AsyncRead for ScanStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let new = &buf.filled()[before..];
            if has_cl_and_te(new) {
                this.conflict.store(true, Ordering::Relaxed);
            }
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ScanStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::has_cl_and_te;

    #[test]
    fn finds_both_in_the_head_only() {
        assert!(has_cl_and_te(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTRANSFER-ENCODING: chunked\r\n\r\n"
        ));
        assert!(!has_cl_and_te(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
        ));
        assert!(!has_cl_and_te(
            b"POST / HTTP/1.1\r\nContent-Length: 30\r\n\r\nTransfer-Encoding: chunked\r\n"
        ));
    }
}
