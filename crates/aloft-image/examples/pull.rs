//! `cargo run --release -p aloft-image --example pull -- DATA_DIR REF`: pulls REF into
//! DATA_DIR/images and prints the record and the elapsed time (a quick way to time
//! the library without the CLI).

use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(reference)) = (args.next(), args.next()) else {
        return Err("usage: pull DATA_DIR REF".into());
    };
    let t = Instant::now();
    let store = aloft_image::ImageStore::open(std::path::Path::new(&dir).join("images"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let pulled = rt.block_on(aloft_image::pull(
        &store,
        &reference,
        &aloft_image::PullOptions::default(),
        aloft_image::no_progress(),
    ))?;
    println!(
        "{} cached={} in {:.1} ms",
        pulled.record.digest,
        pulled.cached,
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
