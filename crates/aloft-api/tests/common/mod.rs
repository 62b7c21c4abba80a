//! Test harness: a catalog in a temp dir, fake agents, the router, tokens, and a
//! client that checks every response body against the generated OpenAPI document.
#![allow(dead_code)]

pub mod fake_agent;
pub mod schema;

use std::sync::Arc;

use aloft_agent::AgentApi;
use aloft_api::{ApiState, Role, create_token, router};
use aloft_store::{SqliteStore, Store};
use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

pub use fake_agent::FakeAgent;

pub struct TestApi {
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn Store>,
    pub state: ApiState,
    pub router: Router,
    pub agents: Vec<Arc<FakeAgent>>,
    /// An admin token of the `personal` organisation.
    pub admin: String,
    pub doc: Value,
}

pub struct Resp {
    pub status: StatusCode,
    pub body: Value,
}

impl TestApi {
    /// One agent per `(host, region)`.
    pub async fn start(hosts: &[(&str, &str)]) -> TestApi {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(dir.path().join("catalog.db"))
                .await
                .unwrap(),
        );
        let agents: Vec<Arc<FakeAgent>> = hosts
            .iter()
            .map(|(h, r)| Arc::new(FakeAgent::new(h, r)))
            .collect();
        let dyn_agents: Vec<Arc<dyn AgentApi>> = agents
            .iter()
            .map(|a| a.clone() as Arc<dyn AgentApi>)
            .collect();
        let mut t = Self::with_agents(dir, store, dyn_agents).await;
        t.agents = agents;
        t
    }

    /// The API over given agents (real ones) and catalog.
    pub async fn with_agents(
        dir: tempfile::TempDir,
        store: Arc<dyn Store>,
        dyn_agents: Vec<Arc<dyn AgentApi>>,
    ) -> TestApi {
        let state = ApiState::new(store.clone(), dyn_agents, dir.path())
            .await
            .unwrap();
        let admin = create_token(&state, "admin", "personal", None, Role::Admin)
            .await
            .unwrap()
            .token;
        TestApi {
            router: router(state.clone()),
            doc: aloft_api::openapi::document_json(),
            dir,
            store,
            state,
            agents: Vec::new(),
            admin,
        }
    }

    pub async fn token(&self, app: Option<&str>, role: Role) -> String {
        create_token(&self.state, "test", "personal", app, role)
            .await
            .unwrap()
            .token
    }

    /// Sends a request through the router; checks the response against the document.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Resp {
        self.call_with(method, path, token, body, &[]).await
    }

    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut req = Request::builder().method(method.clone()).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            assert_eq!(
                ctype.as_deref(),
                Some("application/json"),
                "{method} {path}: non-JSON response {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{method} {path}: bad JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        if status.is_client_error() || status.is_server_error() {
            assert!(
                body.get("error").and_then(Value::as_str).is_some(),
                "{method} {path}: error {status} without an `error` string: {body}"
            );
        }
        if path != "/v1/openapi.json" {
            schema::check_response(&self.doc, &method, path, status.as_u16(), &body);
        }
        Resp { status, body }
    }

    pub async fn create_app(&self, name: &str) {
        let r = self
            .call(
                Method::POST,
                "/v1/apps",
                Some(&self.admin),
                Some(&format!(r#"{{"app_name":"{name}","org_slug":"personal"}}"#)),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }

    pub async fn create_machine(&self, app: &str, token: &str, body: &str) -> Resp {
        self.call(
            Method::POST,
            &format!("/v1/apps/{app}/machines"),
            Some(token),
            Some(body),
        )
        .await
    }
}
