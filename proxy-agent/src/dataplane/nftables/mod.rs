//! nftables dataplane: the ruleset of `ruleset.rs` in our own `ip`/`ip6` tables, loaded
//! with `nft -f` as one atomic transaction per sync (tables replaced whole for now;
//! established connections keep their conntrack NAT).
pub mod names;
pub mod ruleset;

use std::{
    io::Write,
    process::{Command, Stdio},
};

use ipnet::IpNet;
use thiserror::Error;

use crate::model::{DesiredState, Plan};

#[derive(Debug, Error)]
pub enum NftError {
    #[error("cannot run nft: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft rejected the ruleset: {0}")]
    Rejected(String),
}

/// Runs `nft -f -` on `text` in the current network namespace.
pub fn load(text: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).map_err(NftError::Spawn)?;
    }
    let output = child.wait_with_output().map_err(NftError::Spawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NftError::Rejected(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

/// Removes our tables.
pub fn cleanup() -> Result<(), NftError> {
    load(&ruleset::removal())
}

pub struct NftablesDataplane {
    cluster_cidrs: Vec<IpNet>,
}

impl NftablesDataplane {
    /// Checks that nftables works here (the `nft` tool and the kernel's `nf_tables`).
    pub fn start(cluster_cidrs: Vec<IpNet>) -> Result<Self, NftError> {
        load(&format!(
            "add table ip {0}\nadd table ip6 {0}\n",
            ruleset::TABLE
        ))?;
        Ok(Self { cluster_cidrs })
    }
}

impl super::Dataplane for NftablesDataplane {
    fn name(&self) -> &'static str {
        "nftables"
    }

    /// Nothing is read back: the first sync replaces our tables whole.
    fn programmed(&mut self) -> Result<DesiredState, super::DataplaneError> {
        Ok(DesiredState::default())
    }

    fn apply(
        &mut self,
        plan: &Plan,
        desired: &DesiredState,
    ) -> Result<usize, super::DataplaneError> {
        if plan.is_empty() {
            return Ok(0);
        }
        let text = ruleset::render(desired, &self.cluster_cidrs);
        load(&text)?;
        Ok(text.lines().count())
    }
}
