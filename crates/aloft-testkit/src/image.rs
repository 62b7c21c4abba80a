//! Busybox httpd images, packed from a directory tree and imported into an image store.

use std::path::{Path, PathBuf};

use aloft_image::{ImageConfig, ImageStore};

/// Building or importing a fixture image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageFixtureError {
    #[error(
        "writing the image tree at {path}: {source} (is busybox-static installed? `cargo xtask setup`)"
    )]
    Tree {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("packing {reference} into {layout}: {source}")]
    Pack {
        reference: String,
        layout: PathBuf,
        source: aloft_image::PackError,
    },
    #[error("opening the image store at {path}: {source}")]
    Store {
        path: PathBuf,
        source: aloft_image::StoreError,
    },
    #[error("importing {layout}: {source}")]
    Import {
        layout: PathBuf,
        source: aloft_image::ImportError,
    },
}

/// The image config of busybox httpd serving `/www` on port 8080 in the foreground,
/// `-v` (one log line per request) when `verbose`; `PATH=/bin`.
pub fn httpd_config(verbose: bool) -> ImageConfig {
    let mut cmd = vec!["/bin/busybox", "httpd", "-f"];
    if verbose {
        cmd.push("-v");
    }
    cmd.extend(["-p", "8080", "-h", "/www"]);
    ImageConfig {
        cmd: Some(cmd.into_iter().map(String::from).collect()),
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    }
}

/// A busybox httpd image: `/bin/busybox` (copied from the host's busybox-static),
/// `/bin/sh`, `/www/index.html`, a root-only `/etc/passwd` and `/etc/group`.
#[derive(Debug, Clone)]
pub struct BusyboxHttpd {
    reference: String,
    page: String,
    verbose: bool,
}

impl BusyboxHttpd {
    /// The image `reference` (`name:tag`), serving "hello from aloft\n", logging
    /// requests (`httpd -v`).
    pub fn new(reference: &str) -> Self {
        Self {
            reference: reference.to_string(),
            page: "hello from aloft\n".into(),
            verbose: true,
        }
    }

    /// Serves `page` as `/index.html`.
    pub fn page(mut self, page: &str) -> Self {
        self.page = page.to_string();
        self
    }

    /// Without `httpd -v`: no log line per request.
    pub fn quiet(mut self) -> Self {
        self.verbose = false;
        self
    }

    /// Writes the tree under `work/tree-<reference>` and packs it into the OCI layout
    /// `work/layout-<reference>` (`:` written as `-`); returns the layout's path.
    pub fn pack(&self, work: &Path) -> Result<PathBuf, ImageFixtureError> {
        let slug = self.reference.replace([':', '/'], "-");
        let root = work.join(format!("tree-{slug}"));
        self.write_tree(&root)
            .map_err(|source| ImageFixtureError::Tree {
                path: root.clone(),
                source,
            })?;
        let layout = work.join(format!("layout-{slug}"));
        aloft_image::pack_dir(&root, &httpd_config(self.verbose), &self.reference, &layout)
            .map_err(|source| ImageFixtureError::Pack {
                reference: self.reference.clone(),
                layout: layout.clone(),
                source,
            })?;
        Ok(layout)
    }

    /// [`pack`](Self::pack)s under `work` and imports the layout into the image store
    /// at `images`; returns the image's digest.
    pub fn import(&self, work: &Path, images: &Path) -> Result<String, ImageFixtureError> {
        let layout = self.pack(work)?;
        let store = ImageStore::open(images).map_err(|source| ImageFixtureError::Store {
            path: images.to_path_buf(),
            source,
        })?;
        let imported = aloft_image::import(&store, &layout, &aloft_image::no_progress())
            .map_err(|source| ImageFixtureError::Import { layout, source })?;
        Ok(imported.record.digest)
    }

    fn write_tree(&self, root: &Path) -> std::io::Result<()> {
        for d in ["bin", "www", "etc"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
        std::os::unix::fs::symlink("busybox", root.join("bin/sh"))?;
        std::fs::write(root.join("www/index.html"), &self.page)?;
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
        std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_a_busybox_image_with_its_page_and_command() {
        if !Path::new("/bin/busybox").is_file() {
            panic!("/bin/busybox missing (busybox-static: `cargo xtask setup`)");
        }
        let work = tempfile::tempdir().unwrap();
        let images = work.path().join("images");
        let fixture = BusyboxHttpd::new("t:v1").page("page one\n").quiet();
        let digest = fixture.import(work.path(), &images).unwrap();
        assert!(digest.starts_with("sha256:"), "{digest}");
        let tree = work.path().join("tree-t-v1");
        assert_eq!(
            std::fs::read_to_string(tree.join("www/index.html")).unwrap(),
            "page one\n"
        );
        assert_eq!(
            std::fs::read_link(tree.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        let cmd = httpd_config(false).cmd.unwrap();
        assert!(!cmd.contains(&"-v".to_string()), "{cmd:?}");
        assert!(httpd_config(true).cmd.unwrap().contains(&"-v".to_string()));
    }
}
