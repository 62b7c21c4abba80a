//! The rest of Fly's Machines API (issue 7): secret keys, IP assignments, org-wide
//! volumes, placements, KMS and OIDC tokens, and Aloft's token management — through
//! the router (every JSON response checked against our OpenAPI document) and over
//! real HTTP.

mod common;

use std::time::Duration;

use aloft_api::Role;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use common::TestApi;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// A raw call for endpoints that answer text (KMS and OIDC tokens).
async fn raw(
    t: &TestApi,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (StatusCode, String, String) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(tok) = token {
        req = req.header("authorization", format!("Bearer {tok}"));
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
    let resp = t.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ctype, String::from_utf8(bytes.to_vec()).unwrap())
}

fn bytes(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a byte array: {v}"))
        .iter()
        .map(|b| u8::try_from(b.as_u64().unwrap()).unwrap())
        .collect()
}

async fn post(t: &TestApi, path: &str, token: &str, body: Value) -> common::Resp {
    t.call(Method::POST, path, Some(token), Some(&body.to_string()))
        .await
}

async fn get(t: &TestApi, path: &str, token: &str) -> common::Resp {
    t.call(Method::GET, path, Some(token), None).await
}

#[tokio::test]
async fn secret_keys_every_type_through_the_api() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("ska").await;
    let a = &t.admin;
    let base = "/v1/apps/ska/secretkeys";

    for kind in [
        "hs256",
        "hs384",
        "hs512",
        "xaes256gcm",
        "nacl_auth",
        "nacl_box",
        "nacl_secretbox",
        "nacl_sign",
    ] {
        let name = format!("k-{kind}");
        let r = post(
            &t,
            &format!("{base}/{name}/generate"),
            a,
            json!({"type": kind}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{kind}: {}", r.body);
        assert_eq!(r.body["type"], kind);
        assert_eq!(r.body["version"], r.body["Version"]);
        let has_public = kind == "nacl_box" || kind == "nacl_sign";
        assert_eq!(r.body.get("public_key").is_some(), has_public, "{}", r.body);
        assert!(r.body.get("value").is_none());

        let p = format!("{base}/{name}");
        if matches!(kind, "xaes256gcm" | "nacl_box" | "nacl_secretbox") {
            let aad = if kind == "xaes256gcm" {
                json!([1, 2, 3])
            } else {
                json!([])
            };
            let r = post(
                &t,
                &format!("{p}/encrypt"),
                a,
                json!({"plaintext": b"attack at dawn".to_vec(), "associated_data": aad}),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{kind}: {}", r.body);
            let ct = bytes(&r.body["ciphertext"]);
            assert!(!ct.windows(6).any(|w| w == b"attack"));
            let r = post(
                &t,
                &format!("{p}/decrypt"),
                a,
                json!({"ciphertext": ct, "associated_data": aad}),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{kind}: {}", r.body);
            assert_eq!(bytes(&r.body["plaintext"]), b"attack at dawn");
            // A flipped bit is the caller's mistake: 400 naming the field.
            let mut bad = ct.clone();
            bad[ct.len() - 1] ^= 1;
            let r = post(
                &t,
                &format!("{p}/decrypt"),
                a,
                json!({"ciphertext": bad, "associated_data": aad}),
            )
            .await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{kind}: {}", r.body);
            assert!(r.body["error"].as_str().unwrap().contains("ciphertext"));
            // Go clients send []byte as base64.
            let b64 = base64::engine::general_purpose::STANDARD.encode(&ct);
            let r = post(
                &t,
                &format!("{p}/decrypt"),
                a,
                json!({"ciphertext": b64, "associated_data": aad}),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{kind}: {}", r.body);
            let r = post(&t, &format!("{p}/sign"), a, json!({"plaintext": [1]})).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{kind}: {}", r.body);
        } else {
            let r = post(&t, &format!("{p}/sign"), a, json!({"plaintext": [7, 8, 9]})).await;
            assert_eq!(r.status, StatusCode::OK, "{kind}: {}", r.body);
            let sig = bytes(&r.body["signature"]);
            let r = post(
                &t,
                &format!("{p}/verify"),
                a,
                json!({"plaintext": [7, 8, 9], "signature": sig}),
            )
            .await;
            assert_eq!(r.status, StatusCode::NO_CONTENT, "{kind}: {}", r.body);
            let r = post(
                &t,
                &format!("{p}/verify"),
                a,
                json!({"plaintext": [7, 8, 10], "signature": sig}),
            )
            .await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{kind}: {}", r.body);
            assert!(r.body["error"].as_str().unwrap().contains("signature"));
            let r = post(&t, &format!("{p}/encrypt"), a, json!({"plaintext": [1]})).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{kind}: {}", r.body);
        }
    }

    // The Ed25519 public key verifies a signature made through the API.
    let k = get(&t, &format!("{base}/k-nacl_sign"), a).await;
    assert_eq!(k.status, StatusCode::OK);
    let pk: [u8; 32] = bytes(&k.body["public_key"]).try_into().unwrap();
    let r = post(
        &t,
        &format!("{base}/k-nacl_sign/sign"),
        a,
        json!({"plaintext": b"hello".to_vec()}),
    )
    .await;
    let sig = ed25519_dalek::Signature::from_slice(&bytes(&r.body["signature"])).unwrap();
    ed25519_dalek::VerifyingKey::from_bytes(&pk)
        .unwrap()
        .verify_strict(b"hello", &sig)
        .unwrap();

    // A known HMAC key gives RFC 4231's tag.
    let r = post(
        &t,
        &format!("{base}/jefe"),
        a,
        json!({"type": "hs256", "value": b"Jefe-Jefe-Jefe-Jefe".to_vec()}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = post(
        &t,
        &format!("{base}/jefe/sign"),
        a,
        json!({"plaintext": b"what do ya want for nothing?".to_vec()}),
    )
    .await;
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"Jefe-Jefe-Jefe-Jefe").unwrap();
    m.update(b"what do ya want for nothing?");
    assert_eq!(
        bytes(&r.body["signature"]),
        m.finalize().into_bytes().to_vec()
    );

    // The material is sealed at rest: the catalog never holds the key bytes.
    let rec = t.store.get("secretkeys/ska").await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&rec.value).to_string();
    assert!(!text.contains("Jefe"));
    let as_b64 = base64::engine::general_purpose::STANDARD.encode(b"Jefe-Jefe-Jefe-Jefe");
    assert!(!text.contains(&as_b64[..16]));
    assert!(!text.contains("74,101,102,101"));

    // Listing (with a type filter), bad input, min_version, delete.
    let l = get(&t, base, a).await;
    assert_eq!(l.body["secret_keys"].as_array().unwrap().len(), 9);
    let l = get(&t, &format!("{base}?types=nacl_sign,hs256"), a).await;
    assert_eq!(
        l.body["secret_keys"].as_array().unwrap().len(),
        3,
        "{}",
        l.body
    );
    for (path, body, field) in [
        (
            format!("{base}/x"),
            json!({"type": "rsa", "value": [1]}),
            "type",
        ),
        (
            format!("{base}/x"),
            json!({"type": "xaes256gcm", "value": [1, 2]}),
            "value",
        ),
        (format!("{base}/x"), json!({"type": "hs256"}), "value"),
        (
            format!("{base}/x/generate"),
            json!({"type": "hs256", "value": vec![1u8; 32]}),
            "value",
        ),
        (
            format!("{base}/x"),
            json!({"type": "hs256", "value": [300]}),
            "value",
        ),
        (
            format!("{base}/bad%20name/generate"),
            json!({"type": "hs256"}),
            "name",
        ),
        (
            format!("{base}/k-nacl_secretbox/encrypt"),
            json!({"plaintext": [1], "associated_data": [2]}),
            "associated_data",
        ),
    ] {
        let r = post(&t, &path, a, body.clone()).await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{path} {body}: {}",
            r.body
        );
        assert!(
            r.body["error"].as_str().unwrap().contains(field),
            "{path} {body}: {}",
            r.body
        );
    }
    let r = get(&t, &format!("{base}?types=rsa"), a).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = get(&t, &format!("{base}/jefe?min_version=1000"), a).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = get(&t, &format!("{base}/jefe?min_version=x"), a).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = get(&t, &format!("{base}/nope"), a).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = post(
        &t,
        &format!("{base}/nope/sign"),
        a,
        json!({"plaintext": [1]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let before = get(&t, &format!("{base}/jefe"), a).await;
    assert_eq!(before.status, StatusCode::OK);
    let d = t
        .call(Method::DELETE, &format!("{base}/jefe"), Some(a), None)
        .await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.body);
    assert_eq!(d.body["version"].as_u64(), Some(10));
    let r = get(&t, &format!("{base}/jefe"), a).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t
        .call(Method::DELETE, &format!("{base}/jefe"), Some(a), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Read-only tokens read but do not use or change keys.
    let ro = t.token(Some("ska"), Role::Readonly).await;
    assert_eq!(get(&t, base, &ro).await.status, StatusCode::OK);
    let r = post(
        &t,
        &format!("{base}/k-hs256/sign"),
        &ro,
        json!({"plaintext": [1]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn app_tokens_cannot_touch_another_apps_keys_or_ips() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("app-a").await;
    t.create_app("app-b").await;
    let b_key = post(
        &t,
        "/v1/apps/app-b/secretkeys/k/generate",
        &t.admin,
        json!({"type": "hs256"}),
    )
    .await;
    assert_eq!(b_key.status, StatusCode::CREATED);
    let b_ip = post(
        &t,
        "/v1/apps/app-b/ip_assignments",
        &t.admin,
        json!({"type": "v6"}),
    )
    .await;
    let b_ip = b_ip.body["ip"].as_str().unwrap().to_string();
    let a_tok = t.token(Some("app-a"), Role::Deploy).await;
    for (m, path, body) in [
        (Method::GET, "/v1/apps/app-b/secretkeys".to_string(), None),
        (Method::GET, "/v1/apps/app-b/secretkeys/k".to_string(), None),
        (
            Method::POST,
            "/v1/apps/app-b/secretkeys/k/sign".to_string(),
            Some(r#"{"plaintext":[1]}"#),
        ),
        (
            Method::POST,
            "/v1/apps/app-b/secretkeys/k2/generate".to_string(),
            Some(r#"{"type":"hs256"}"#),
        ),
        (
            Method::DELETE,
            "/v1/apps/app-b/secretkeys/k".to_string(),
            None,
        ),
        (
            Method::GET,
            "/v1/apps/app-b/ip_assignments".to_string(),
            None,
        ),
        (
            Method::POST,
            "/v1/apps/app-b/ip_assignments".to_string(),
            Some(r#"{"type":"v4"}"#),
        ),
        (
            Method::DELETE,
            format!("/v1/apps/app-b/ip_assignments/{b_ip}"),
            None,
        ),
    ] {
        let r = t.call(m.clone(), &path, Some(&a_tok), body).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{m} {path}: {}", r.body);
    }
    // Nothing changed for app B.
    let l = get(&t, "/v1/apps/app-b/secretkeys", &t.admin).await;
    assert_eq!(l.body["secret_keys"].as_array().unwrap().len(), 1);
    let l = get(&t, "/v1/apps/app-b/ip_assignments", &t.admin).await;
    assert_eq!(l.body["ips"].as_array().unwrap().len(), 1);
    // App A's own routes work with the same token.
    let r = post(
        &t,
        "/v1/apps/app-a/secretkeys/k/generate",
        &a_tok,
        json!({"type": "nacl_secretbox"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    // App A's key of the same name is its own.
    let ct = post(
        &t,
        "/v1/apps/app-a/secretkeys/k/encrypt",
        &a_tok,
        json!({"plaintext": [1, 2]}),
    )
    .await;
    assert_eq!(ct.status, StatusCode::OK);
}

#[tokio::test]
async fn ip_assignments_allocate_release_and_never_collide() {
    let t = TestApi::start(&[("h1", "ams"), ("h2", "syd")]).await;
    t.create_app("ipa").await;
    t.create_app("ipb").await;
    let a = &t.admin;
    let r = post(
        &t,
        "/v1/apps/ipa/ip_assignments",
        a,
        json!({"type": "shared_v4"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["ip"], "192.0.2.1");
    assert_eq!(r.body["shared"], true);
    let r = post(
        &t,
        "/v1/apps/ipa/ip_assignments",
        a,
        json!({"type": "shared_v4"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = post(
        &t,
        "/v1/apps/ipb/ip_assignments",
        a,
        json!({"type": "shared_v4"}),
    )
    .await;
    assert_eq!(r.body["ip"], "192.0.2.1", "the shared address is shared");
    let r = post(
        &t,
        "/v1/apps/ipa/ip_assignments",
        a,
        json!({"type": "v4", "region": "syd", "service_name": "web"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["ip"], "10.254.0.1");
    assert_eq!(r.body["region"], "syd");
    assert_eq!(r.body["service_name"], "web");
    assert_eq!(r.body["shared"], false);
    let v6 = post(&t, "/v1/apps/ipa/ip_assignments", a, json!({"type": "v6"})).await;
    let v6 = v6.body["ip"].as_str().unwrap().to_string();
    assert!(v6.starts_with("2001:db8:a10f:"), "{v6}");
    let p6 = post(
        &t,
        "/v1/apps/ipa/ip_assignments",
        a,
        json!({"type": "private_v6", "network": "internal"}),
    )
    .await;
    assert!(p6.body["ip"].as_str().unwrap().starts_with("fdaa:a10f:"));

    for (body, field) in [
        (json!({"type": "v5"}), "type"),
        (json!({}), "type"),
        (json!({"type": "v4", "region": "mars"}), "region"),
        (json!({"type": "v4", "network": "n"}), "network"),
        (json!({"type": "v4", "org_slug": "other"}), "org_slug"),
    ] {
        let r = post(&t, "/v1/apps/ipa/ip_assignments", a, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
        assert!(
            r.body["error"].as_str().unwrap().contains(field),
            "{}",
            r.body
        );
    }
    let l = get(&t, "/v1/apps/ipa/ip_assignments", a).await;
    assert_eq!(l.body["ips"].as_array().unwrap().len(), 4, "{}", l.body);

    // Release: 204, then 404; a non-address is 400.
    let path = format!("/v1/apps/ipa/ip_assignments/{v6}");
    assert_eq!(
        t.call(Method::DELETE, &path, Some(a), None).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        t.call(Method::DELETE, &path, Some(a), None).await.status,
        StatusCode::NOT_FOUND
    );
    let r = t
        .call(
            Method::DELETE,
            "/v1/apps/ipa/ip_assignments/not-an-ip",
            Some(a),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body["error"].as_str().unwrap().contains("ip"));

    // Racing allocations across two apps never hand out one address twice.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let router = t.router.clone();
        let tok = t.admin.clone();
        let app = if i % 2 == 0 { "ipa" } else { "ipb" };
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .method(Method::POST)
                .uri(format!("/v1/apps/{app}/ip_assignments"))
                .header("authorization", format!("Bearer {tok}"))
                .header("content-type", "application/json")
                .body(Body::from(r#"{"type":"v4"}"#))
                .unwrap();
            let resp = router.oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            let v: Value = serde_json::from_slice(&b).unwrap();
            v["ip"].as_str().unwrap().to_string()
        }));
    }
    let mut seen = std::collections::HashSet::new();
    seen.insert("10.254.0.1".to_string());
    for task in tasks {
        let ip = task.await.unwrap();
        assert!(seen.insert(ip.clone()), "{ip} handed out twice");
    }
    assert_eq!(seen.len(), 25);

    // Destroying an app releases its addresses: they can be assigned again.
    let claims_before = t.store.list("ipclaims/").await.unwrap().entries.len();
    let r = t.call(Method::DELETE, "/v1/apps/ipa", Some(a), None).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert!(
        t.store
            .list("ipassign/ipa/")
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    let claims_after = t.store.list("ipclaims/").await.unwrap().entries.len();
    assert_eq!(
        claims_before - claims_after,
        1 + 12 + 1,
        "v4s and the private v6"
    );
    let r = post(&t, "/v1/apps/ipb/ip_assignments", a, json!({"type": "v4"})).await;
    assert_eq!(r.body["ip"], "10.254.0.1", "{}", r.body);
}

#[tokio::test]
async fn ip_pools_are_configurable_and_exhaustion_is_a_4xx() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    let pools = aloft_api::ips::IpPools::parse(
        "198.51.100.7",
        "10.9.9.0/30",
        "2001:db8:1::/64",
        "fd00::/64",
    )
    .unwrap();
    t.state.set_ip_pools(pools.clone()).unwrap();
    assert!(t.state.set_ip_pools(pools).is_err(), "pools are set once");
    t.create_app("small").await;
    let a = &t.admin;
    let r = post(
        &t,
        "/v1/apps/small/ip_assignments",
        a,
        json!({"type": "shared_v4"}),
    )
    .await;
    assert_eq!(r.body["ip"], "198.51.100.7");
    let mut got = Vec::new();
    for _ in 0..2 {
        let r = post(
            &t,
            "/v1/apps/small/ip_assignments",
            a,
            json!({"type": "v4"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        got.push(r.body["ip"].as_str().unwrap().to_string());
    }
    assert_eq!(got, ["10.9.9.1", "10.9.9.2"]);
    let r = post(
        &t,
        "/v1/apps/small/ip_assignments",
        a,
        json!({"type": "v4"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(r.body["error"].as_str().unwrap().contains("10.9.9.0/30"));
    let r = post(
        &t,
        "/v1/apps/small/ip_assignments",
        a,
        json!({"type": "v6"}),
    )
    .await;
    assert!(r.body["ip"].as_str().unwrap().starts_with("2001:db8:1:0:"));
}

#[tokio::test]
async fn ip_pools_come_from_the_data_directory() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    std::fs::write(
        t.dir.path().join("ip-pools.json"),
        r#"{"shared_v4": "203.0.113.9", "v4": "172.30.5.0/29"}"#,
    )
    .unwrap();
    t.create_app("filepool").await;
    let a = &t.admin;
    let r = post(
        &t,
        "/v1/apps/filepool/ip_assignments",
        a,
        json!({"type": "shared_v4"}),
    )
    .await;
    assert_eq!(r.body["ip"], "203.0.113.9", "{}", r.body);
    let r = post(
        &t,
        "/v1/apps/filepool/ip_assignments",
        a,
        json!({"type": "v4"}),
    )
    .await;
    assert_eq!(r.body["ip"], "172.30.5.1", "{}", r.body);
    let r = post(
        &t,
        "/v1/apps/filepool/ip_assignments",
        a,
        json!({"type": "v6"}),
    )
    .await;
    assert!(r.body["ip"].as_str().unwrap().starts_with("2001:db8:a10f:"));
}

#[tokio::test]
async fn org_volumes_list_every_app_the_token_sees() {
    let t = TestApi::start(&[("h1", "ams"), ("h2", "syd")]).await;
    t.create_app("va").await;
    t.create_app("vb").await;
    let a = &t.admin;
    for (app, name, region) in [
        ("va", "data", "ams"),
        ("va", "logs", "syd"),
        ("vb", "db", "ams"),
    ] {
        let r = post(
            &t,
            &format!("/v1/apps/{app}/volumes"),
            a,
            json!({"name": name, "region": region, "size_gb": 1}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let r = get(&t, "/v1/orgs/personal/volumes", a).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let vols = r.body["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 3);
    let mut apps: Vec<&str> = vols
        .iter()
        .map(|v| v["app_name"].as_str().unwrap())
        .collect();
    apps.sort();
    assert_eq!(apps, ["va", "va", "vb"]);
    assert!(vols.iter().all(|v| v["type"] == "local"));
    let r = get(&t, "/v1/orgs/personal/volumes?region=syd", a).await;
    assert_eq!(r.body["volumes"].as_array().unwrap().len(), 1);
    // Pages follow the cursor.
    let p1 = get(&t, "/v1/orgs/personal/volumes?limit=2", a).await;
    assert_eq!(p1.body["volumes"].as_array().unwrap().len(), 2);
    let cursor = p1.body["next_cursor"].as_str().unwrap();
    let p2 = get(
        &t,
        &format!(
            "/v1/orgs/personal/volumes?limit=2&cursor={}",
            form_urlencoded::byte_serialize(cursor.as_bytes()).collect::<String>()
        ),
        a,
    )
    .await;
    assert_eq!(
        p2.body["volumes"].as_array().unwrap().len(),
        1,
        "{}",
        p2.body
    );
    assert!(p2.body.get("next_cursor").is_none());
    // An app token sees its app only; other orgs do not exist; bad input is 400.
    let vb = t.token(Some("vb"), Role::Readonly).await;
    let r = get(&t, "/v1/orgs/personal/volumes", &vb).await;
    assert_eq!(r.body["volumes"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["volumes"][0]["app_name"], "vb");
    assert_eq!(
        get(&t, "/v1/orgs/other/volumes", a).await.status,
        StatusCode::NOT_FOUND
    );
    // Placement by volume name sees the same volumes: `db` is vb's, in ams.
    let place = |token: String| {
        let t = &t;
        async move {
            let body = json!({"org_slug": "personal", "volume_name": "db"});
            post(t, "/v1/platform/placements", &token, body).await
        }
    };
    let r = place(a.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let regions: Vec<&str> = r.body["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["region"].as_str().unwrap())
        .collect();
    assert_eq!(regions, ["ams"], "{}", r.body);
    let va_deploy = t.token(Some("va"), Role::Deploy).await;
    let r = place(va_deploy).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["regions"], json!([]), "va's token saw vb's volume");
    let r = get(&t, "/v1/orgs/personal/volumes?cursor=zzz", a).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = get(&t, "/v1/orgs/personal/volumes?limit=-1", a).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn placements_follow_host_capacity() {
    let t = TestApi::start(&[("h1", "ams"), ("h2", "ams"), ("h3", "syd")]).await;
    let host = |id: &str, region: &str, total: u64, committed: u64| {
        json!({"schema": 1, "id": id, "region": region, "memory_mb_total": total,
            "memory_mb_committed": committed, "cpus_total": 4, "cpus_committed": 0,
            "machines": 0, "updated_at": "2026-01-01T00:00:00Z"})
    };
    for (id, region, total, committed) in [
        ("h1", "ams", 4096, 1024),
        ("h2", "ams", 2048, 2048),
        ("h3", "syd", 8192, 0),
    ] {
        t.store
            .put(
                &format!("hosts/{id}"),
                host(id, region, total, committed).to_string().into_bytes(),
            )
            .await
            .unwrap();
    }
    let a = &t.admin;
    let p = "/v1/platform/placements";
    let r = post(
        &t,
        p,
        a,
        json!({"org_slug": "personal", "compute": {"memory_mb": 1024}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["regions"],
        json!([{"region": "ams", "count": 3, "concurrency": 1},
               {"region": "syd", "count": 8, "concurrency": 1}])
    );
    // Filled in order of preference.
    let r = post(
        &t,
        p,
        a,
        json!({"org_slug": "personal", "compute": {"memory_mb": 1024}, "count": 5, "region": "ams,syd"}),
    )
    .await;
    assert_eq!(
        r.body["regions"],
        json!([{"region": "ams", "count": 3, "concurrency": 1},
               {"region": "syd", "count": 2, "concurrency": 1}])
    );
    let r = post(
        &t,
        p,
        a,
        json!({"org_slug": "personal", "compute": {"memory_mb": 1024}, "count": 2, "region": "syd,any"}),
    )
    .await;
    assert_eq!(
        r.body["regions"],
        json!([{"region": "syd", "count": 2, "concurrency": 1}])
    );
    for (body, want, field) in [
        (json!({}), StatusCode::BAD_REQUEST, "org_slug"),
        (
            json!({"org_slug": "personal", "region": "mars"}),
            StatusCode::BAD_REQUEST,
            "region",
        ),
        (
            json!({"org_slug": "personal", "count": -1}),
            StatusCode::BAD_REQUEST,
            "count",
        ),
        (
            json!({"org_slug": "personal", "compute": {"memory_mb": "lots"}}),
            StatusCode::BAD_REQUEST,
            "compute",
        ),
        (json!({"org_slug": "other"}), StatusCode::NOT_FOUND, "other"),
    ] {
        let r = post(&t, p, a, body.clone()).await;
        assert_eq!(r.status, want, "{body}: {}", r.body);
        assert!(
            r.body["error"].as_str().unwrap().contains(field),
            "{}",
            r.body
        );
    }
}

#[tokio::test]
async fn kms_tokens_only_use_their_apps_keys() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("kapp").await;
    t.create_app("other").await;
    let r = post(
        &t,
        "/v1/apps/kapp/secretkeys/box/generate",
        &t.admin,
        json!({"type": "xaes256gcm"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let deploy = t.token(Some("kapp"), Role::Deploy).await;
    let (status, ctype, kms) =
        raw(&t, Method::POST, "/v1/tokens/kms", Some(&deploy), None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{kms}");
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let ct = post(
        &t,
        "/v1/apps/kapp/secretkeys/box/encrypt",
        &kms,
        json!({"plaintext": [5, 6]}),
    )
    .await;
    assert_eq!(ct.status, StatusCode::OK, "{}", ct.body);
    let pt = post(
        &t,
        "/v1/apps/kapp/secretkeys/box/decrypt",
        &kms,
        json!({"ciphertext": ct.body["ciphertext"]}),
    )
    .await;
    assert_eq!(bytes(&pt.body["plaintext"]), [5, 6]);
    assert_eq!(
        get(&t, "/v1/apps/kapp/secretkeys", &kms).await.status,
        StatusCode::OK
    );
    for (m, path, body) in [
        (Method::GET, "/v1/apps/kapp/machines", None),
        (Method::GET, "/v1/apps/kapp/secrets", None),
        (Method::GET, "/v1/apps/other/secretkeys", None),
        (
            Method::POST,
            "/v1/apps/kapp/secretkeys/new/generate",
            Some(r#"{"type":"hs256"}"#),
        ),
        (Method::DELETE, "/v1/apps/kapp/secretkeys/box", None),
        (Method::POST, "/v1/tokens/kms", None),
    ] {
        let r = t.call(m.clone(), path, Some(&kms), body).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{m} {path}: {}", r.body);
    }
    // Organisation and read-only tokens get no KMS token.
    let (status, _, body) = raw(
        &t,
        Method::POST,
        "/v1/tokens/kms",
        Some(&t.admin),
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let ro = t.token(Some("kapp"), Role::Readonly).await;
    let (status, _, _) = raw(&t, Method::POST, "/v1/tokens/kms", Some(&ro), None, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = raw(&t, Method::POST, "/v1/tokens/kms", None, None, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

fn decode_jwt(jwt: &str) -> (Value, Value, Vec<u8>, String) {
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "{jwt}");
    let h = serde_json::from_slice(&B64URL.decode(parts[0]).unwrap()).unwrap();
    let c = serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
    (
        h,
        c,
        B64URL.decode(parts[2]).unwrap(),
        format!("{}.{}", parts[0], parts[1]),
    )
}

#[tokio::test]
async fn oidc_tokens_verify_against_the_published_jwks() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("oapp").await;
    let m = t
        .create_machine("oapp", &t.admin, r#"{"config":{"image":"nginx"}}"#)
        .await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.body);
    let machine_id = m.body["id"].as_str().unwrap().to_string();
    // Minting the app's identity needs a deploy token; a read-only one is refused.
    let ro = t.token(Some("oapp"), Role::Readonly).await;
    let (status, _, body) = raw(&t, Method::POST, "/v1/tokens/oidc", Some(&ro), None, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let tok = t.token(Some("oapp"), Role::Deploy).await;
    let host = [("host", "api.aloft.test:4280")];
    let (status, ctype, jwt) = raw(
        &t,
        Method::POST,
        "/v1/tokens/oidc",
        Some(&tok),
        Some(r#"{"aud":"sts.example","aws_principal_tags":true}"#),
        &[host[0], ("fly-machine-id", &machine_id)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{jwt}");
    assert!(ctype.starts_with("text/plain"));
    let (header, claims, sig, input) = decode_jwt(&jwt);
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(claims["iss"], "http://api.aloft.test:4280/v1/oidc/personal");
    assert_eq!(claims["aud"], "sts.example");
    assert_eq!(claims["sub"], format!("personal:oapp:{machine_id}"));
    assert_eq!(claims["app_name"], "oapp");
    assert_eq!(claims["machine_id"], machine_id.as_str());
    assert_eq!(
        claims["https://aws.amazon.com/tags"]["principal_tags"]["app_name"][0],
        "oapp"
    );
    let exp = claims["exp"].as_u64().unwrap();
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(exp - iat, aloft_api::oidc::OIDC_TTL_SECS);

    // The JWKS and discovery document need no token.
    let (status, _, jwks) = raw(&t, Method::GET, "/v1/oidc/jwks.json", None, None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let jwks: Value = serde_json::from_str(&jwks).unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(key["kid"], header["kid"]);
    let x: [u8; 32] = B64URL
        .decode(key["x"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&x).unwrap();
    let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
    vk.verify_strict(input.as_bytes(), &sig).unwrap();
    let mut forged = input.clone().into_bytes();
    forged[10] ^= 1;
    assert!(vk.verify_strict(&forged, &sig).is_err());
    let (status, _, disco) = raw(
        &t,
        Method::GET,
        "/v1/oidc/personal/.well-known/openid-configuration",
        None,
        None,
        &host,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let disco: Value = serde_json::from_str(&disco).unwrap();
    assert_eq!(disco["issuer"], claims["iss"]);
    assert_eq!(
        disco["jwks_uri"],
        "http://api.aloft.test:4280/v1/oidc/jwks.json"
    );
    let (status, _, _) = raw(
        &t,
        Method::GET,
        "/v1/oidc/nobody/.well-known/openid-configuration",
        None,
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Default audience is the issuer; errors are 400 naming what is wrong.
    let (_, _, jwt) = raw(&t, Method::POST, "/v1/tokens/oidc", Some(&tok), None, &host).await;
    let (_, claims, _, _) = decode_jwt(&jwt);
    assert_eq!(claims["aud"], claims["iss"]);
    assert_eq!(claims["sub"], "personal:oapp:");
    let (status, _, body) = raw(
        &t,
        Method::POST,
        "/v1/tokens/oidc",
        Some(&tok),
        None,
        &[("fly-machine-id", "nope")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("fly-machine-id"));
    let (status, _, body) = raw(
        &t,
        Method::POST,
        "/v1/tokens/oidc",
        Some(&tok),
        Some(r#"{"aud": 5}"#),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("aud"));
    let (status, _, body) = raw(
        &t,
        Method::POST,
        "/v1/tokens/oidc",
        Some(&t.admin),
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn tokens_are_created_listed_and_revoked_by_org_admins() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("tapp").await;
    let a = &t.admin;
    let r = post(
        &t,
        "/v1/tokens",
        a,
        json!({"app": "tapp", "role": "readonly", "expiry": "24h", "name": "ci"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let ro = r.body["token"].as_str().unwrap().to_string();
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(r.body["role"], "readonly");
    assert_eq!(r.body["app"], "tapp");
    assert!(r.body["expires_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(get(&t, "/v1/apps/tapp", &ro).await.status, StatusCode::OK);
    let r = post(
        &t,
        "/v1/apps/tapp/ip_assignments",
        &ro,
        json!({"type": "v6"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    let l = get(&t, "/v1/tokens", a).await;
    assert_eq!(l.status, StatusCode::OK, "{}", l.body);
    let listed = l.body["tokens"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|x| x["id"] == id.as_str() && x["name"] == "ci")
    );
    let text = l.body.to_string();
    assert!(!text.contains(ro.split('_').next_back().unwrap()));
    assert!(!text.contains("hash"));

    // Only organisation admins manage tokens.
    let deploy = t.token(None, Role::Deploy).await;
    assert_eq!(
        get(&t, "/v1/tokens", &deploy).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get(&t, "/v1/tokens", &ro).await.status,
        StatusCode::FORBIDDEN
    );
    let r = post(&t, "/v1/tokens", &deploy, json!({})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    for (body, field) in [
        (json!({"role": "root"}), "role"),
        (json!({"app": "tapp", "role": "admin"}), "role"),
        (json!({"expiry": "soon"}), "expiry"),
        (json!({"app": "ghost"}), "app"),
    ] {
        let r = post(&t, "/v1/tokens", a, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
        assert!(
            r.body["error"].as_str().unwrap().contains(field),
            "{}",
            r.body
        );
    }

    // Revoked tokens stop working at once.
    let r = t
        .call(
            Method::DELETE,
            &format!("/v1/tokens/{id}"),
            Some(&deploy),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t
        .call(Method::DELETE, &format!("/v1/tokens/{id}"), Some(a), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["id"], id.as_str());
    assert_eq!(
        get(&t, "/v1/apps/tapp", &ro).await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = t
        .call(Method::DELETE, &format!("/v1/tokens/{id}"), Some(a), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t
        .call(Method::DELETE, "/v1/tokens/not-hex!", Some(a), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn secret_keys_and_oidc_over_real_http() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("happ").await;
    let tok = t.token(Some("happ"), Role::Deploy).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(aloft_api::serve(listener, t.state.clone(), async {
        let _ = stop_rx.await;
    }));
    let client: Client<_, http_body_util::Full<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let call = |method: Method, path: String, token: Option<String>, body: String| {
        let client = client.clone();
        async move {
            let mut req = Request::builder()
                .method(method)
                .uri(format!("http://{addr}{path}"))
                .header("content-type", "application/json");
            if let Some(tok) = token {
                req = req.header("authorization", format!("Bearer {tok}"));
            }
            let req = req
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                .await
                .expect("request timed out")
                .unwrap();
            let status = resp.status().as_u16();
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(b.to_vec()).unwrap())
        }
    };
    let (s, b) = call(
        Method::POST,
        "/v1/apps/happ/secretkeys/sb/generate".into(),
        Some(tok.clone()),
        r#"{"type":"nacl_box"}"#.into(),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = call(
        Method::POST,
        "/v1/apps/happ/secretkeys/sb/encrypt".into(),
        Some(tok.clone()),
        r#"{"plaintext":"aGVsbG8="}"#.into(),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let ct: Value = serde_json::from_str(&b).unwrap();
    let (s, b) = call(
        Method::POST,
        "/v1/apps/happ/secretkeys/sb/decrypt".into(),
        Some(tok.clone()),
        json!({"ciphertext": ct["ciphertext"]}).to_string(),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let pt: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(bytes(&pt["plaintext"]), b"hello");
    let (s, b) = call(
        Method::POST,
        "/v1/apps/happ/secretkeys/sb/decrypt".into(),
        Some(tok.clone()),
        "{not json".into(),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    let (s, jwt) = call(
        Method::POST,
        "/v1/tokens/oidc".into(),
        Some(tok.clone()),
        String::new(),
    )
    .await;
    assert_eq!(s, 200, "{jwt}");
    let (_, claims, _, _) = decode_jwt(&jwt);
    assert_eq!(claims["iss"], format!("http://{addr}/v1/oidc/personal"));
    let (s, _) = call(
        Method::GET,
        "/v1/oidc/jwks.json".into(),
        None,
        String::new(),
    )
    .await;
    assert_eq!(s, 200);
    let (s, b) = call(
        Method::POST,
        "/v1/apps/happ/ip_assignments".into(),
        Some(tok),
        r#"{"type":"private_v6"}"#.into(),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server did not shut down")
        .unwrap()
        .unwrap();
}
