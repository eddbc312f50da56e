//! Threads that keep the cluster's state (source, sync, DNS zone) run off the runtime
//! that answers DNS, `/healthz` and `/metrics`, on runtimes of their own, and at a
//! lower CPU priority: on a busy node a burst of changes then waits for a query, not
//! the other way round.
use std::future::Future;

use tokio::sync::oneshot;

/// The nice value of background threads (the answering runtime keeps 0).
const NICE: i32 = 10;

/// Lowers the calling thread's CPU priority; a failure is logged and ignored.
pub fn lower_priority() {
    // On Linux, PRIO_PROCESS with `who = 0` names the calling thread only.
    #[allow(
        unsafe_code,
        reason = "setpriority takes integers only and has no memory-safety preconditions; \
                  neither std nor nix has a safe wrapper for a thread's nice value"
    )]
    // SAFETY: plain integer arguments.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower a background thread's priority");
    }
}

/// Runs the future `make` makes on a thread of its own, named `name`, with a
/// single-threaded runtime of its own, at background priority. Returns the future's
/// outcome to wait for.
///
/// # Errors
/// When the runtime or the thread cannot start.
pub fn spawn<M, F>(name: &str, make: M) -> std::io::Result<oneshot::Receiver<F::Output>>
where
    M: FnOnce() -> F + Send + 'static,
    F: Future,
    F::Output: Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            lower_priority();
            let _ = done_tx.send(runtime.block_on(make()));
        })?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    #[test]
    fn lowers_only_the_calling_thread() {
        std::thread::spawn(|| {
            super::lower_priority();
            let nice = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
            // Field 19 of stat is the nice value (after the parenthesised name).
            let after_name = nice.rsplit_once(')').expect("name").1;
            let fields: Vec<&str> = after_name.split_whitespace().collect();
            assert_eq!(fields[16], super::NICE.to_string());
        })
        .join()
        .expect("thread");
        let own = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
        let fields: Vec<&str> = own
            .rsplit_once(')')
            .expect("name")
            .1
            .split_whitespace()
            .collect();
        assert_eq!(fields[16], "0");
    }
}
