//! Placement: which host's agent gets a new machine or volume.
//!
//! A machine that mounts a volume goes to the volume's host. Otherwise the
//! candidates are the agents of the requested region (any agent without one) whose
//! heartbeat (`hosts/{host}`) shows enough free memory; hosts without a heartbeat yet
//! count as having room. Among candidates, the one with the fewest machines of the
//! app wins (spreading an app across hosts), then the one with most free memory.

use std::collections::HashMap;
use std::sync::Arc;

use aloft_agent::{AgentApi, AgentError};
use aloft_types::catalog::{HostRecord, VolumeRecord, volume_key};
use aloft_types::machine::{MachineConfig, MachineGuest, MachineState};

use crate::ApiState;
use crate::auth::read_record;
use crate::error::ApiError;

/// Memory a machine without a `guest` section gets (Fly's shared-cpu-1x).
pub const DEFAULT_MEMORY_MB: u64 = 256;

/// Why no host could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("no host serves region {0:?}")]
    UnknownRegion(String),
    #[error("no agents are registered")]
    NoAgents,
    #[error("no host in {scope} has {needed_mb} MB of memory free")]
    NoCapacity { scope: String, needed_mb: u64 },
    #[error("volume {0:?} not found")]
    NoVolume(String),
    #[error("volume {volume:?} is in region {volume_region:?}, not {region:?}")]
    VolumeRegion {
        volume: String,
        volume_region: String,
        region: String,
    },
    #[error("volume {volume:?} lives on host {host:?}, which no agent serves")]
    VolumeHostGone { volume: String, host: String },
    #[error("catalog: {0}")]
    Catalog(String),
    #[error("host {host}: {source}")]
    Agent {
        host: String,
        #[source]
        source: AgentError,
    },
}

impl From<PlacementError> for ApiError {
    fn from(e: PlacementError) -> Self {
        match e {
            PlacementError::UnknownRegion(_) | PlacementError::VolumeRegion { .. } => {
                ApiError::BadRequest(e.to_string())
            }
            PlacementError::NoVolume(_) => ApiError::NotFound(e.to_string()),
            PlacementError::NoAgents | PlacementError::NoCapacity { .. } => {
                ApiError::Capacity(e.to_string())
            }
            PlacementError::VolumeHostGone { .. } => ApiError::Unprocessable(e.to_string()),
            PlacementError::Catalog(_) => ApiError::Internal(e.to_string()),
            PlacementError::Agent { source, .. } => source.into(),
        }
    }
}

/// The memory a config asks for, in MB.
pub fn memory_mb(config: &MachineConfig) -> u64 {
    let guest = config
        .guest
        .clone()
        .or_else(|| config.size.as_deref().and_then(MachineGuest::from_size));
    guest
        .map(|g| g.memory_mb)
        .filter(|m| *m > 0)
        .map_or(DEFAULT_MEMORY_MB, |m| m as u64)
}

async fn host_records(state: &ApiState) -> Result<HashMap<String, HostRecord>, PlacementError> {
    let listing = state
        .store()
        .list("hosts/")
        .await
        .map_err(|e| PlacementError::Catalog(e.to_string()))?;
    Ok(listing
        .entries
        .iter()
        .filter_map(|e| serde_json::from_slice::<HostRecord>(&e.value).ok())
        .map(|h| (h.id.clone(), h))
        .collect())
}

/// Finds the agent holding volume `id` of `app`: the catalog first, then every agent.
pub async fn volume_agent(
    state: &ApiState,
    app: &str,
    id: &str,
) -> Result<Arc<dyn AgentApi>, PlacementError> {
    let rec: Option<VolumeRecord> = match read_record(state.store(), &volume_key(app, id)).await {
        Ok(r) => r,
        // An id no catalog key can hold names no volume.
        Err(crate::auth::AuthError::Store(aloft_store::StoreError::InvalidKey { .. })) => {
            return Err(PlacementError::NoVolume(id.to_string()));
        }
        Err(e) => return Err(PlacementError::Catalog(e.to_string())),
    };
    if let Some(a) = rec.and_then(|r| state.agent(&r.host)) {
        return Ok(a);
    }
    for a in state.agents() {
        match a.get_volume(app, id).await {
            Ok(_) => return Ok(a.clone()),
            Err(AgentError::NotFound { .. }) => {}
            Err(source) => {
                return Err(PlacementError::Agent {
                    host: a.host_id().to_string(),
                    source,
                });
            }
        }
    }
    Err(PlacementError::NoVolume(id.to_string()))
}

/// Chooses the agent for a new machine of `app`.
pub async fn place_machine(
    state: &ApiState,
    app: &str,
    region: Option<&str>,
    config: &MachineConfig,
) -> Result<Arc<dyn AgentApi>, PlacementError> {
    let region = region.filter(|r| !r.is_empty());
    if let Some(vol) = config.mounts.iter().find(|m| !m.volume.is_empty()) {
        let agent = volume_agent(state, app, &vol.volume).await?;
        if let Some(r) = region
            && agent.region() != r
        {
            return Err(PlacementError::VolumeRegion {
                volume: vol.volume.clone(),
                volume_region: agent.region().to_string(),
                region: r.to_string(),
            });
        }
        return Ok(agent);
    }
    pick(state, app, region, memory_mb(config), true).await
}

/// Chooses the agent for a new volume of `app` (spread like machines, no memory need).
pub async fn place_volume(
    state: &ApiState,
    app: &str,
    region: Option<&str>,
) -> Result<Arc<dyn AgentApi>, PlacementError> {
    pick(state, app, region.filter(|r| !r.is_empty()), 0, false).await
}

async fn pick(
    state: &ApiState,
    app: &str,
    region: Option<&str>,
    needed_mb: u64,
    count_machines: bool,
) -> Result<Arc<dyn AgentApi>, PlacementError> {
    if state.agents().is_empty() {
        return Err(PlacementError::NoAgents);
    }
    let in_region: Vec<&Arc<dyn AgentApi>> = state
        .agents()
        .iter()
        .filter(|a| region.is_none_or(|r| a.region() == r))
        .collect();
    if in_region.is_empty() {
        return Err(PlacementError::UnknownRegion(
            region.unwrap_or_default().to_string(),
        ));
    }
    let hosts = host_records(state).await?;
    let mut best: Option<(usize, i64, &Arc<dyn AgentApi>)> = None;
    for a in in_region {
        let free = match hosts.get(a.host_id()) {
            Some(h) => h.memory_mb_total as i64 - h.memory_mb_committed as i64,
            None => i64::MAX,
        };
        if free < needed_mb as i64 {
            continue;
        }
        let load = if count_machines {
            match a.list_machines(app).await {
                Ok(ms) => ms
                    .iter()
                    .filter(|m| m.state != MachineState::Destroyed)
                    .count(),
                Err(source) => {
                    tracing::warn!(host = a.host_id(), error = %source, "placement: host skipped");
                    continue;
                }
            }
        } else {
            match a.list_volumes(app).await {
                Ok(vs) => vs.len(),
                Err(source) => {
                    tracing::warn!(host = a.host_id(), error = %source, "placement: host skipped");
                    continue;
                }
            }
        };
        let better = match &best {
            None => true,
            Some((bl, bf, _)) => load < *bl || (load == *bl && free > *bf),
        };
        if better {
            best = Some((load, free, a));
        }
    }
    best.map(|(_, _, a)| a.clone())
        .ok_or_else(|| PlacementError::NoCapacity {
            scope: region.map_or("any region".to_string(), |r| format!("region {r}")),
            needed_mb,
        })
}
