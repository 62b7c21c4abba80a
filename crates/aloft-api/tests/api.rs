//! The Machines API in-process through its router, with fake agents: tokens and
//! scopes, the machine lifecycle, leases, wait, errors, secrets, volumes, placement.

mod common;

use aloft_api::Role;
use aloft_types::catalog::{HostRecord, SCHEMA_VERSION, host_key};
use axum::http::{Method, StatusCode};
use common::TestApi;
use serde_json::Value;

const IMG: &str =
    r#"{"config":{"image":"registry.local/app:1","guest":{"cpus":1,"memory_mb":256}}}"#;

#[tokio::test]
async fn tokens_scope_apps_and_roles() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("app-a").await;
    t.create_app("app-b").await;
    let a_deploy = t.token(Some("app-a"), Role::Deploy).await;
    let a_read = t.token(Some("app-a"), Role::Readonly).await;

    // Missing, malformed and unknown tokens: 401.
    for tok in [None, Some("nope"), Some("aloft_0123456789abcdef_deadbeef")] {
        let r = t.call(Method::GET, "/v1/apps/app-a", tok, None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{tok:?}: {}", r.body);
    }
    // A forged secret for a real token id is refused too.
    let id = a_deploy.split('_').nth(1).unwrap();
    let forged = format!("aloft_{id}_{}", "0".repeat(64));
    let r = t
        .call(Method::GET, "/v1/apps/app-a", Some(&forged), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // App A's token reads and changes A ...
    let r = t
        .call(Method::GET, "/v1/apps/app-a", Some(&a_deploy), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = t.create_machine("app-a", &a_deploy, IMG).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // ... but can neither read nor change B.
    for (m, p, b) in [
        (Method::GET, "/v1/apps/app-b", None),
        (Method::GET, "/v1/apps/app-b/machines", None),
        (Method::POST, "/v1/apps/app-b/machines", Some(IMG)),
        (Method::GET, "/v1/apps/app-b/secrets", None),
        (
            Method::POST,
            "/v1/apps/app-b/secrets",
            Some(r#"{"values":{"X":"1"}}"#),
        ),
        (Method::DELETE, "/v1/apps/app-b", None),
    ] {
        let r = t.call(m.clone(), p, Some(&a_deploy), b).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{m} {p}: {}", r.body);
    }
    let r = t
        .call(Method::GET, "/v1/apps/app-b/machines", Some(&t.admin), None)
        .await;
    assert_eq!(
        r.body.as_array().unwrap().len(),
        0,
        "nothing was created in B"
    );

    // App listing shows only the token's app; app-scoped tokens cannot create apps.
    let r = t
        .call(
            Method::GET,
            "/v1/apps?org_slug=personal",
            Some(&a_read),
            None,
        )
        .await;
    let names: Vec<&str> = r.body["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app-a"]);
    let r = t
        .call(
            Method::GET,
            "/v1/apps?org_slug=personal",
            Some(&t.admin),
            None,
        )
        .await;
    assert_eq!(r.body["total_apps"], 2);
    let r = t
        .call(
            Method::POST,
            "/v1/apps",
            Some(&a_deploy),
            Some(r#"{"app_name":"app-c","org_slug":"personal"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // Readonly reads but cannot write.
    let r = t
        .call(Method::GET, "/v1/apps/app-a/machines", Some(&a_read), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    let r = t.create_machine("app-a", &a_read, IMG).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = t
        .call(
            Method::POST,
            "/v1/apps/app-a/secrets",
            Some(&a_read),
            Some(r#"{"values":{"X":"1"}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Deploy cannot delete the app; an org admin can.
    let r = t
        .call(Method::DELETE, "/v1/apps/app-a", Some(&a_deploy), None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // Another organisation's app is invisible to an org token.
    let r = t
        .call(Method::GET, "/v1/apps?org_slug=other", Some(&t.admin), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Deploy tokens: minted by an admin for one app, usable on it only.
    let r = t
        .call(
            Method::POST,
            "/v1/apps/app-b/deploy_token",
            Some(&a_deploy),
            Some("{}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t
        .call(
            Method::POST,
            "/v1/apps/app-b/deploy_token",
            Some(&t.admin),
            Some(r#"{"expiry":"1h"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let b_tok = r.body["token"].as_str().unwrap().to_string();
    let r = t
        .call(Method::GET, "/v1/apps/app-b/machines", Some(&b_tok), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t
        .call(Method::GET, "/v1/apps/app-a/machines", Some(&b_tok), None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t
        .call(
            Method::POST,
            "/v1/apps/app-b/deploy_token",
            Some(&t.admin),
            Some(r#"{"expiry":"forever"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let expired = aloft_api::create_token_expiring(
        &t.state,
        "old",
        "personal",
        Some("app-b"),
        Role::Deploy,
        Some(std::time::Duration::ZERO),
    )
    .await
    .unwrap()
    .token;
    let r = t
        .call(Method::GET, "/v1/apps/app-b", Some(&expired), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Token introspection.
    let r = t
        .call(Method::GET, "/v1/tokens/current", Some(&a_read), None)
        .await;
    assert_eq!(r.body["tokens"][0]["apps"][0], "app-a");
    assert_eq!(r.body["tokens"][0]["role"], "readonly");
    let body =
        format!(r#"{{"header":"Bearer {a_read}","access":{{"app_name":"app-b","action":"r"}}}}"#);
    let r = t
        .call(
            Method::POST,
            "/v1/tokens/authorize",
            Some(&a_read),
            Some(&body),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let body =
        format!(r#"{{"header":"Bearer {a_read}","access":{{"app_name":"app-a","action":"r"}}}}"#);
    let r = t
        .call(
            Method::POST,
            "/v1/tokens/authorize",
            Some(&a_read),
            Some(&body),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let body =
        format!(r#"{{"header":"Bearer {a_read}","access":{{"app_name":"app-a","action":"w"}}}}"#);
    let r = t
        .call(
            Method::POST,
            "/v1/tokens/authorize",
            Some(&a_read),
            Some(&body),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t
        .call(
            Method::POST,
            "/v1/tokens/authenticate",
            Some(&a_read),
            Some(r#"{"header":"Bearer bogus"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Other schemes: Fly's `FlyV1` header works like Bearer.
    let r = t
        .call_with(
            Method::GET,
            "/v1/apps/app-a",
            None,
            None,
            &[("authorization", &format!("FlyV1 {a_read}"))],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);

    // Destroying an app revokes the tokens limited to it: a new app of the same name
    // is not open to them.
    let r = t
        .call(
            Method::POST,
            "/v1/apps/app-a/secrets",
            Some(&a_deploy),
            Some(r#"{"values":{"K":"v"}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t
        .call(Method::DELETE, "/v1/apps/app-a", Some(&t.admin), None)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert!(t.store.get("secrets/app-a").await.unwrap().is_none());
    t.create_app("app-a").await;
    let r = t
        .call(Method::GET, "/v1/apps/app-a", Some(&a_deploy), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = t
        .call(Method::GET, "/v1/apps/app-a/secrets", Some(&t.admin), None)
        .await;
    assert_eq!(r.body["secrets"], serde_json::json!([]));

    // Tokens are stored hashed: the secret part never appears in the catalog.
    let listing = t.store.list("tokens/").await.unwrap();
    assert!(listing.entries.len() >= 3);
    for tok in [&b_tok, &t.admin] {
        let secret = tok.rsplit('_').next().unwrap();
        for e in &listing.entries {
            assert!(!String::from_utf8_lossy(&e.value).contains(secret));
        }
    }
}

#[tokio::test]
async fn machine_lifecycle() {
    let t = TestApi::start(&[("h1", "ams"), ("h2", "iad")]).await;
    t.create_app("flow").await;
    let tok = t.token(Some("flow"), Role::Deploy).await;
    let r = t
        .create_machine(
            "flow",
            &tok,
            r#"{"name":"web-1","region":"iad","config":{"image":"img:1","metadata":{"fly_process_group":"app"},"future_field":1}}"#,
        )
        .await;
    // Unknown config fields are ignored, like Fly (at any depth).
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body["config"].get("future_field").is_none());
    assert_eq!(r.body["region"], "iad");
    assert_eq!(r.body["state"], "started");
    let id = r.body["id"].as_str().unwrap().to_string();
    let base = format!("/v1/apps/flow/machines/{id}");

    let r = t.call(Method::GET, &base, Some(&tok), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["name"], "web-1");

    // Filters.
    for (q, n) in [
        ("", 1),
        ("?region=iad", 1),
        ("?region=ams", 0),
        ("?state=started", 1),
        ("?state=stopped,created", 0),
        ("?metadata.fly_process_group=app", 1),
        ("?metadata.fly_process_group=worker", 0),
    ] {
        let r = t
            .call(
                Method::GET,
                &format!("/v1/apps/flow/machines{q}"),
                Some(&tok),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{q}: {}", r.body);
        assert_eq!(r.body.as_array().unwrap().len(), n, "{q}");
    }
    let r = t
        .call(
            Method::GET,
            "/v1/apps/flow/machines?state=bogus",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // stop (Go duration body) -> wait stopped -> start -> wait started.
    let r = t
        .call(
            Method::POST,
            &format!("{base}/stop"),
            Some(&tok),
            Some(r#"{"signal":"SIGTERM","timeout":"10s"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = t
        .call(
            Method::GET,
            &format!("{base}/wait?state=stopped&timeout=5"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["ok"], true);
    assert_eq!(r.body["state"], "stopped");
    let r = t
        .call(
            Method::POST,
            &format!("{base}/stop"),
            Some(&tok),
            Some(r#"{"timeout":"soon"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body["error"].as_str().unwrap().contains("timeout"));
    let r = t
        .call(Method::POST, &format!("{base}/start"), Some(&tok), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["previous_state"], "stopped");
    let r = t
        .call(
            Method::GET,
            &format!("{base}/wait?state=started&timeout=5"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.body["state"], "started");

    // restart, signal, suspend, cordon, events, exec, metadata, versions, memory.
    let r = t
        .call(
            Method::POST,
            &format!("{base}/restart?timeout=5s&signal=SIGINT"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t
        .call(
            Method::POST,
            &format!("{base}/signal"),
            Some(&tok),
            Some(r#"{"signal":"SIGUSR1"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        t.agents[1].signals().await,
        [(id.clone(), "SIGUSR1".to_string())]
    );
    let r = t
        .call(
            Method::POST,
            &format!("{base}/signal"),
            Some(&tok),
            Some(r#"{"signal":"SIGNOPE"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = t
        .call(Method::POST, &format!("{base}/cordon"), Some(&tok), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(t.agents[1].is_cordoned(&id).await);
    t.call(Method::POST, &format!("{base}/uncordon"), Some(&tok), None)
        .await;
    assert!(!t.agents[1].is_cordoned(&id).await);
    let r = t
        .call(
            Method::GET,
            &format!("{base}/events?limit=2"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 2);
    let r = t
        .call(
            Method::POST,
            &format!("{base}/exec"),
            Some(&tok),
            Some(r#"{"command":["echo","hi"],"timeout":5}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["stdout"], "echo hi\n");
    assert_eq!(r.body["exit_code"], 0);
    let r = t
        .call(
            Method::POST,
            &format!("{base}/exec"),
            Some(&tok),
            Some(r#"{"cmd":"ls -l '/a b'"}"#),
        )
        .await;
    assert_eq!(r.body["stdout"], "ls -l /a b\n");
    let r = t
        .call(
            Method::POST,
            &format!("{base}/metadata/role"),
            Some(&tok),
            Some(r#"{"value":"primary"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = t
        .call(
            Method::GET,
            &format!("{base}/metadata/role"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.body["value"], "primary");
    let r = t
        .call(Method::GET, &format!("{base}/metadata"), Some(&tok), None)
        .await;
    assert_eq!(r.body["fly_process_group"], "app");
    let r = t
        .call(
            Method::PUT,
            &format!("{base}/metadata"),
            Some(&tok),
            Some(r#"{"metadata":{"only":"this"}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = t
        .call(Method::GET, &format!("{base}/metadata"), Some(&tok), None)
        .await;
    assert_eq!(r.body, serde_json::json!({"only": "this"}));
    let r = t
        .call(
            Method::DELETE,
            &format!("{base}/metadata/only"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = t
        .call(
            Method::GET,
            &format!("{base}/metadata/only"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t
        .call(Method::GET, &format!("{base}/versions"), Some(&tok), None)
        .await;
    assert_eq!(r.body[0]["user_config"]["image"], "img:1");
    let r = t
        .call(Method::GET, &format!("{base}/memory"), Some(&tok), None)
        .await;
    assert_eq!(r.body["limit_mb"], 256);

    // logs of the app, filtered by machine, region and time.
    let r = t
        .call(Method::GET, "/v1/apps/flow/logs", Some(&tok), None)
        .await;
    let lines = r.body.as_array().unwrap();
    assert!(lines.len() >= 4, "{}", r.body);
    assert!(
        lines
            .windows(2)
            .all(|w| w[0]["timestamp"].as_i64() <= w[1]["timestamp"].as_i64())
    );
    assert_eq!(lines[0]["message"], "launch started");
    let last = lines.last().unwrap()["timestamp"].as_i64().unwrap();
    let r = t
        .call(
            Method::GET,
            &format!("/v1/apps/flow/logs?machine_id={id}&since={last}"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.body, serde_json::json!([]));
    let r = t
        .call(
            Method::GET,
            "/v1/apps/flow/logs?region=ams",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.body, serde_json::json!([]));
    let r = t
        .call(
            Method::GET,
            "/v1/apps/flow/logs?since=yesterday",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // update keeps the machine on its host, makes a new version.
    let before = t.call(Method::GET, &base, Some(&tok), None).await.body["instance_id"].clone();
    let r = t
        .call(
            Method::POST,
            &base,
            Some(&tok),
            Some(r#"{"config":{"image":"img:2"}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["config"]["image"], "img:2");
    assert_ne!(r.body["instance_id"], before);
    let r = t
        .call(
            Method::POST,
            &base,
            Some(&tok),
            Some(r#"{"region":"ams","config":{"image":"img:2"}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // destroy: refused while started unless forced; then gone from the default list.
    let r = t.call(Method::DELETE, &base, Some(&tok), None).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = t
        .call(
            Method::DELETE,
            &format!("{base}?force=true"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = t
        .call(Method::GET, "/v1/apps/flow/machines", Some(&tok), None)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 0);
    let r = t
        .call(
            Method::GET,
            "/v1/apps/flow/machines?include_deleted=true",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.body[0]["state"], "destroyed");
    let r = t
        .call(
            Method::GET,
            &format!("{base}/wait?state=destroyed&timeout=1"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn leases_conflict_and_wait_timeout() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("leasy").await;
    let tok = t.token(Some("leasy"), Role::Deploy).await;
    let r = t.create_machine("leasy", &tok, IMG).await;
    let id = r.body["id"].as_str().unwrap().to_string();
    let base = format!("/v1/apps/leasy/machines/{id}");

    let r = t
        .call(Method::GET, &format!("{base}/lease"), Some(&tok), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t
        .call(
            Method::POST,
            &format!("{base}/lease"),
            Some(&tok),
            Some(r#"{"ttl":60,"description":"deploy"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let nonce = r.body["nonce"].as_str().unwrap().to_string();
    // flyctl's envelope carries the same lease.
    assert_eq!(r.body["status"], "success");
    assert_eq!(r.body["data"]["nonce"], nonce.as_str());
    assert_eq!(
        t.call(Method::GET, &format!("{base}/lease"), Some(&tok), None)
            .await
            .body["nonce"],
        nonce.as_str()
    );

    // A second lease, or a change without the nonce: 409.
    let r = t
        .call(
            Method::POST,
            &format!("{base}/lease"),
            Some(&tok),
            Some(r#"{"ttl":60}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = t
        .call(Method::POST, &format!("{base}/stop"), Some(&tok), None)
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = t
        .call_with(
            Method::POST,
            &format!("{base}/stop"),
            Some(&tok),
            None,
            &[("fly-machine-lease-nonce", "wrong")],
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // With the nonce the change goes through; refreshing with the nonce works.
    let r = t
        .call_with(
            Method::POST,
            &format!("{base}/stop"),
            Some(&tok),
            None,
            &[("fly-machine-lease-nonce", &nonce)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = t
        .call_with(
            Method::POST,
            &format!("{base}/lease"),
            Some(&tok),
            Some(r#"{"ttl":120}"#),
            &[("fly-machine-lease-nonce", &nonce)],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = t
        .call(
            Method::POST,
            &format!("{base}/lease"),
            Some(&tok),
            Some(r#"{"ttl":18446744073709551615}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body["error"].as_str().unwrap().contains("ttl"));
    let r = t
        .call(
            Method::POST,
            &format!("{base}/lease"),
            Some(&tok),
            Some(r#"{"ttl":-5}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    // Release needs the header.
    let r = t
        .call(Method::DELETE, &format!("{base}/lease"), Some(&tok), None)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = t
        .call_with(
            Method::DELETE,
            &format!("{base}/lease"),
            Some(&tok),
            None,
            &[("fly-machine-lease-nonce", &nonce)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);

    // The machine is stopped and nothing starts it: waiting for started times out.
    let started = std::time::Instant::now();
    let r = t
        .call(
            Method::GET,
            &format!("{base}/wait?state=started&timeout=1"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::REQUEST_TIMEOUT, "{}", r.body);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let r = t
        .call(
            Method::GET,
            &format!("{base}/wait?state=sleeping"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = t
        .call(
            Method::GET,
            &format!("{base}/wait?timeout=-1"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // A wait answered by a concurrent start.
    let waiter = {
        let router = t.router.clone();
        let tok = tok.clone();
        let uri = format!("{base}/wait?state=started&timeout=10");
        tokio::spawn(async move {
            use tower::ServiceExt;
            let req = axum::http::Request::get(uri)
                .header("authorization", format!("Bearer {tok}"))
                .body(axum::body::Body::empty())
                .unwrap();
            router.oneshot(req).await.unwrap().status()
        })
    };
    let r = t
        .call(Method::POST, &format!("{base}/start"), Some(&tok), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(waiter.await.unwrap(), StatusCode::OK);

    // Create with lease_ttl returns the nonce.
    let r = t
        .create_machine(
            "leasy",
            &tok,
            r#"{"lease_ttl":30,"config":{"image":"img"}}"#,
        )
        .await;
    assert!(
        r.body["nonce"].as_str().is_some_and(|n| !n.is_empty()),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn bad_input_is_a_named_400_and_unknowns_are_404() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("errs").await;
    let tok = &t.admin;
    let cases: &[(&str, &str)] = &[
        ("{not json", "malformed"),
        (
            r#"{"config":{"image":"x","guest":{"cpus":"two"}}}"#,
            "config.guest.cpus",
        ),
        (
            r#"{"config":{"image":"x"},"skip_launch":"yes"}"#,
            "skip_launch",
        ),
        (r#"{"config":{}}"#, "config.image"),
        ("[]", "invalid"),
    ];
    for (body, needle) in cases {
        let r = t.create_machine("errs", tok, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
        let msg = r.body["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg:?} should name {needle}");
    }
    let r = t
        .call(Method::POST, "/v1/apps/errs/machines", Some(tok), None)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Ids no catalog key can hold (found by the API fuzzer) name nothing: 404, not 500.
    for path in [
        "/v1/apps/errs/machines/%14",
        "/v1/apps/errs/volumes/%20x",
        "/v1/apps/errs/machines/a%0Ab/events",
    ] {
        let r = t.call(Method::GET, path, Some(tok), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {}", r.body);
    }
    // Unknown fields at the request level are ignored, like Fly.
    let r = t
        .create_machine(
            "errs",
            tok,
            r#"{"config":{"image":"x","guest":{"cpus":1,"gpu_future":2},"services":[{"internal_port":80,"new":1}],"checks":{"a.b":{"port":1,"x":1}}},"something_new":true}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["config"]["guest"], serde_json::json!({"cpus": 1}));
    assert_eq!(
        r.body["config"]["services"][0],
        serde_json::json!({"internal_port": 80})
    );
    assert_eq!(
        r.body["config"]["checks"]["a.b"],
        serde_json::json!({"port": 1})
    );

    for p in [
        "/v1/apps/errs/machines/0000000000000",
        "/v1/apps/errs/machines/0000000000000/lease",
        "/v1/apps/nope",
        "/v1/apps/nope/machines",
        "/v1/apps/errs/volumes/vol_nope",
        "/v1/apps/errs/secrets/NOPE",
        "/v1/no/such/route",
    ] {
        let r = t.call(Method::GET, p, Some(tok), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{p}: {}", r.body);
    }
    for (m, p) in [
        (Method::POST, "/v1/apps/errs/machines/0000000000000/stop"),
        (Method::DELETE, "/v1/apps/errs/machines/0000000000000"),
    ] {
        let r = t.call(m, p, Some(tok), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{p}: {}", r.body);
    }
    // Wrong method: JSON 405.
    let r = t
        .call(Method::PATCH, "/v1/apps/errs", Some(tok), None)
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);

    // Apps: bad names, duplicates.
    let r = t
        .call(
            Method::POST,
            "/v1/apps",
            Some(tok),
            Some(r#"{"app_name":"Bad_Name","org_slug":"personal"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body["error"].as_str().unwrap().contains("name"));
    let r = t
        .call(
            Method::POST,
            "/v1/apps",
            Some(tok),
            Some(r#"{"app_name":"errs","org_slug":"personal"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.body["status"], "name_taken");
    let r = t
        .call(
            Method::POST,
            "/v1/apps",
            Some(tok),
            Some(r#"{"app_name":"x2","org_slug":"acme"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t.call(Method::GET, "/v1/apps", Some(tok), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn secrets_are_write_only_and_encrypted_at_rest() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("sec").await;
    let tok = t.token(Some("sec"), Role::Deploy).await;
    let plain = "correct-horse-battery-staple-4711";
    let r = t
        .call(
            Method::POST,
            "/v1/apps/sec/secrets",
            Some(&tok),
            Some(&format!(
                r#"{{"values":{{"DATABASE_URL":"{plain}","OTHER":"x"}}}}"#
            )),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["version"], 1);
    let r = t
        .call(
            Method::POST,
            "/v1/apps/sec/secrets/API_KEY",
            Some(&tok),
            Some(r#"{"value":"k-123"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body["version"], 2);
    let r = t
        .call(
            Method::POST,
            "/v1/apps/sec/secrets",
            Some(&tok),
            Some(r#"{"values":{"OTHER":null}}"#),
        )
        .await;
    assert_eq!(r.body["version"], 3);
    let r = t
        .call(
            Method::POST,
            "/v1/apps/sec/secrets",
            Some(&tok),
            Some(r#"{"values":{"1BAD":"x"}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Values are never returned, even when asked.
    for p in [
        "/v1/apps/sec/secrets?show_secrets=true",
        "/v1/apps/sec/secrets/DATABASE_URL?show_secrets=true",
    ] {
        let r = t.call(Method::GET, p, Some(&tok), None).await;
        assert_eq!(r.status, StatusCode::OK);
        let text = r.body.to_string();
        assert!(!text.contains(plain) && !text.contains("k-123"), "{text}");
    }
    let r = t
        .call(Method::GET, "/v1/apps/sec/secrets", Some(&tok), None)
        .await;
    let names: Vec<&str> = r.body["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["API_KEY", "DATABASE_URL"]);

    // At rest: the raw catalog value and the database file hold no plaintext.
    let raw = t.store.get("secrets/sec").await.unwrap().unwrap().value;
    let raw = String::from_utf8(raw).unwrap();
    assert!(
        raw.contains("DATABASE_URL") && !raw.contains(plain) && !raw.contains("k-123"),
        "{raw}"
    );
    let key = std::fs::read(t.dir.path().join("secrets.key")).unwrap();
    assert_eq!(key.len(), 32);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(t.dir.path().join("secrets.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Machines get them decrypted, at create and update.
    let r = t.create_machine("sec", &tok, IMG).await;
    let id = r.body["id"].as_str().unwrap().to_string();
    let got = t.agents[0].secrets_of(&id).await;
    assert_eq!(got.get("DATABASE_URL").map(String::as_str), Some(plain));
    assert_eq!(got.get("API_KEY").map(String::as_str), Some("k-123"));
    assert!(!got.contains_key("OTHER"));
    assert_eq!(aloft_api::app_secrets(&t.state, "sec").await.unwrap(), got);
    let r = t
        .create_machine(
            "sec",
            &tok,
            r#"{"skip_secrets":true,"config":{"image":"i"}}"#,
        )
        .await;
    let id2 = r.body["id"].as_str().unwrap();
    assert!(t.agents[0].secrets_of(id2).await.is_empty());

    let r = t
        .call(
            Method::DELETE,
            "/v1/apps/sec/secrets/API_KEY",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t
        .call(
            Method::DELETE,
            "/v1/apps/sec/secrets/API_KEY",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t
        .call(
            Method::POST,
            &format!("/v1/apps/sec/machines/{id}"),
            Some(&tok),
            Some(IMG),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!t.agents[0].secrets_of(&id).await.contains_key("API_KEY"));
}

async fn heartbeat(t: &TestApi, host: &str, region: &str, total: u64, committed: u64) {
    let rec = HostRecord {
        schema: SCHEMA_VERSION,
        id: host.into(),
        region: region.into(),
        address: String::new(),
        memory_mb_total: total,
        memory_mb_committed: committed,
        cpus_total: 4,
        cpus_committed: 0,
        machines: 0,
        updated_at: aloft_api::util::now_rfc3339(),
    };
    t.store
        .put(&host_key(host), serde_json::to_vec(&rec).unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn placement_spreads_respects_region_capacity_and_volumes() {
    let t = TestApi::start(&[("a1", "ams"), ("a2", "ams"), ("i1", "iad")]).await;
    t.create_app("spread").await;
    let tok = &t.admin;
    heartbeat(&t, "a1", "ams", 4096, 0).await;
    heartbeat(&t, "a2", "ams", 4096, 0).await;
    heartbeat(&t, "i1", "iad", 1024, 900).await;

    let mut hosts = Vec::new();
    for _ in 0..4 {
        let r = t
            .create_machine("spread", tok, r#"{"region":"ams","config":{"image":"i"}}"#)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["region"], "ams");
    }
    for a in &t.agents[..2] {
        hosts.push(
            aloft_agent::AgentApi::list_machines(a.as_ref(), "spread")
                .await
                .unwrap()
                .len(),
        );
    }
    assert_eq!(
        hosts,
        [2, 2],
        "an app's machines are spread over the region's hosts"
    );

    // iad has 124 MB free: a 256 MB machine does not fit, a 64 MB one does.
    let r = t
        .create_machine("spread", tok, r#"{"region":"iad","config":{"image":"i"}}"#)
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.body["status"], "insufficient_capacity");
    let r = t
        .create_machine(
            "spread",
            tok,
            r#"{"region":"iad","config":{"image":"i","guest":{"memory_mb":64}}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["region"], "iad");
    let r = t
        .call(Method::GET, "/v1/platform/regions", Some(tok), None)
        .await;
    let codes: Vec<&str> = r.body["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["ams", "iad"]);
    let r = t
        .create_machine("spread", tok, r#"{"region":"syd","config":{"image":"i"}}"#)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);

    // Volumes: created in a region; a machine mounting one lands on its host.
    let r = t
        .call(
            Method::POST,
            "/v1/apps/spread/volumes",
            Some(tok),
            Some(r#"{"name":"data","size_gb":1,"region":"ams"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let vol = r.body["id"].as_str().unwrap().to_string();
    let zone = r.body["zone"].as_str().unwrap().to_string();
    for _ in 0..2 {
        let body = format!(
            r#"{{"config":{{"image":"i","mounts":[{{"volume":"{vol}","path":"/data"}}]}}}}"#
        );
        let r = t.create_machine("spread", tok, &body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let id = r.body["id"].as_str().unwrap();
        let owner = t
            .agents
            .iter()
            .find(|a| aloft_agent::AgentApi::host_id(a.as_ref()) == zone)
            .unwrap();
        assert!(
            aloft_agent::AgentApi::get_machine(owner.as_ref(), "spread", id)
                .await
                .is_ok()
        );
    }
    let body = format!(
        r#"{{"region":"iad","config":{{"image":"i","mounts":[{{"volume":"{vol}","path":"/data"}}]}}}}"#
    );
    let r = t.create_machine("spread", tok, &body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = t
        .create_machine(
            "spread",
            tok,
            r#"{"config":{"image":"i","mounts":[{"volume":"vol_x","path":"/d"}]}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // Volume operations.
    let vbase = format!("/v1/apps/spread/volumes/{vol}");
    assert_eq!(
        t.call(Method::GET, &vbase, Some(tok), None).await.body["name"],
        "data"
    );
    assert_eq!(
        t.call(Method::GET, "/v1/apps/spread/volumes", Some(tok), None)
            .await
            .body
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let r = t
        .call(
            Method::PUT,
            &format!("{vbase}/extend"),
            Some(tok),
            Some(r#"{"size_gb":3}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["volume"]["size_gb"], 3);
    let r = t
        .call(
            Method::PUT,
            &format!("{vbase}/extend"),
            Some(tok),
            Some(r#"{"size_gb":2}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = t
        .call(Method::GET, &format!("{vbase}/snapshots"), Some(tok), None)
        .await;
    assert_eq!(r.body, serde_json::json!([]));
    let r = t
        .call(
            Method::POST,
            "/v1/apps/spread/volumes",
            Some(tok),
            Some(r#"{"name":"Bad Name"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = t.call(Method::DELETE, &vbase, Some(tok), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["state"], "destroyed");

    // App status and counts, then destroying the app destroys its machines.
    let r = t
        .call(Method::GET, "/v1/apps/spread", Some(tok), None)
        .await;
    assert_eq!(r.body["machine_count"], 7);
    assert_eq!(r.body["status"], "deployed");
    let r = t
        .call(Method::DELETE, "/v1/apps/spread", Some(tok), None)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = t
        .call(Method::GET, "/v1/apps/spread", Some(tok), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    for a in &t.agents {
        for m in aloft_agent::AgentApi::list_machines(a.as_ref(), "spread")
            .await
            .unwrap()
        {
            assert_eq!(m.state, aloft_types::machine::MachineState::Destroyed);
        }
    }
}

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("routed").await;
    let doc: Value = t.doc.clone();
    let mut ops: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |m| (p.clone(), m.clone()))
        })
        .collect();
    // Destroying the app goes last.
    ops.sort_by_key(|(p, m)| p == "/apps/{app_name}" && m == "delete");
    // The route exists when the answer is not the router's own 404 or a 405: with an
    // existing app the request reaches its handler.
    let unknown_route = t
        .call(
            Method::GET,
            "/v1/apps/routed/no-such-thing",
            Some(&t.admin),
            None,
        )
        .await;
    assert_eq!(unknown_route.body["error"], "no such API route");
    for (path, method) in &ops {
        let concrete = path
            .replace("{app_name}", "routed")
            .replace("{machine_id}", "m")
            .replace("{volume_id}", "v")
            .replace("{secret_name}", "S")
            .replace("{key}", "k")
            .replace("{version}", "1")
            .replace("{org_slug}", "personal");
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let r = t
            .call(
                m.clone(),
                &format!("/v1{concrete}"),
                Some(&t.admin),
                Some("{}"),
            )
            .await;
        assert_ne!(r.body["error"], "no such API route", "{m} {path}");
        assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
    }
    assert!(ops.len() >= 50, "{} operations", ops.len());
}

#[tokio::test]
async fn an_unreachable_host_shows_its_last_published_machines() {
    use aloft_types::catalog::{MachineRecord, machine_key};
    let t = TestApi::start(&[("up", "ams"), ("down", "iad")]).await;
    t.create_app("split").await;
    let tok = &t.admin;
    let r = t
        .create_machine("split", tok, r#"{"region":"ams","config":{"image":"i"}}"#)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t
        .create_machine("split", tok, r#"{"region":"iad","config":{"image":"i"}}"#)
        .await;
    let m: aloft_types::machine::Machine = serde_json::from_value(r.body.clone()).unwrap();
    // What the iad agent had published before it went away.
    let rec = MachineRecord {
        schema: SCHEMA_VERSION,
        app: "split".into(),
        host: "down".into(),
        machine: m.clone(),
        addresses: vec![],
    };
    t.store
        .put(
            &machine_key("split", &m.id),
            serde_json::to_vec(&rec).unwrap(),
        )
        .await
        .unwrap();
    t.agents[1].set_down(true);
    let r = t
        .call(Method::GET, "/v1/apps/split/machines", Some(tok), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let list = r.body.as_array().unwrap();
    assert_eq!(list.len(), 2, "{}", r.body);
    let gone = list.iter().find(|x| x["id"] == m.id.as_str()).unwrap();
    assert_eq!(gone["host_status"], "unreachable");
    let r = t.call(Method::GET, "/v1/apps/split", Some(tok), None).await;
    assert_eq!(r.body["machine_count"], 2);
    // Calls for a machine on that host fail as a server-side problem, not a 404.
    let r = t
        .call(
            Method::GET,
            &format!("/v1/apps/split/machines/{}", m.id),
            Some(tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.body);
    t.agents[1].set_down(false);
    let r = t
        .call(Method::GET, "/v1/apps/split/machines", Some(tok), None)
        .await;
    assert!(
        r.body
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["host_status"] == "ok")
    );
}

#[tokio::test]
async fn releases_record_deploys_and_roll_back() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("rel").await;
    let tok = t.token(Some("rel"), Role::Deploy).await;
    let v1 = r#"{"image":"img:1","strategy":"rolling","status":"complete",
        "configs":{"app":{"image":"img:1","metadata":{"fly_process_group":"app"},"env":{"V":"1"}}}}"#;
    let r = t
        .call(Method::POST, "/v1/apps/rel/releases", Some(&tok), Some(v1))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["version"], 1);
    // Deploy v2 (machines on img:2), recorded as pending, then completed.
    for _ in 0..2 {
        let r = t
            .create_machine(
                "rel",
                &tok,
                r#"{"config":{"image":"img:2","metadata":{"fly_process_group":"app"},"env":{"V":"2"}}}"#,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = t
        .create_machine(
            "rel",
            &tok,
            r#"{"config":{"image":"img:2","metadata":{"fly_process_group":"worker"}}}"#,
        )
        .await;
    let worker = r.body["id"].as_str().unwrap().to_string();
    let r = t
        .call(
            Method::POST,
            "/v1/apps/rel/releases",
            Some(&tok),
            Some(r#"{"image":"img:2"}"#),
        )
        .await;
    assert_eq!(r.body["version"], 2);
    assert_eq!(r.body["status"], "pending");
    let r = t
        .call(
            Method::PATCH,
            "/v1/apps/rel/releases/2",
            Some(&tok),
            Some(r#"{"status":"complete"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = t
        .call(
            Method::PATCH,
            "/v1/apps/rel/releases/2",
            Some(&tok),
            Some(r#"{"status":"great"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = t
        .call(
            Method::POST,
            "/v1/apps/rel/releases",
            Some(&tok),
            Some(r#"{"strategy":"x"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Roll back to v1: app machines get v1's config, the worker v1's image.
    let r = t
        .call(
            Method::POST,
            "/v1/apps/rel/releases/v1/rollback",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["version"], 3);
    assert_eq!(r.body["status"], "complete", "{}", r.body);
    let r = t
        .call(Method::GET, "/v1/apps/rel/machines", Some(&tok), None)
        .await;
    for m in r.body.as_array().unwrap() {
        assert_eq!(m["config"]["image"], "img:1", "{m}");
        if m["id"] == worker.as_str() {
            assert_eq!(m["config"]["metadata"]["fly_process_group"], "worker");
        } else {
            assert_eq!(m["config"]["env"]["V"], "1");
        }
    }
    let r = t
        .call(Method::GET, "/v1/apps/rel/releases", Some(&tok), None)
        .await;
    let versions: Vec<u64> = r.body["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [3, 2, 1]);
    let r = t
        .call(Method::GET, "/v1/apps/rel/releases/9", Some(&tok), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t
        .call(
            Method::GET,
            "/v1/apps/rel/releases/latest",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Readonly tokens cannot record or roll back.
    let ro = t.token(Some("rel"), Role::Readonly).await;
    let r = t
        .call(
            Method::POST,
            "/v1/apps/rel/releases/1/rollback",
            Some(&ro),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn organisation_listing_pages_by_update_time() {
    let t = TestApi::start(&[("h1", "ams"), ("h2", "iad")]).await;
    t.create_app("o-one").await;
    t.create_app("o-two").await;
    for (app, region) in [("o-one", "ams"), ("o-one", "iad"), ("o-two", "ams")] {
        let body = format!(r#"{{"region":"{region}","config":{{"image":"i"}}}}"#);
        assert_eq!(
            t.create_machine(app, &t.admin, &body).await.status,
            StatusCode::OK
        );
    }
    let r = t
        .call(
            Method::GET,
            "/v1/orgs/personal/machines",
            Some(&t.admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["machines"].as_array().unwrap().len(), 3);
    assert!(r.body.get("next_cursor").is_none());
    // Pages of one, following the cursor, see every machine once.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let q = if cursor.is_empty() {
            String::new()
        } else {
            format!("&cursor={}", cursor.replace('|', "%7C"))
        };
        let r = t
            .call(
                Method::GET,
                &format!("/v1/orgs/personal/machines?limit=1&summary=true{q}"),
                Some(&t.admin),
                None,
            )
            .await;
        let ms = r.body["machines"].as_array().unwrap();
        assert!(ms.len() <= 1);
        assert!(ms.iter().all(|m| m.get("config").is_none()));
        seen.extend(ms.iter().map(|m| m["id"].as_str().unwrap().to_string()));
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3);
    let r = t
        .call(
            Method::GET,
            "/v1/orgs/personal/machines?region=iad",
            Some(&t.admin),
            None,
        )
        .await;
    assert_eq!(r.body["machines"][0]["app_name"], "o-one");
    assert_eq!(r.body["machines"].as_array().unwrap().len(), 1);
    // An app token sees its app only; another organisation is not found.
    let tok = t.token(Some("o-two"), Role::Readonly).await;
    let r = t
        .call(Method::GET, "/v1/orgs/personal/machines", Some(&tok), None)
        .await;
    let apps: Vec<&str> = r.body["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["app_name"].as_str().unwrap())
        .collect();
    assert_eq!(apps, ["o-two"]);
    let r = t
        .call(Method::GET, "/v1/orgs/acme/machines", Some(&t.admin), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t
        .call(
            Method::GET,
            "/v1/orgs/personal/machines?cursor=nonsense",
            Some(&t.admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}
