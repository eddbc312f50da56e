//! The kernel programs' debug records (aya-log: failed map inserts, packets that could
//! not be rewritten), read only when the agent logs at debug level. Otherwise the
//! programs load with their log level at off, a constant the verifier prunes on, so the
//! records cost nothing per packet.
use std::os::fd::AsFd;

use aya::{Ebpf, EbpfLoader};
use aya_log::{EbpfLogger, Level};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, info, warn};

/// The tracing target kernel records are logged under (`RUST_LOG=kernel=debug`).
pub const TARGET: &str = "kernel";
/// The global aya-log-ebpf reads its level from.
const LEVEL_GLOBAL: &str = "AYA_LOG_LEVEL";

/// Whether kernel records are wanted: debug logging on for [`TARGET`] (`-v`).
#[must_use]
pub fn wanted() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::DEBUG)
}

/// Sets the programs' log level before they load: debug when wanted, else off.
pub fn set_level(loader: &mut EbpfLoader<'_>) {
    static DEBUG: u8 = Level::Debug as u8;
    static OFF: u8 = 0;
    let level = if wanted() { &DEBUG } else { &OFF };
    loader.override_global(LEVEL_GLOBAL, level, true);
}

/// Hands each record to tracing, at debug level under [`TARGET`].
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        debug!(target: TARGET, program = record.module_path().unwrap_or("-"), "{}", record.args());
    }

    fn flush(&self) {}
}

/// Starts reading the programs' records on a thread of its own, when wanted.
pub fn follow(ebpf: &mut Ebpf) {
    if !wanted() {
        return;
    }
    let mut logger = match EbpfLogger::init_with_logger(ebpf, Forward) {
        Ok(logger) => logger,
        Err(error) => {
            warn!(%error, "cannot read the kernel programs' debug records");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("kernel-log".into())
        .spawn(move || loop {
            let mut fds = [PollFd::new(logger.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::NONE).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            logger.flush();
        });
    match spawned {
        Ok(_) => info!(target = TARGET, "kernel programs' debug records followed"),
        Err(error) => warn!(%error, "cannot start reading the kernel programs' debug records"),
    }
}
