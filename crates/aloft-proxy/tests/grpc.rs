//! gRPC through the proxy: a service whose port has `h2_backend = true` is reached
//! over HTTP/2 (h2c), requests and responses stream both ways, and the `grpc-status`
//! trailers arrive intact. The machine is a hand-built gRPC server on hyper's HTTP/2
//! (the gRPC wire format: 5-byte length-prefixed messages, status in trailers).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::{Buf, Bytes, BytesMut};
use common::*;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream_shim::ReceiverStream;

/// A tiny stand-in for tokio-stream's `ReceiverStream`.
mod tokio_stream_shim {
    pub struct ReceiverStream<T>(pub tokio::sync::mpsc::Receiver<T>);
    impl<T> futures::Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

type FrameResult = Result<Frame<Bytes>, Infallible>;
type ChanBody = StreamBody<ReceiverStream<FrameResult>>;

fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b.freeze()
}

/// Complete gRPC messages at the front of `buf`.
fn take_messages(buf: &mut BytesMut) -> Vec<Bytes> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        buf.advance(5);
        out.push(buf.split_to(len).freeze());
    }
    out
}

fn trailers(status: u32, message: &str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(status));
    t.insert("grpc-message", HeaderValue::from_str(message).unwrap());
    t
}

/// `/echo.Echo/Say` and `/echo.Echo/Chat`: every message is answered with
/// `"<machine>:" + message` as soon as it arrives; status 0 at the end. Other methods:
/// status 12 (UNIMPLEMENTED) in the trailers. Requests without `te: trailers` or with
/// a non-gRPC content type are refused, as real gRPC servers do.
async fn grpc_machine(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let (tx, rx) = mpsc::channel::<FrameResult>(16);
                    let mut resp = Response::new(StreamBody::new(ReceiverStream(rx)));
                    resp.headers_mut()
                        .insert("content-type", HeaderValue::from_static("application/grpc"));
                    let te_ok = req.headers().get("te").is_some_and(|v| v == "trailers");
                    let ct_ok = req
                        .headers()
                        .get("content-type")
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                    if req.version() != http::Version::HTTP_2 || !te_ok || !ct_ok {
                        *resp.status_mut() = StatusCode::BAD_REQUEST;
                        drop(tx);
                        return Ok::<_, Infallible>(resp);
                    }
                    let path = req.uri().path().to_string();
                    let mut body = req.into_body();
                    tokio::spawn(async move {
                        if !matches!(path.as_str(), "/echo.Echo/Say" | "/echo.Echo/Chat") {
                            let _ = tx
                                .send(Ok(Frame::trailers(trailers(12, "no such method"))))
                                .await;
                            return;
                        }
                        let mut buf = BytesMut::new();
                        while let Some(frame) = body.frame().await {
                            let Ok(frame) = frame else { return };
                            if let Ok(d) = frame.into_data() {
                                buf.extend_from_slice(&d);
                                for m in take_messages(&mut buf) {
                                    let mut reply = format!("{name}:").into_bytes();
                                    reply.extend_from_slice(&m);
                                    if tx.send(Ok(Frame::data(grpc_frame(&reply)))).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                        let _ = tx.send(Ok(Frame::trailers(trailers(0, "done")))).await;
                    });
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn grpc_spec(machines: &[(&str, SocketAddr)]) -> aloft_proxy::RoutesSpec {
    let mut text = String::from(
        r#"
        [[apps]]
        name = "grpc"
        hostnames = ["grpc.test", "*"]
        [[apps.services]]
        internal_port = 50051
        ports = [{ port = 80, handlers = ["http"], h2_backend = true }]
        concurrency = { type = "requests", soft_limit = 50, hard_limit = 100 }
        "#,
    );
    for (id, addr) in machines {
        text.push_str(&format!(
            "[[apps.machines]]\nid = \"{id}\"\nregion = \"local\"\naddress = \"{addr}\"\nstate = \"started\"\n"
        ));
    }
    toml::from_str(&text).unwrap()
}

/// An h2c (prior knowledge) client connection to the proxy, as gRPC clients use.
async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<ChanBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

fn grpc_request(path: &str) -> (Request<ChanBody>, mpsc::Sender<FrameResult>) {
    let (tx, rx) = mpsc::channel(16);
    let req = Request::post(format!("http://grpc.test{path}"))
        .version(http::Version::HTTP_2)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(ReceiverStream(rx)))
        .unwrap();
    (req, tx)
}

/// Read frames until one gRPC message is complete (data) or trailers come.
async fn next_message(body: &mut Incoming, buf: &mut BytesMut) -> Result<Bytes, HeaderMap> {
    loop {
        if let Some(m) = take_messages(buf).into_iter().next() {
            return Ok(m);
        }
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("a frame within the deadline")
            .expect("body not ended before trailers")
            .expect("frame ok");
        match frame.into_data() {
            Ok(d) => buf.extend_from_slice(&d),
            Err(frame) => return Err(frame.into_trailers().expect("trailers frame")),
        }
    }
}

#[tokio::test]
async fn unary_and_streaming_grpc_round_trip_with_trailers() {
    let machine = grpc_machine("m1").await;
    let proxy = TestProxy::start(grpc_spec(&[("m1", machine)]), |_| {}).await;
    let mut client = h2_client(proxy.addr).await;

    // Unary: one message, one answer, grpc-status 0 in the trailers.
    let (req, tx) = grpc_request("/echo.Echo/Say");
    tx.send(Ok(Frame::data(grpc_frame(b"hello"))))
        .await
        .unwrap();
    drop(tx);
    let resp = tokio::time::timeout(DEADLINE, client.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert!(resp.headers().contains_key("fly-request-id"));
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    assert_eq!(
        next_message(&mut body, &mut buf).await.unwrap(),
        Bytes::from_static(b"m1:hello")
    );
    let t = next_message(&mut body, &mut buf).await.unwrap_err();
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["grpc-message"], "done");

    // Bidirectional streaming: each answer arrives before the next message is sent
    // (the proxy must not wait for the whole request body).
    let (req, tx) = grpc_request("/echo.Echo/Chat");
    tx.send(Ok(Frame::data(grpc_frame(b"one")))).await.unwrap();
    let resp = tokio::time::timeout(DEADLINE, client.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    assert_eq!(
        next_message(&mut body, &mut buf).await.unwrap(),
        Bytes::from_static(b"m1:one")
    );
    tx.send(Ok(Frame::data(grpc_frame(b"two")))).await.unwrap();
    assert_eq!(
        next_message(&mut body, &mut buf).await.unwrap(),
        Bytes::from_static(b"m1:two")
    );
    drop(tx);
    let t = next_message(&mut body, &mut buf).await.unwrap_err();
    assert_eq!(t["grpc-status"], "0");

    // An error status travels in trailers too (a trailers-only response).
    let (req, tx) = grpc_request("/echo.Echo/Nope");
    drop(tx);
    let resp = tokio::time::timeout(DEADLINE, client.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let mut body = resp.into_body();
    let t = next_message(&mut body, &mut BytesMut::new())
        .await
        .unwrap_err();
    assert_eq!(t["grpc-status"], "12");
}

#[tokio::test]
async fn concurrent_grpc_calls_skip_a_dead_machine_and_release_leases() {
    let live = grpc_machine("live").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = TestProxy::start(grpc_spec(&[("live", live), ("dead", dead)]), |_| {}).await;
    let client = h2_client(proxy.addr).await;
    let calls = (0..20).map(|i| {
        let mut c = client.clone();
        async move {
            let (req, tx) = grpc_request("/echo.Echo/Say");
            tx.send(Ok(Frame::data(grpc_frame(format!("{i}").as_bytes()))))
                .await
                .unwrap();
            drop(tx);
            let resp = tokio::time::timeout(DEADLINE, c.send_request(req))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let mut body = resp.into_body();
            let mut buf = BytesMut::new();
            let m = next_message(&mut body, &mut buf).await.unwrap();
            assert_eq!(m, Bytes::from(format!("live:{i}")));
            let t = next_message(&mut body, &mut buf).await.unwrap_err();
            assert_eq!(t["grpc-status"], "0");
        }
    });
    futures::stream::iter(calls)
        .buffer_unordered(20)
        .collect::<Vec<()>>()
        .await;
    let table = proxy.routes.load();
    let svc = &table.apps()[0].services[0];
    let live_backend = svc.groups[0]
        .backends
        .iter()
        .find(|b| &*b.machine_id == "live")
        .unwrap();
    assert_eq!(live_backend.in_flight(), 0, "every lease released");
}
