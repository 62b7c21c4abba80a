//! An `aloft dev` child process, stopped with its VMs when the guard drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait::{poll_for, poll_until};

/// Starting or waiting for an `aloft dev` child failed.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("starting aloft dev on {data}: {source}")]
    Spawn {
        data: PathBuf,
        source: std::io::Error,
    },
    #[error("aloft dev on {data} exited before writing dev.json ({status})")]
    Exited {
        data: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("aloft dev on {data} did not write dev.json within {timeout:?}")]
    NotReady { data: PathBuf, timeout: Duration },
}

/// What `aloft dev` wrote to `<data>/dev.json` once it was serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevInfo {
    pub api_url: String,
    pub token: String,
}

/// `bin --data-dir data dev --regions local --api-listen 127.0.0.1:api
/// --proxy-listen 127.0.0.1:proxy`, stdout discarded; add flags and env before
/// [`DevChild::spawn`].
pub fn dev_command(bin: &Path, data: &Path, api_port: u16, proxy_port: u16) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--data-dir")
        .arg(data)
        .args(["dev", "--regions", "local"])
        .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
        .args(["--proxy-listen", &format!("127.0.0.1:{proxy_port}")])
        .stdout(Stdio::null());
    cmd
}

/// A running `aloft dev`. On drop: SIGINT, up to [`stop_within`](Self::stop_within)
/// (30 s by default) for it to stop its VMs and exit, then SIGKILL, then SIGKILL to
/// every process whose command line names the data directory (its QEMUs), so that no
/// VM outlives the test whatever happened.
pub struct DevChild {
    child: Child,
    data: PathBuf,
    stop_within: Duration,
}

impl DevChild {
    /// Spawns `cmd` (see [`dev_command`]) working on the data directory `data`.
    pub fn spawn(mut cmd: Command, data: &Path) -> Result<Self, DevError> {
        let child = cmd.spawn().map_err(|source| DevError::Spawn {
            data: data.to_path_buf(),
            source,
        })?;
        Ok(Self {
            child,
            data: data.to_path_buf(),
            stop_within: Duration::from_secs(30),
        })
    }

    /// How long drop waits for a clean exit after SIGINT.
    pub fn stop_within(mut self, timeout: Duration) -> Self {
        self.stop_within = timeout;
        self
    }

    /// The data directory.
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// Waits up to `timeout` for `<data>/dev.json` (written once the API and proxy
    /// listen) and returns what it says; fails early if the child exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<DevInfo, DevError> {
        let path = self.data.join("dev.json");
        let mut exited = None;
        let info = poll_for(timeout, Duration::from_millis(50), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                exited = Some(status);
                return Some(None);
            }
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            Some(Some(DevInfo {
                api_url: field("api_url"),
                token: field("token"),
            }))
        });
        match (info, exited) {
            (_, Some(status)) => Err(DevError::Exited {
                data: self.data.clone(),
                status,
            }),
            (Some(Some(info)), None) => Ok(info),
            _ => Err(DevError::NotReady {
                data: self.data.clone(),
                timeout,
            }),
        }
    }
}

impl Drop for DevChild {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let child = &mut self.child;
        poll_until(self.stop_within, Duration::from_millis(50), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Never leave a VM behind, whatever happened.
        let _ = Command::new("pkill")
            .args(["-9", "-f", &self.data.display().to_string()])
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_a_child_that_exits_before_dev_json() {
        let data = tempfile::tempdir().unwrap();
        let mut dev = DevChild::spawn(Command::new("true"), data.path()).unwrap();
        let err = dev.wait_ready(Duration::from_secs(10)).unwrap_err();
        assert!(matches!(err, DevError::Exited { .. }), "{err}");
    }

    #[test]
    fn reads_dev_json_and_stops_the_child_on_drop() {
        let data = tempfile::tempdir().unwrap();
        std::fs::write(
            data.path().join("dev.json"),
            r#"{"api_url":"http://127.0.0.1:1","token":"t"}"#,
        )
        .unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let mut dev = DevChild::spawn(cmd, data.path()).unwrap();
        let info = dev.wait_ready(Duration::from_secs(10)).unwrap();
        assert_eq!(info.api_url, "http://127.0.0.1:1");
        assert_eq!(info.token, "t");
        let pid = dev.child.id();
        drop(dev);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
