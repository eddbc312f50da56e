//! Finding and mounting the filesystems the eBPF dataplane needs: the cgroup v2
//! hierarchy (where socket programs attach) and a bpf filesystem (where maps are pinned).
use std::{
    fs,
    path::{Path, PathBuf},
};

use nix::{
    mount::{mount, MsFlags},
    sys::statfs::statfs,
};
use thiserror::Error;
use tracing::info;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_BPFFS_MOUNT: &str = "/sys/fs/bpf";
const FALLBACK_CGROUP2: &str = "/run/proxy-agent/cgroup2";

#[derive(Debug, Error)]
pub enum SystemError {
    #[error("mounting {fs} at {path} failed: {source}")]
    Mount {
        fs: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0} is not on a bpf filesystem and is not below {DEFAULT_BPFFS_MOUNT}")]
    NotBpffs(PathBuf),
}

/// The first cgroup2 mount in `/proc/mounts`, else one mounted at a private path.
pub fn default_cgroup_root() -> Result<PathBuf, SystemError> {
    let mounts = fs::read_to_string("/proc/mounts")
        .map_err(|e| SystemError::Io("/proc/mounts".into(), e))?;
    if let Some(path) = mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    }) {
        return Ok(path);
    }
    let path = PathBuf::from(FALLBACK_CGROUP2);
    fs::create_dir_all(&path).map_err(|e| SystemError::Io(path.clone(), e))?;
    mount(
        Some("cgroup2"),
        &path,
        Some("cgroup2"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| SystemError::Mount {
        fs: "cgroup2",
        path: path.clone(),
        source,
    })?;
    info!(path = %path.display(), "mounted cgroup2");
    Ok(path)
}

fn on_bpffs(path: &Path) -> bool {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
    statfs(existing).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure `path` is (or will be, once created) on a bpf filesystem, mounting one at
/// `/sys/fs/bpf` when nothing does, then creates the directory.
pub fn ensure_bpffs(path: &Path) -> Result<(), SystemError> {
    if !on_bpffs(path) {
        let mount_point = Path::new(DEFAULT_BPFFS_MOUNT);
        if !path.starts_with(mount_point) {
            return Err(SystemError::NotBpffs(path.to_owned()));
        }
        fs::create_dir_all(mount_point).map_err(|e| SystemError::Io(mount_point.into(), e))?;
        mount(
            Some("bpffs"),
            mount_point,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| SystemError::Mount {
            fs: "bpf",
            path: mount_point.into(),
            source,
        })?;
        info!(path = DEFAULT_BPFFS_MOUNT, "mounted the bpf filesystem");
    }
    fs::create_dir_all(path).map_err(|e| SystemError::Io(path.to_owned(), e))
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`, for deadlines the
/// programs compare against.
#[must_use]
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}
