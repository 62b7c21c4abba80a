//! Certificates through the router (responses checked against the document): ACME
//! requests, custom uploads and their validation, check, pagination, and one hostname
//! per app.

mod common;

use aloft_api::Role;
use aloft_types::catalog::{CertRecord, CertSource, CertStatus, cert_key};
use axum::http::{Method, StatusCode};
use common::TestApi;
use serde_json::{Value, json};

async fn record(t: &TestApi, host: &str) -> Option<CertRecord> {
    t.store
        .get(&cert_key(host))
        .await
        .unwrap()
        .map(|e| serde_json::from_slice(&e.value).unwrap())
}

/// A self-signed certificate for `names` valid from `from_days` to `to_days` (relative
/// to now); returns (chain PEM, key PEM).
fn self_signed(names: &[&str], from_days: i64, to_days: i64) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::days(from_days);
    p.not_after = now + time::Duration::days(to_days);
    (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

fn acme_body(host: &str) -> String {
    json!({ "hostname": host }).to_string()
}

fn custom_body(host: &str, chain: &str, key: &str) -> String {
    json!({ "hostname": host, "fullchain": chain, "private_key": key }).to_string()
}

#[tokio::test]
async fn acme_request_list_show_delete() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("web").await;
    let tok = Some(t.admin.as_str());

    let r = t
        .call(
            Method::POST,
            "/v1/apps/web/certificates/acme",
            tok,
            Some(&acme_body("WWW.Example.com.")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["hostname"], "www.example.com");
    assert_eq!(r.body["acme_requested"], true);
    assert_eq!(r.body["configured"], false);
    assert_eq!(r.body["status"], "Awaiting certificates");
    assert_eq!(r.body["certificates"][0]["source"], "fly");
    assert_eq!(r.body["certificates"][0]["status"], "pending_validation");
    let rec = record(&t, "www.example.com").await.expect("record written");
    assert_eq!(
        (rec.app.as_str(), rec.source, rec.status),
        ("web", CertSource::Acme, CertStatus::Pending)
    );

    // Asking again is the same request (no new record revision).
    let before = t.store.get(&cert_key("www.example.com")).await.unwrap();
    let r = t
        .call(
            Method::POST,
            "/v1/apps/web/certificates/acme",
            tok,
            Some(&acme_body("www.example.com")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let after = t.store.get(&cert_key("www.example.com")).await.unwrap();
    assert_eq!(
        before.unwrap().revision,
        after.unwrap().revision,
        "unchanged"
    );

    let r = t
        .call(Method::GET, "/v1/apps/web/certificates", tok, None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["total_count"], 1);
    assert_eq!(r.body["certificates"][0]["hostname"], "www.example.com");
    assert_eq!(r.body["certificates"][0]["acme_requested"], true);
    assert!(r.body.get("next_cursor").is_none());

    let r = t
        .call(
            Method::GET,
            "/v1/apps/web/certificates/www.example.com",
            tok,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["hostname"], "www.example.com");

    // Bad names and wildcards (no dns-01) are refused with the reason.
    for bad in [
        "",
        "localhost",
        "a..b.com",
        "-x.example.com",
        "x_y.example.com",
    ] {
        let r = t
            .call(
                Method::POST,
                "/v1/apps/web/certificates/acme",
                tok,
                Some(&acme_body(bad)),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {}",
            r.body
        );
        assert!(r.body["error"].as_str().unwrap().contains("hostname"));
    }
    let r = t
        .call(
            Method::POST,
            "/v1/apps/web/certificates/acme",
            tok,
            Some(&acme_body("*.example.com")),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body["error"].as_str().unwrap().contains("dns-01"));

    // Removing the ACME certificate through its own route, then the whole hostname.
    let r = t
        .call(
            Method::DELETE,
            "/v1/apps/web/certificates/www.example.com/custom",
            tok,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "not a custom one");
    let r = t
        .call(
            Method::DELETE,
            "/v1/apps/web/certificates/www.example.com/acme",
            tok,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["configured"], false);
    assert!(record(&t, "www.example.com").await.is_none());
    t.call(
        Method::POST,
        "/v1/apps/web/certificates/acme",
        tok,
        Some(&acme_body("api.example.com")),
    )
    .await;
    let r = t
        .call(
            Method::DELETE,
            "/v1/apps/web/certificates/api.example.com",
            tok,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = t
        .call(
            Method::GET,
            "/v1/apps/web/certificates/api.example.com",
            tok,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn custom_certificates_are_validated() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("web").await;
    let tok = Some(t.admin.as_str());
    let post = |body: String| {
        let t = &t;
        async move {
            t.call(
                Method::POST,
                "/v1/apps/web/certificates/custom",
                tok,
                Some(&body),
            )
            .await
        }
    };

    let (chain, key) = self_signed(&["shop.example.com"], -1, 60);
    let (_, other_key) = self_signed(&["shop.example.com"], -1, 60);
    let (wrong_chain, wrong_key) = self_signed(&["other.example.com"], -1, 60);
    let (old_chain, old_key) = self_signed(&["shop.example.com"], -60, -1);
    for (body, needle) in [
        (
            custom_body("shop.example.com", "garbage", &key),
            "fullchain",
        ),
        (
            custom_body("shop.example.com", &chain, "garbage"),
            "private_key",
        ),
        (
            custom_body("shop.example.com", &chain, &other_key),
            "does not match",
        ),
        (
            custom_body("shop.example.com", &wrong_chain, &wrong_key),
            "other.example.com",
        ),
        (
            custom_body("shop.example.com", &old_chain, &old_key),
            "expired",
        ),
        (custom_body("not a name", &chain, &key), "hostname"),
    ] {
        let r = post(body).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{needle}: {}",
            r.body
        );
        let e = r.body["error"].as_str().unwrap();
        assert!(e.contains(needle), "{needle}: {e}");
    }
    assert!(
        record(&t, "shop.example.com").await.is_none(),
        "nothing stored"
    );

    let r = post(custom_body("shop.example.com", &chain, &key)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["configured"], true);
    assert_eq!(r.body["acme_requested"], false);
    assert_eq!(r.body["status"], "Ready");
    let entry = &r.body["certificates"][0];
    assert_eq!(entry["source"], "custom");
    assert_eq!(entry["status"], "active");
    assert_eq!(entry["issued"][0]["type"], "ecdsa");
    assert!(entry["expires_at"].as_str().unwrap().ends_with('Z'));
    let rec = record(&t, "shop.example.com").await.unwrap();
    assert_eq!(
        (rec.source, rec.status),
        (CertSource::Custom, CertStatus::Ready)
    );
    assert_eq!(rec.key_pem, key);
    assert!(rec.not_after.is_some());

    // A wildcard covers one label.
    let (wild, wild_key) = self_signed(&["*.example.com"], -1, 60);
    let r = post(custom_body("a.example.com", &wild, &wild_key)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = post(custom_body("a.b.example.com", &wild, &wild_key)).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);

    // ACME for a hostname with a custom certificate: remove the custom one first.
    let r = t
        .call(
            Method::POST,
            "/v1/apps/web/certificates/acme",
            tok,
            Some(&acme_body("shop.example.com")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = t
        .call(
            Method::DELETE,
            "/v1/apps/web/certificates/shop.example.com/acme",
            tok,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t
        .call(
            Method::DELETE,
            "/v1/apps/web/certificates/shop.example.com/custom",
            tok,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.body["warning"]
            .as_str()
            .unwrap()
            .contains("no certificate")
    );
    assert!(record(&t, "shop.example.com").await.is_none());
}

#[tokio::test]
async fn a_hostname_belongs_to_one_app() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("app-a").await;
    t.create_app("app-b").await;
    let a = t.token(Some("app-a"), Role::Deploy).await;
    let b = t.token(Some("app-b"), Role::Deploy).await;

    let r = t
        .call(
            Method::POST,
            "/v1/apps/app-a/certificates/acme",
            Some(&a),
            Some(&acme_body("shared.example.com")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);

    // B cannot take, see or remove A's hostname ...
    let r = t
        .call(
            Method::POST,
            "/v1/apps/app-b/certificates/acme",
            Some(&b),
            Some(&acme_body("shared.example.com")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body["error"].as_str().unwrap().contains("another app"));
    let (chain, key) = self_signed(&["shared.example.com"], -1, 60);
    let r = t
        .call(
            Method::POST,
            "/v1/apps/app-b/certificates/custom",
            Some(&b),
            Some(&custom_body("shared.example.com", &chain, &key)),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    for (m, p) in [
        (
            Method::GET,
            "/v1/apps/app-b/certificates/shared.example.com",
        ),
        (
            Method::DELETE,
            "/v1/apps/app-b/certificates/shared.example.com",
        ),
        (
            Method::POST,
            "/v1/apps/app-b/certificates/shared.example.com/check",
        ),
    ] {
        let r = t.call(m.clone(), p, Some(&b), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{m} {p}: {}", r.body);
    }
    let r = t
        .call(Method::GET, "/v1/apps/app-b/certificates", Some(&b), None)
        .await;
    assert_eq!(r.body["total_count"], 0);
    // ... nor reach A's certificates with its token.
    let r = t
        .call(Method::GET, "/v1/apps/app-a/certificates", Some(&b), None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        record(&t, "shared.example.com").await.unwrap().app,
        "app-a",
        "still A's"
    );

    // A deleted app's leftover record does not block the hostname.
    let mut gone = record(&t, "shared.example.com").await.unwrap();
    gone.hostname = "old.example.com".into();
    gone.app = "deleted-app".into();
    t.store
        .put(
            &cert_key("old.example.com"),
            serde_json::to_vec(&gone).unwrap(),
        )
        .await
        .unwrap();
    let r = t
        .call(
            Method::POST,
            "/v1/apps/app-b/certificates/acme",
            Some(&b),
            Some(&acme_body("old.example.com")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(record(&t, "old.example.com").await.unwrap().app, "app-b");
}

#[tokio::test]
async fn check_retries_a_failed_issuance_and_lists_page() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("web").await;
    let tok = Some(t.admin.as_str());
    for h in ["a.example.com", "b.example.com", "c.example.com"] {
        let r = t
            .call(
                Method::POST,
                "/v1/apps/web/certificates/acme",
                tok,
                Some(&acme_body(h)),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }

    // A proxy gave up on b: the error shows, and check asks again.
    let mut rec = record(&t, "b.example.com").await.unwrap();
    rec.status = CertStatus::Failed;
    rec.error = Some("validation of b.example.com failed: connection refused".into());
    t.store
        .put(
            &cert_key("b.example.com"),
            serde_json::to_vec(&rec).unwrap(),
        )
        .await
        .unwrap();
    let r = t
        .call(
            Method::GET,
            "/v1/apps/web/certificates/b.example.com",
            tok,
            None,
        )
        .await;
    assert_eq!(r.body["status"], "Validation failed");
    let errs = r.body["validation_errors"].as_array().unwrap();
    assert!(
        errs[0]["message"]
            .as_str()
            .unwrap()
            .contains("connection refused")
    );
    let r = t
        .call(
            Method::POST,
            "/v1/apps/web/certificates/b.example.com/check",
            tok,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["status"], "Awaiting certificates");
    assert!(r.body["dns_records"]["resolved_addresses"].is_array());
    let rec = record(&t, "b.example.com").await.unwrap();
    assert_eq!(rec.status, CertStatus::Pending);
    assert!(rec.error.is_none());

    // Pages of two, in hostname order; the filter matches substrings.
    let r = t
        .call(Method::GET, "/v1/apps/web/certificates?limit=2", tok, None)
        .await;
    let names = |v: &Value| -> Vec<String> {
        v["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["hostname"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&r.body), ["a.example.com", "b.example.com"]);
    assert_eq!(r.body["total_count"], 3);
    let cursor = r.body["next_cursor"].as_str().unwrap().to_string();
    let r = t
        .call(
            Method::GET,
            &format!("/v1/apps/web/certificates?limit=2&cursor={cursor}"),
            tok,
            None,
        )
        .await;
    assert_eq!(names(&r.body), ["c.example.com"]);
    assert!(r.body.get("next_cursor").is_none());
    let r = t
        .call(
            Method::GET,
            "/v1/apps/web/certificates?filter=b.ex",
            tok,
            None,
        )
        .await;
    assert_eq!(names(&r.body), ["b.example.com"]);
    let r = t
        .call(Method::GET, "/v1/apps/web/certificates?limit=0", tok, None)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn destroying_the_app_removes_its_hostnames() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("web").await;
    t.create_app("other").await;
    let tok = Some(t.admin.as_str());
    for (app, host) in [("web", "www.example.com"), ("other", "other.example.com")] {
        let r = t
            .call(
                Method::POST,
                &format!("/v1/apps/{app}/certificates/acme"),
                tok,
                Some(&acme_body(host)),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    let r = t.call(Method::DELETE, "/v1/apps/web", tok, None).await;
    assert!(r.status.is_success(), "{} {}", r.status, r.body);
    assert!(record(&t, "www.example.com").await.is_none());
    assert!(record(&t, "other.example.com").await.is_some());
}
