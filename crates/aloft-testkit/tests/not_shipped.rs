//! aloft-testkit stays out of the product: no crate under `crates/` may list it as a
//! normal or build dependency (dev-dependencies and xtask only).

#[test]
fn no_shipped_crate_depends_on_the_testkit() {
    let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = 0;
    for entry in std::fs::read_dir(&crates).unwrap() {
        let manifest = entry.unwrap().path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let doc: toml::Table = text.parse().unwrap();
        if doc["package"]["name"].as_str() == Some("aloft-testkit") {
            continue;
        }
        checked += 1;
        for section in ["dependencies", "build-dependencies"] {
            let listed = doc
                .get(section)
                .and_then(|d| d.as_table())
                .is_some_and(|d| d.contains_key("aloft-testkit"));
            assert!(
                !listed,
                "{} lists aloft-testkit under [{section}]; it belongs in [dev-dependencies]",
                manifest.display()
            );
        }
    }
    assert!(
        checked >= 5,
        "only {checked} crate manifests found under {}",
        crates.display()
    );
}
