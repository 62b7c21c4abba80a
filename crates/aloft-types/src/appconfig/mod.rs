//! The fly.toml model: parsing (current and v1 layouts), flyctl-compatible
//! normalisation, validation with line/column diagnostics, and conversion to the
//! Machines API config of a process group.
//!
//! [`parse`] never stops at the first problem: it reports every error it can find, each
//! as `FILE:LINE:COL: message (key)`, and unknown keys as warnings, as flyctl's strict
//! mode lists them.

mod group;
mod model;
mod patch;
mod schema;
mod units;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use group::{
    CLIENT_VERSION, DEFAULT_GROUP, GroupError, compute_to_guest, default_group, flatten,
    http_service_to_service, process_names, to_machine_config,
};
pub use model::*;
pub use units::{SizeUnits, format_go_duration, parse_go_duration, parse_size};

/// File names looked up, in order, when no `-c FILE` is given.
pub const DEFAULT_FILE_NAMES: &[&str] = &["fly.toml", "aloft.toml"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem in a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// The dotted key the problem is about (`services[0].ports[1].port`); empty for
    /// syntax errors.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )?;
        if !self.key.is_empty() {
            write!(f, " ({})", self.key)?;
        }
        Ok(())
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no fly.toml or aloft.toml in {dir}")]
    NotFound { dir: PathBuf },
    #[error("{file} is not valid: {} problem(s)", .errors.len())]
    Invalid {
        file: String,
        errors: Vec<Diagnostic>,
        warnings: Vec<Diagnostic>,
    },
}

/// A valid, normalised config and the warnings found on the way.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub file: String,
    pub config: AppConfig,
    pub warnings: Vec<Diagnostic>,
}

/// Finds the config file in `dir`: `fly.toml`, then `aloft.toml`.
/// In the current directory (`"."`), the path returned is the bare file name, so that
/// messages read `fly.toml:3:1: …`.
pub fn find_config(dir: &Path) -> Result<PathBuf, ConfigError> {
    DEFAULT_FILE_NAMES
        .iter()
        .map(|n| {
            if dir == Path::new(".") {
                PathBuf::from(n)
            } else {
                dir.join(n)
            }
        })
        .find(|p| p.is_file())
        .ok_or_else(|| ConfigError::NotFound {
            dir: dir.to_path_buf(),
        })
}

/// Reads and parses a config file. A `machine_config` that names a file (rather than
/// holding JSON) is read relative to the config's directory.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut loaded = parse(&src, &path.display().to_string())?;
    let dir = path.parent().unwrap_or(Path::new("."));
    for mc in [
        &mut loaded.config.machine_config,
        &mut loaded
            .config
            .experimental
            .get_or_insert_with(Default::default)
            .machine_config,
    ] {
        if !mc.is_empty() && !mc.trim_start().starts_with('{') {
            let file = dir.join(&*mc);
            *mc = std::fs::read_to_string(&file)
                .map_err(|source| ConfigError::Read { path: file, source })?;
        }
    }
    if loaded.config.experimental == Some(Experimental::default()) {
        loaded.config.experimental = None;
    }
    Ok(loaded)
}

/// Parses, normalises and validates the text of a config file named `file`.
pub fn parse(src: &str, file: &str) -> Result<LoadedConfig, ConfigError> {
    parse_with(src, file, true)
}

/// Like [`parse`], but only checks syntax and types, not the rules between keys (what
/// flyctl's `LoadConfig` does before `Validate`). For tools and tests that look at
/// configs a deploy would refuse.
pub fn parse_unvalidated(src: &str, file: &str) -> Result<LoadedConfig, ConfigError> {
    parse_with(src, file, false)
}

fn parse_with(src: &str, file: &str, validate: bool) -> Result<LoadedConfig, ConfigError> {
    let mut walker = schema::Walker::new(file, src);
    let doc = match toml_edit::ImDocument::parse(src.to_string()) {
        Ok(doc) => doc,
        Err(e) => {
            let at = e.span().map_or(0, |s| s.start);
            let message = e.message().trim().to_string();
            walker.diag_at(Severity::Error, at, "", format!("TOML syntax: {message}"));
            return Err(invalid(file, walker.diags));
        }
    };
    let root = schema::node_from_table(doc.as_table());
    let mut map = walker.root(&root);
    patch::apply(&mut map);
    let config: AppConfig = match serde_json::from_value(serde_json::Value::Object(map)) {
        Ok(c) => c,
        Err(e) => {
            if walker.diags.iter().all(|d| d.severity != Severity::Error) {
                walker.diag_at(Severity::Error, 0, "", format!("cannot read config: {e}"));
            }
            return Err(invalid(file, walker.diags));
        }
    };
    if validate {
        let spans = std::mem::take(&mut walker.spans);
        validate::validate(&config, &spans, &mut walker);
    }
    let mut diags = walker.diags;
    dedup(&mut diags);
    if diags.iter().any(|d| d.severity == Severity::Error) {
        return Err(invalid(file, diags));
    }
    Ok(LoadedConfig {
        file: file.to_string(),
        config,
        warnings: diags,
    })
}

fn dedup(diags: &mut Vec<Diagnostic>) {
    let mut seen = std::collections::HashSet::new();
    diags.retain(|d| seen.insert(d.to_string()));
    diags.sort_by_key(|d| (d.line, d.column));
}

fn invalid(file: &str, mut diags: Vec<Diagnostic>) -> ConfigError {
    dedup(&mut diags);
    let (errors, warnings) = diags
        .into_iter()
        .partition(|d| d.severity == Severity::Error);
    ConfigError::Invalid {
        file: file.to_string(),
        errors,
        warnings,
    }
}
