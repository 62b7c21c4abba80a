//! The API over real HTTP: `aloft_api::serve` on 127.0.0.1:0, a hyper client, a
//! machine created, read and destroyed, then a graceful shutdown.

mod common;

use aloft_api::{ApiState, Role, create_token};
use aloft_store::{SqliteStore, Store};
use bytes::Bytes;
use common::FakeAgent;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn serves_over_http_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("c.db")).await.unwrap());
    let agent: Arc<dyn aloft_agent::AgentApi> = Arc::new(FakeAgent::new("h1", "ams"));
    let state = ApiState::new(store, vec![agent], dir.path()).await.unwrap();
    let token = create_token(&state, "t", "personal", None, Role::Admin)
        .await
        .unwrap()
        .token;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(aloft_api::serve(listener, state, async {
        let _ = stop_rx.await;
    }));

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let call = |method: &str, path: &str, body: Option<&str>| {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .unwrap();
        let client = client.clone();
        async move {
            let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                .await
                .expect("request timed out")
                .unwrap();
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            (status, v)
        }
    };

    let (s, v) = call(
        "POST",
        "/v1/apps",
        Some(r#"{"app_name":"web","org_slug":"personal"}"#),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = call(
        "POST",
        "/v1/apps/web/machines",
        Some(r#"{"config":{"image":"img"}}"#),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let (s, v) = call(
        "GET",
        &format!("/v1/apps/web/machines/{id}/wait?state=started&timeout=5"),
        None,
    )
    .await;
    assert_eq!((s, v["state"].as_str()), (200, Some("started")));
    let (s, v) = call("POST", "/v1/apps/web/machines", Some("{\"config\":")).await;
    assert_eq!(s, 400);
    assert!(
        v["error"].as_str().unwrap().contains("malformed JSON"),
        "{v}"
    );
    let (s, _) = call(
        "DELETE",
        &format!("/v1/apps/web/machines/{id}?force=true"),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = call("GET", "/v1/openapi.json", None).await;
    assert_eq!(s, 200);
    assert!(v["paths"]["/apps/{app_name}/machines"].is_object());
    // Without a token: 401 over the wire too.
    let req = Request::get(format!("http://{addr}/v1/apps/web"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(client.request(req).await.unwrap().status(), 401);

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server did not shut down")
        .unwrap()
        .unwrap();
}
