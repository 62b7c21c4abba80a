//! The Machines API (Fly's `/v1` REST surface): apps, machines, volumes, secrets,
//! certificates, tokens, placement and deploy orchestration, plus its generated
//! OpenAPI document.
//!
//! It owns authorisation and the catalog's desired state. It must not touch VMs:
//! every machine action goes to the owning host's agent.
