//! The static route source: a TOML file with the shape of [`RoutesSpec`], loaded into
//! [`Routes`] exactly as the catalog would be.

use std::path::{Path, PathBuf};

use crate::routes::{RouteTableError, Routes, RoutesSpec};

#[derive(Debug, thiserror::Error)]
pub enum RoutesFileError {
    #[error("cannot read routes file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The toml error (the source) names the line, column and key.
    #[error("routes file {path} is not valid")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("routes file {path} is not valid")]
    Invalid {
        path: PathBuf,
        source: RouteTableError,
    },
    /// A `[[certs]]` entry whose files cannot be read or used.
    #[error("routes file {path}: [[certs]]")]
    Cert {
        path: PathBuf,
        source: crate::tls::CertError,
    },
}

/// Read and parse a routes file without publishing it.
pub fn read_routes_file(path: &Path) -> Result<RoutesSpec, RoutesFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| RoutesFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| RoutesFileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Read `path` and publish it in `routes` (and its `[[certs]]`, paths relative to the
/// file's directory, in `routes.certs()`); on any error the current table and
/// certificates stay.
pub fn load_routes_file(path: &Path, routes: &Routes) -> Result<(), RoutesFileError> {
    let spec = read_routes_file(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let certs =
        crate::tls::load_cert_files(&spec.certs, base).map_err(|source| RoutesFileError::Cert {
            path: path.to_path_buf(),
            source,
        })?;
    routes
        .update(&spec)
        .map_err(|source| RoutesFileError::Invalid {
            path: path.to_path_buf(),
            source,
        })?;
    routes.certs().set_files(certs);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message with its causes, as the CLI prints it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(&format!(": {c}"));
            cur = c.source();
        }
        s
    }

    #[test]
    fn parse_error_names_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(
            &path,
            "[[apps]]\nname = \"a\"\nhostnames = [\"*\"]\n[[apps.services]]\ninternal_port = \"x\"\n",
        )
        .unwrap();
        let routes = Routes::new("local");
        let msg = chain(&load_routes_file(&path, &routes).unwrap_err());
        assert!(msg.contains("routes.toml"), "{msg}");
        assert!(msg.contains("internal_port"), "{msg}");
        assert!(msg.contains("line 5"), "{msg}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(
            &path,
            "[[apps]]\nname = \"a\"\nhostnames = [\"*\"]\nhostname = 1\n",
        )
        .unwrap();
        let msg = chain(&load_routes_file(&path, &Routes::new("local")).unwrap_err());
        assert!(msg.contains("hostname"), "{msg}");
    }

    #[test]
    fn invalid_value_names_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, "[[apps]]\nname = \"a\"\nhostnames = []\n").unwrap();
        let msg = chain(&load_routes_file(&path, &Routes::new("local")).unwrap_err());
        assert!(msg.contains("apps[0].hostnames"), "{msg}");
    }
}
