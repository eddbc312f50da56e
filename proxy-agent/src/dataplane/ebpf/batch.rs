//! Consecutive writes to one map as one `BPF_MAP_UPDATE_BATCH` syscall rather than one
//! syscall per entry (a full sync at 10 000 Services writes ~220 000 entries); a kernel
//! that refuses the batch gets the entries one by one.
use std::os::fd::{AsFd, AsRawFd};

use aya::{
    maps::{HashMap, IterableMap, MapData, MapError},
    Pod,
};

const BPF_MAP_UPDATE_BATCH: i64 = 26;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `keys[i]` → `values[i]` into `map` in one syscall.
#[allow(
    unsafe_code,
    reason = "aya 0.14 has no batched map update; this is the bpf() call"
)]
fn update_batch<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> std::io::Result<()> {
    let count = u32::try_from(keys.len().min(values.len()))
        .map_err(|_| std::io::Error::from_raw_os_error(nix::libc::E2BIG))?;
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: u32::try_from(map.fd().as_fd().as_raw_fd()).unwrap_or(u32::MAX),
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for BPF_MAP_UPDATE_BATCH; `keys` and
    // `values` hold `count` entries of exactly the map's key and value sizes (aya checked
    // them when it typed the map) and outlive the call; the kernel only reads them and
    // writes `attr.count`.
    let rc = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Entries waiting for one map.
pub struct Buffered<K, V> {
    keys: Vec<K>,
    values: Vec<V>,
}

impl<K, V> Default for Buffered<K, V> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl<K: Pod, V: Pod> Buffered<K, V> {
    pub fn push(&mut self, key: K, value: V) {
        self.keys.push(key);
        self.values.push(value);
    }

    /// Writes what waits into `map`, emptying the buffer: one batch, or entry by entry
    /// (reporting the first failure) when the batch is refused.
    pub fn flush(&mut self, map: &mut HashMap<MapData, K, V>) -> Result<(), MapError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let batched = update_batch(map.map(), &self.keys, &self.values);
        let result = match batched {
            Ok(()) => Ok(()),
            Err(_) => self
                .keys
                .iter()
                .zip(&self.values)
                .try_for_each(|(key, value)| map.insert(key, value, 0)),
        };
        self.keys.clear();
        self.values.clear();
        result
    }
}
