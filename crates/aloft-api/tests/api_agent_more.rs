//! The API of the agent's process list, memory balloon and volume snapshots, in-process
//! through the router with fake agents (every response checked against the document):
//! `GET .../ps` with sorting, `GET/PUT .../memory`, `POST .../memory/reclaim`,
//! `GET/POST /apps/{app}/volumes/{id}/snapshots` and restoring with `snapshot_id`.

mod common;

use aloft_api::Role;
use axum::http::{Method, StatusCode};
use common::TestApi;

const MACHINE: &str = r#"{"config":{"image":"img:1","init":{"cmd":["/app","serve"]},"guest":{"cpus":1,"memory_mb":256}}}"#;

#[tokio::test]
async fn ps_and_memory() {
    let t = TestApi::start(&[("h1", "ams")]).await;
    t.create_app("procs").await;
    t.create_app("other").await;
    let tok = t.token(Some("procs"), Role::Deploy).await;
    let read = t.token(Some("procs"), Role::Readonly).await;
    let other = t.token(Some("other"), Role::Deploy).await;
    let r = t.create_machine("procs", &tok, MACHINE).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let base = format!("/v1/apps/procs/machines/{id}");

    // ps: by pid by default; sorted on request; bad sort keys are 400.
    let r = t
        .call(Method::GET, &format!("{base}/ps"), Some(&read), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let list = r.body.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["pid"], 1);
    assert_eq!(list[1]["command"], "/app serve");
    assert!(list[1]["listen_sockets"].is_array());
    let r = t
        .call(
            Method::GET,
            &format!("{base}/ps?sort_by=rss&order=desc"),
            Some(&read),
            None,
        )
        .await;
    assert_eq!(r.body[0]["pid"], 42, "{}", r.body);
    for q in ["sort_by=colour", "order=sideways"] {
        let r = t
            .call(Method::GET, &format!("{base}/ps?{q}"), Some(&read), None)
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {}", r.body);
        assert!(
            r.body["error"]
                .as_str()
                .unwrap()
                .contains("query parameter")
        );
    }
    let r = t
        .call(Method::GET, &format!("{base}/ps"), Some(&other), None)
        .await;
    assert!(
        matches!(r.status, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND),
        "{}",
        r.status
    );
    let r = t
        .call(
            Method::GET,
            "/v1/apps/procs/machines/nosuchmachine/ps",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // memory: read, limit, reclaim; bad amounts are 400 and a read token may not.
    let r = t
        .call(Method::GET, &format!("{base}/memory"), Some(&read), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        (r.body["limit_mb"].as_i64(), r.body["available_mb"].as_i64()),
        (Some(256), Some(128))
    );
    let r = t
        .call(
            Method::PUT,
            &format!("{base}/memory"),
            Some(&tok),
            Some(r#"{"limit_mb":128}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["limit_mb"], 128);
    for body in [
        r#"{"limit_mb":0}"#,
        r#"{"limit_mb":4096}"#,
        r#"{"limit_mb":"lots"}"#,
    ] {
        let r = t
            .call(
                Method::PUT,
                &format!("{base}/memory"),
                Some(&tok),
                Some(body),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
    }
    let r = t
        .call(
            Method::PUT,
            &format!("{base}/memory"),
            Some(&read),
            Some(r#"{"limit_mb":128}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t
        .call(
            Method::POST,
            &format!("{base}/memory/reclaim"),
            Some(&tok),
            Some(r#"{"amount_mb":32}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["actual_mb"], 32);
    let r = t
        .call(
            Method::POST,
            &format!("{base}/memory/reclaim"),
            Some(&tok),
            Some(r#"{"amount_mb":-1}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body["error"].as_str().unwrap().contains("amount_mb"));

    // A stopped machine has no processes to list nor a balloon: 409.
    let r = t
        .call(Method::POST, &format!("{base}/stop"), Some(&tok), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t
        .call(Method::GET, &format!("{base}/ps"), Some(&tok), None)
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = t
        .call(
            Method::POST,
            &format!("{base}/memory/reclaim"),
            Some(&tok),
            Some(r#"{"amount_mb":8}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = t
        .call(Method::GET, &format!("{base}/memory"), Some(&tok), None)
        .await;
    assert_eq!(r.body["available_mb"], 0);
}

#[tokio::test]
async fn volume_snapshots_and_restore() {
    let t = TestApi::start(&[("h1", "ams"), ("h2", "iad")]).await;
    t.create_app("snaps").await;
    let tok = t.token(Some("snaps"), Role::Deploy).await;
    let read = t.token(Some("snaps"), Role::Readonly).await;
    let r = t
        .call(
            Method::POST,
            "/v1/apps/snaps/volumes",
            Some(&tok),
            Some(r#"{"name":"data","size_gb":2,"region":"iad","snapshot_retention":7}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let vol = r.body["id"].as_str().unwrap().to_string();
    let vbase = format!("/v1/apps/snaps/volumes/{vol}");

    let r = t
        .call(
            Method::GET,
            &format!("{vbase}/snapshots"),
            Some(&read),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.as_array().unwrap().len(), 0);
    let r = t
        .call(
            Method::POST,
            &format!("{vbase}/snapshots"),
            Some(&read),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t
        .call(
            Method::POST,
            &format!("{vbase}/snapshots"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let snap = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(r.body["status"], "created");
    assert_eq!(r.body["retention_days"], 7);
    assert_eq!(r.body["volume_size"], 2_i64 << 30);
    let r = t
        .call(
            Method::GET,
            &format!("{vbase}/snapshots"),
            Some(&read),
            None,
        )
        .await;
    assert_eq!(r.body[0]["id"], snap.as_str());

    // Restore: the new volume is made where the snapshot is, whatever region is asked.
    let r = t
        .call(
            Method::POST,
            "/v1/apps/snaps/volumes",
            Some(&tok),
            Some(&format!(
                r#"{{"name":"copy","size_gb":2,"region":"ams","snapshot_id":"{snap}"}}"#
            )),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["region"], "iad");
    assert_eq!(r.body["zone"], "h2");
    // Too small for the snapshot, an unknown snapshot, a bad retention: 400.
    for body in [
        format!(r#"{{"name":"small","size_gb":1,"snapshot_id":"{snap}"}}"#),
        r#"{"name":"ghost","size_gb":1,"snapshot_id":"vs_nope"}"#.to_string(),
        r#"{"name":"keep","size_gb":1,"snapshot_retention":0}"#.to_string(),
    ] {
        let r = t
            .call(
                Method::POST,
                "/v1/apps/snaps/volumes",
                Some(&tok),
                Some(&body),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
    }

    // Unknown volumes are 404; a destroyed volume takes its snapshots with it.
    let r = t
        .call(
            Method::POST,
            "/v1/apps/snaps/volumes/vol_nope/snapshots",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t.call(Method::DELETE, &vbase, Some(&tok), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = t
        .call(
            Method::POST,
            "/v1/apps/snaps/volumes",
            Some(&tok),
            Some(&format!(
                r#"{{"name":"late","size_gb":2,"snapshot_id":"{snap}"}}"#
            )),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
}
