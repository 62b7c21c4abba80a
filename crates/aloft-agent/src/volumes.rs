//! Volumes: sparse ext4 files under `<data>/volumes`, attached to one machine at a
//! time (a machine with a volume stays on this host), extended offline.

use std::process::Command;

use aloft_types::machine::{MachineState, Volume};

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
    let file = std::fs::File::create(&tmp)
        .map_err(|e| AgentError::Internal(format!("{}: {e}", tmp.display())))?;
    file.set_len(req.size_gb as u64 * GB)
        .map_err(|e| AgentError::Internal(format!("{}: {e}", tmp.display())))?;
    drop(file);
    let made = tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", &req.name])
            .arg(&tmp),
        "mkfs.ext4",
    );
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
    agent
        .db()
        .delete_volume(id)
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    v.state = "destroyed".into();
    agent.publish_volume(app, &v).await;
    Ok(v)
}
