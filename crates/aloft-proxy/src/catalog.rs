//! The catalog-fed route source: apps and the machines their agents publish, turned
//! into the same [`RoutesSpec`] the static routes file gives, and followed live
//! through a store watch. Routing itself is identical in both modes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aloft_store::Store;
use aloft_types::catalog::{AppRecord, CERTS_PREFIX, CertRecord, MachineRecord};

use crate::routes::{
    AppSpec, Concurrency, ConcurrencyKind, MachineSpec, PortSpec, Routes, RoutesSpec, ServiceSpec,
};

/// Host names of an app: `<app><suffix>` (e.g. `hello.aloft.localhost`) and the bare name.
pub fn app_hostnames(app: &str, suffix: &str) -> Vec<String> {
    vec![format!("{app}{suffix}"), app.to_string()]
}

/// Builds the routes of every app from catalog records. Services come from the
/// newest config among the app's machines; each machine is reached at the address its
/// agent published for the first service's internal port.
pub fn spec_from_catalog(
    apps: &[AppRecord],
    machines: &[MachineRecord],
    suffix: &str,
    region_order: &[String],
) -> RoutesSpec {
    let mut by_app: BTreeMap<&str, Vec<&MachineRecord>> = BTreeMap::new();
    for m in machines {
        by_app.entry(m.app.as_str()).or_default().push(m);
    }
    let mut out = RoutesSpec {
        region_order: region_order.to_vec(),
        apps: Vec::new(),
        certs: Vec::new(),
    };
    for app in apps {
        let ms = by_app.remove(app.name.as_str()).unwrap_or_default();
        let newest = ms
            .iter()
            .filter(|m| !m.machine.config.services.is_empty())
            .max_by(|a, b| a.machine.instance_id.cmp(&b.machine.instance_id));
        let services: Vec<ServiceSpec> = newest
            .map(|m| {
                m.machine
                    .config
                    .services
                    .iter()
                    .filter_map(|s| {
                        let internal_port = u16::try_from(s.internal_port).ok()?;
                        let concurrency =
                            s.concurrency
                                .as_ref()
                                .map_or_else(Concurrency::default, |c| {
                                    let d = Concurrency::default();
                                    Concurrency {
                                        kind: if c.kind == "requests" {
                                            ConcurrencyKind::Requests
                                        } else {
                                            ConcurrencyKind::Connections
                                        },
                                        soft_limit: u32::try_from(c.soft_limit)
                                            .ok()
                                            .filter(|n| *n > 0)
                                            .unwrap_or(d.soft_limit),
                                        hard_limit: u32::try_from(c.hard_limit)
                                            .ok()
                                            .filter(|n| *n > 0)
                                            .unwrap_or(d.hard_limit),
                                    }
                                });
                        Some(ServiceSpec {
                            autostop: s.autostop.as_ref().and_then(|v| match v {
                                serde_json::Value::String(a) => Some(a.clone()),
                                serde_json::Value::Bool(true) => Some("stop".into()),
                                _ => None,
                            }),
                            min_machines_running: s
                                .min_machines_running
                                .and_then(|n| u32::try_from(n).ok())
                                .unwrap_or(0),
                            internal_port,
                            ports: s
                                .ports
                                .iter()
                                .filter_map(|p| {
                                    Some(PortSpec {
                                        port: u16::try_from(p.port?).ok()?,
                                        handlers: p.handlers.clone(),
                                        force_https: p.force_https,
                                        h2_backend: p
                                            .http_options
                                            .as_ref()
                                            .and_then(|o| o.get("h2_backend"))
                                            .and_then(serde_json::Value::as_bool)
                                            .unwrap_or(false),
                                        proxy_proto_options: p.proxy_proto_options.as_ref().map(
                                            |o| crate::routes::ProxyProtoOptions {
                                                version: o
                                                    .get("version")
                                                    .and_then(|v| v.as_str())
                                                    .map(str::to_owned),
                                            },
                                        ),
                                        tls_options: p.tls_options.as_ref().map(tls_options),
                                    })
                                })
                                .collect(),
                            concurrency,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let first_port = services.first().map(|s| s.internal_port);
        let machine_specs = ms
            .iter()
            // Cordoned: no new traffic (the machine keeps running, is not autostopped).
            .filter(|m| !m.machine.cordoned)
            .filter_map(|m| {
                let address = m
                    .addresses
                    .iter()
                    .find(|a| Some(a.internal_port) == first_port)
                    .or_else(|| m.addresses.first())?
                    .address
                    .clone();
                Some(MachineSpec {
                    id: m.machine.id.clone(),
                    region: m.machine.region.clone(),
                    address,
                    state: m.machine.state.as_str().to_string(),
                })
            })
            .collect();
        out.apps.push(AppSpec {
            name: app.name.clone(),
            hostnames: app_hostnames(&app.name, suffix),
            services,
            machines: machine_specs,
        });
    }
    out
}

/// A machine port's `tls_options` (fly.MachinePort) as the routes take them. Values
/// the proxy does not know are dropped with a warning rather than passed on: one bad
/// app config must not make the catalog's whole route table fail to build.
fn tls_options(v: &serde_json::Value) -> crate::routes::TlsOptions {
    let strings = |k: &str| {
        v.get(k).and_then(serde_json::Value::as_array).map(|a| {
            a.iter()
                .filter_map(serde_json::Value::as_str)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
    };
    let alpn = strings("alpn").map(|a| {
        a.into_iter()
            .filter(|p| {
                let ok = crate::routes::valid_alpn_id(p);
                if !ok {
                    tracing::warn!(alpn = %p, "tls_options: ALPN protocol ignored");
                }
                ok
            })
            .collect()
    });
    let versions = strings("versions")
        .unwrap_or_default()
        .into_iter()
        .filter(|x| {
            let ok = crate::routes::TlsVersion::parse(x).is_some();
            if !ok {
                tracing::warn!(version = %x, "tls_options: unknown TLS version ignored");
            }
            ok
        })
        .collect();
    crate::routes::TlsOptions {
        alpn,
        versions,
        default_self_signed: v
            .get("default_self_signed")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
    }
}

/// Adds the hostnames users attached to their apps (`certs/{hostname}` records, whatever
/// their issuance status: plain HTTP and the HTTP-01 challenge need the route first).
/// A name claimed by an app that no longer exists is left out.
pub fn add_cert_hostnames(spec: &mut RoutesSpec, certs: &[CertRecord]) {
    for cert in certs {
        let Some(app) = spec.apps.iter_mut().find(|a| a.name == cert.app) else {
            continue;
        };
        let name = cert.hostname.to_ascii_lowercase();
        if !app.hostnames.contains(&name) {
            app.hostnames.push(name);
        }
    }
}

async fn load(
    store: &dyn Store,
    suffix: &str,
    region_order: &[String],
) -> Result<(RoutesSpec, u64), aloft_store::StoreError> {
    let apps = store.list("apps/").await?;
    let machines = store.list("machines/").await?;
    let certs = store.list(CERTS_PREFIX).await?;
    let certs_revision = certs.revision;
    let apps: Vec<AppRecord> = apps
        .entries
        .iter()
        .filter_map(|e| serde_json::from_slice(&e.value).ok())
        .collect();
    let ms: Vec<MachineRecord> = machines
        .entries
        .iter()
        .filter_map(|e| serde_json::from_slice(&e.value).ok())
        .collect();
    let certs: Vec<CertRecord> = certs
        .entries
        .iter()
        .filter_map(|e| serde_json::from_slice(&e.value).ok())
        .collect();
    let mut spec = spec_from_catalog(&apps, &ms, suffix, region_order);
    add_cert_hostnames(&mut spec, &certs);
    Ok((spec, machines.revision.max(certs_revision)))
}

/// Keeps `routes` equal to the catalog until the task is dropped: a full load, then a
/// rebuild after every change (batched over a few milliseconds).
pub async fn follow_catalog(
    store: Arc<dyn Store>,
    routes: Arc<Routes>,
    suffix: String,
    region_order: Vec<String>,
) {
    loop {
        let (spec, revision) = match load(store.as_ref(), &suffix, &region_order).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("proxy: catalog read failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = routes.update(&spec) {
            tracing::warn!("proxy: catalog routes rejected: {e}");
        }
        // Any change under apps/, machines/ or certs/ triggers a rebuild.
        let Ok(mut watch) = store.watch("", revision).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        loop {
            match watch.next().await {
                Some(Ok(change))
                    if change.key.starts_with("apps/")
                        || change.key.starts_with("machines/")
                        || change.key.starts_with(CERTS_PREFIX) =>
                {
                    // Let a burst of changes settle, then rebuild from a fresh listing.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    break;
                }
                Some(Ok(_)) => continue,
                _ => break,
            }
        }
    }
}

/// Stops (or suspends) machines idle for `idle` above each service's
/// `min_machines_running`, at most one per app, service and region per pass, through
/// the routes' [`crate::MachineStarter`]. Runs until the task is dropped.
pub async fn autostop(routes: Arc<Routes>, idle: Duration) {
    let pass = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
    loop {
        tokio::time::sleep(pass).await;
        let Some(owner) = routes.starter().cloned() else {
            continue;
        };
        let table = routes.load_full();
        let now = crate::clock::now_ms();
        let idle_ms = idle.as_millis() as u64;
        let mut stops = Vec::new();
        for app in table.apps() {
            for svc in &app.services {
                let Some(mode) = svc.autostop.as_deref() else {
                    continue;
                };
                for g in &svc.groups {
                    let running = g.backends.len() as u32;
                    if running <= svc.min_machines_running {
                        continue;
                    }
                    let idle_one = g.backends.iter().find(|b| {
                        b.in_flight() == 0
                            && now.saturating_sub(
                                b.last_active.load(std::sync::atomic::Ordering::Relaxed),
                            ) >= idle_ms
                    });
                    if let Some(b) = idle_one {
                        stops.push((
                            app.name.to_string(),
                            b.machine_id.to_string(),
                            mode == "suspend",
                        ));
                    }
                }
            }
        }
        stops.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        for (app, id, suspend) in stops {
            tracing::info!(app = %app, machine = %id, suspend, "autostop: idle machine");
            if let Err(e) = owner.stop_machine(&app, &id, suspend).await {
                tracing::warn!(app = %app, machine = %id, "autostop failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod cordon_tests {
    use super::*;

    fn machine(id: &str, cordoned: bool) -> MachineRecord {
        serde_json::from_value(serde_json::json!({
            "schema": 1, "app": "web", "host": "h1",
            "addresses": [{"internal_port": 8080, "address": format!("127.0.0.1:{}", 9000 + id.len())}],
            "machine": {
                "id": id, "name": id, "state": "started", "region": "ams", "instance_id": "v1",
                "created_at": "", "updated_at": "", "cordoned": cordoned,
                "config": {"image": "x", "services": [{"protocol": "tcp", "internal_port": 8080,
                    "ports": [{"port": 80, "handlers": ["http"]}]}]}
            }
        }))
        .unwrap()
    }

    #[test]
    fn cordoned_machines_get_no_routes() {
        let app: AppRecord = serde_json::from_value(serde_json::json!({
            "schema": 1, "id": "web", "name": "web", "org": "personal", "network": "default",
            "created_at": ""
        }))
        .unwrap();
        let spec = spec_from_catalog(
            &[app],
            &[machine("m1", false), machine("m22", true)],
            ".aloft.localhost",
            &[],
        );
        let ids: Vec<&str> = spec.apps[0]
            .machines
            .iter()
            .map(|m| m.id.as_str())
            .collect();
        assert_eq!(ids, ["m1"]);
        assert_eq!(
            spec.apps[0].services.len(),
            1,
            "services still come from it"
        );
    }
}

#[cfg(test)]
mod cert_hostname_tests {
    use super::*;

    fn app(name: &str) -> AppRecord {
        AppRecord {
            schema: 1,
            id: name.into(),
            name: name.into(),
            org: "personal".into(),
            network: "default".into(),
            created_at: String::new(),
        }
    }

    fn cert(host: &str, app: &str) -> CertRecord {
        CertRecord::pending_acme(host, app, "")
    }

    #[test]
    fn attached_hostnames_route_to_their_app_and_orphans_are_dropped() {
        let mut spec = spec_from_catalog(&[app("shop"), app("blog")], &[], ".aloft.localhost", &[]);
        add_cert_hostnames(
            &mut spec,
            &[
                cert("WWW.Shop.Example", "shop"),
                cert("www.shop.example", "shop"),
                cert("gone.example", "deleted-app"),
            ],
        );
        let shop = spec.apps.iter().find(|a| a.name == "shop").unwrap();
        assert_eq!(
            shop.hostnames,
            ["shop.aloft.localhost", "shop", "www.shop.example"]
        );
        let all: Vec<&String> = spec.apps.iter().flat_map(|a| &a.hostnames).collect();
        assert!(!all.iter().any(|h| h.as_str() == "gone.example"), "{all:?}");
    }
}

#[cfg(test)]
mod tls_options_tests {
    use super::*;

    #[test]
    fn machine_port_tls_options_reach_the_routes() {
        let app: AppRecord = serde_json::from_value(serde_json::json!({
            "schema": 1, "id": "web", "name": "web", "org": "personal", "network": "default",
            "created_at": ""
        }))
        .unwrap();
        let m: MachineRecord = serde_json::from_value(serde_json::json!({
            "schema": 1, "app": "web", "host": "h1",
            "addresses": [{"internal_port": 8080, "address": "127.0.0.1:9000"}],
            "machine": {
                "id": "m1", "name": "m1", "state": "started", "region": "ams", "instance_id": "v1",
                "created_at": "", "updated_at": "",
                "config": {"image": "x", "services": [{"protocol": "tcp", "internal_port": 8080,
                    "ports": [{"port": 443, "handlers": ["tls", "http"], "tls_options": {
                        "alpn": ["http/1.1"], "versions": ["TLSv1.3", "TLSv9"],
                        "default_self_signed": true}}]}]}
            }
        }))
        .unwrap();
        let spec = spec_from_catalog(&[app], &[m], ".aloft.localhost", &[]);
        let opts = spec.apps[0].services[0].ports[0].tls_options.clone();
        assert_eq!(
            opts,
            Some(crate::routes::TlsOptions {
                alpn: Some(vec!["http/1.1".into()]),
                versions: vec!["TLSv1.3".into()],
                default_self_signed: true,
            }),
            "the unknown version is dropped, the rest kept"
        );
        crate::routes::RouteTable::build(&spec, "ams", None).expect("builds");
    }
}
