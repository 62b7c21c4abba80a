//! Volumes: sparse ext4 files under `<data>/volumes`, attached to one machine at a
//! time (a machine with a volume stays on this host), extended offline; snapshots as
//! sparse (reflinked where the filesystem can) copies under `<data>/snapshots/<volume>`,
//! taken with the machine using the volume paused, kept `snapshot_retention` days,
//! restored by creating a volume from one, and destroyed with their volume.

use std::process::Command;

use std::path::{Path, PathBuf};

use aloft_types::machine::{MachineState, Volume, VolumeSnapshot};

use crate::agent::Agent;
use crate::api::{AgentError, CreateVolume};

const GB: u64 = 1 << 30;

fn tool(cmd: &mut Command, what: &str) -> Result<(), AgentError> {
    let out = cmd
        .output()
        .map_err(|e| AgentError::Internal(format!("{what}: {e}")))?;
    if !out.status.success() {
        return Err(AgentError::Internal(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

pub(crate) async fn create(agent: &Agent, req: CreateVolume) -> Result<Volume, AgentError> {
    if req.name.is_empty()
        || !req
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        || req.name.len() > 30
    {
        return Err(AgentError::Invalid {
            field: "name".into(),
            message: format!("{:?}: use 1-30 letters, digits or underscores", req.name),
        });
    }
    if !(1..=500).contains(&req.size_gb) {
        return Err(AgentError::Invalid {
            field: "size_gb".into(),
            message: format!("{} GB is not between 1 and 500", req.size_gb),
        });
    }
    let id = agent.new_id();
    let dir = agent.data_dir().join("volumes");
    std::fs::create_dir_all(&dir)
        .map_err(|e| AgentError::Internal(format!("{}: {e}", dir.display())))?;
    let path = dir.join(format!("{id}.ext4"));
    let tmp = dir.join(format!("{id}.ext4.tmp"));
    let made = match &req.snapshot_id {
        Some(snap) => restore(agent, snap, req.size_gb, &tmp),
        None => std::fs::File::create(&tmp)
            .and_then(|f| f.set_len(req.size_gb as u64 * GB))
            .map_err(|e| AgentError::Internal(format!("{}: {e}", tmp.display())))
            .and_then(|()| {
                tool(
                    Command::new("mkfs.ext4")
                        .args(["-q", "-F", "-L", &req.name])
                        .arg(&tmp),
                    "mkfs.ext4",
                )
            }),
    };
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &path)
        .map_err(|e| AgentError::Internal(format!("{}: {e}", path.display())))?;
    let v = Volume {
        id,
        name: req.name,
        state: "created".into(),
        size_gb: req.size_gb,
        region: agent.region_name().to_string(),
        zone: agent.host_name().to_string(),
        encrypted: false,
        attached_machine_id: None,
        attached_alloc_id: None,
        created_at: agent.now_rfc3339(),
        host_status: "ok".into(),
        fstype: "ext4".into(),
        snapshot_retention: req.snapshot_retention.unwrap_or(5),
        auto_backup_enabled: false,
    };
    agent
        .db()
        .put_volume(&req.app, &v, &path)
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    agent.publish_volume(&req.app, &v).await;
    Ok(v)
}

pub(crate) async fn extend(
    agent: &Agent,
    app: &str,
    id: &str,
    size_gb: i64,
) -> Result<Volume, AgentError> {
    let (mut v, path) = agent.volume(app, id)?;
    if size_gb <= v.size_gb || size_gb > 500 {
        return Err(AgentError::Invalid {
            field: "size_gb".into(),
            message: format!(
                "{size_gb} GB must be larger than {} GB and at most 500",
                v.size_gb
            ),
        });
    }
    for m in agent.machines_using_volume(app, &v) {
        if let Some((_, machine, _)) = agent
            .db()
            .get_machine(&m)
            .map_err(|e| AgentError::Internal(e.to_string()))?
            && !matches!(
                machine.state,
                MachineState::Stopped | MachineState::Created | MachineState::Failed
            )
        {
            return Err(AgentError::Conflict(format!(
                "volume {id} is in use by running machine {m}; stop it to extend"
            )));
        }
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| AgentError::Internal(format!("{}: {e}", path.display())))?;
    file.set_len(size_gb as u64 * GB)
        .map_err(|e| AgentError::Internal(format!("{}: {e}", path.display())))?;
    drop(file);
    let _ = Command::new("e2fsck").args(["-fy"]).arg(&path).output();
    tool(Command::new("resize2fs").arg(&path), "resize2fs")?;
    v.size_gb = size_gb;
    agent
        .db()
        .put_volume(app, &v, &path)
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    agent.publish_volume(app, &v).await;
    Ok(v)
}

pub(crate) async fn destroy(agent: &Agent, app: &str, id: &str) -> Result<Volume, AgentError> {
    let (mut v, path) = agent.volume(app, id)?;
    let users = agent.machines_using_volume(app, &v);
    if !users.is_empty() {
        return Err(AgentError::Conflict(format!(
            "volume {id} is attached to machine {}; destroy that first",
            users.join(", ")
        )));
    }
    let _ = std::fs::remove_file(&path);
    for (snap, file) in agent.db().snapshots(id).unwrap_or_default() {
        let _ = std::fs::remove_file(&file);
        let _ = agent.db().delete_snapshot(&snap.id);
    }
    let _ = std::fs::remove_dir_all(snapshot_dir(agent, id));
    agent
        .db()
        .delete_volume(id)
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    v.state = "destroyed".into();
    agent.publish_volume(app, &v).await;
    Ok(v)
}

fn internal(what: &Path, e: impl std::fmt::Display) -> AgentError {
    AgentError::Internal(format!("{}: {e}", what.display()))
}

fn snapshot_dir(agent: &Agent, volume_id: &str) -> PathBuf {
    agent.data_dir().join("snapshots").join(volume_id)
}

/// A sparse copy of `from` at `to` (a reflink where the filesystem offers one).
fn copy_sparse(from: &Path, to: &Path) -> Result<(), AgentError> {
    tool(
        Command::new("cp")
            .args(["--reflink=auto", "--sparse=always"])
            .arg(from)
            .arg(to),
        "cp",
    )
}

/// Writes the volume image of snapshot `snap_id` to `tmp`, grown to `size_gb`.
fn restore(agent: &Agent, snap_id: &str, size_gb: i64, tmp: &Path) -> Result<(), AgentError> {
    let (_, snap, file) = agent
        .db()
        .snapshot(snap_id)
        .map_err(|e| AgentError::Internal(e.to_string()))?
        .ok_or_else(|| AgentError::NotFound {
            kind: "snapshot",
            id: snap_id.to_string(),
        })?;
    let want = size_gb as u64 * GB;
    if (want as i64) < snap.volume_size {
        return Err(AgentError::Invalid {
            field: "size_gb".into(),
            message: format!(
                "{size_gb} GB is smaller than snapshot {snap_id} ({} GB)",
                snap.volume_size / GB as i64
            ),
        });
    }
    copy_sparse(&file, tmp)?;
    if want as i64 > snap.volume_size {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp)
            .map_err(|e| internal(tmp, e))?;
        f.set_len(want).map_err(|e| internal(tmp, e))?;
        drop(f);
        let _ = Command::new("e2fsck").args(["-fy"]).arg(tmp).output();
        tool(Command::new("resize2fs").arg(tmp), "resize2fs")?;
    }
    Ok(())
}

/// Drops snapshots older than the volume's retention (days).
fn prune(agent: &Agent, v: &Volume) {
    let days = if v.snapshot_retention > 0 {
        v.snapshot_retention
    } else {
        5
    };
    let oldest = crate::agent::now_ms() - days * 86_400_000;
    for (snap, file) in agent.db().snapshots(&v.id).unwrap_or_default() {
        if crate::agent::parse_rfc3339_ms(&snap.created_at).is_some_and(|t| t < oldest) {
            let _ = std::fs::remove_file(&file);
            let _ = agent.db().delete_snapshot(&snap.id);
        }
    }
}

pub(crate) async fn snapshots(
    agent: &Agent,
    app: &str,
    id: &str,
) -> Result<Vec<VolumeSnapshot>, AgentError> {
    let (v, _) = agent.volume(app, id)?;
    prune(agent, &v);
    Ok(agent
        .db()
        .snapshots(id)
        .map_err(|e| AgentError::Internal(e.to_string()))?
        .into_iter()
        .map(|(s, _)| s)
        .collect())
}

/// Takes a snapshot. With the volume in use by a running machine, the guest's init
/// flushes its filesystems (`sync(2)`), then the VM is paused for the copy (QEMU drains
/// its disk queue when pausing): the copy holds everything written before the call,
/// and at worst what is mid-write is left to ext4's journal on restore.
pub(crate) async fn snapshot(
    agent: &Agent,
    app: &str,
    id: &str,
) -> Result<VolumeSnapshot, AgentError> {
    let (v, path) = agent.volume(app, id)?;
    let dir = snapshot_dir(agent, id);
    std::fs::create_dir_all(&dir).map_err(|e| internal(&dir, e))?;
    let snap_id = format!("vs_{}", agent.new_id().trim_start_matches("vol_"));
    let file = dir.join(format!("{snap_id}.ext4"));
    let tmp = dir.join(format!("{snap_id}.ext4.tmp"));
    let users = agent.machines_using_volume(app, &v);
    // Hold the user's lock: no stop, start or suspend while it is paused.
    let mut held = Vec::new();
    for m in &users {
        let lock = agent.machine_lock(m);
        held.push(lock.lock_owned().await);
    }
    let mut paused = Vec::new();
    for m in &users {
        if let Some((vm, channel)) = agent.running_vm(m).await {
            if let Some(ch) = channel
                && let Err(e) = crate::agent::guest_sync(&ch, m).await
            {
                tracing::warn!(machine = %m, "snapshot without a guest sync: {e}");
            }
            vm.pause()
                .await
                .map_err(|e| AgentError::Internal(format!("pausing machine {m}: {e}")))?;
            paused.push(vm);
        }
    }
    let copied = copy_sparse(&path, &tmp);
    for vm in &paused {
        if let Err(e) = vm.resume().await {
            tracing::warn!(volume = %id, "resuming a machine after a snapshot: {e}");
        }
    }
    drop(held);
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &file).map_err(|e| internal(&file, e))?;
    let meta = std::fs::metadata(&file).map_err(|e| internal(&file, e))?;
    let snap = VolumeSnapshot {
        id: snap_id,
        created_at: agent.now_rfc3339(),
        status: "created".into(),
        size: (std::os::unix::fs::MetadataExt::blocks(&meta) * 512) as i64,
        volume_size: meta.len() as i64,
        digest: String::new(),
        retention_days: if v.snapshot_retention > 0 {
            v.snapshot_retention
        } else {
            5
        },
    };
    agent
        .db()
        .put_snapshot(id, &snap, &file)
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    prune(agent, &v);
    Ok(snap)
}

/// After a restart: removes the snapshot files of this agent's volumes that no
/// snapshot record names (a copy or its rename cut short by a crash). Other agents
/// sharing the data directory keep theirs: only this agent's volumes are looked at.
pub(crate) fn sweep_snapshots(agent: &Agent) {
    for (_, v, _) in agent.db().volumes(None).unwrap_or_default() {
        let dir = snapshot_dir(agent, &v.id);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let known: Vec<PathBuf> = agent
            .db()
            .snapshots(&v.id)
            .unwrap_or_default()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        for e in entries.flatten() {
            if !known.contains(&e.path()) {
                tracing::info!(volume = %v.id, file = %e.path().display(), "removing a stray snapshot file");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
