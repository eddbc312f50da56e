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

/// The scheduler slice of threads that answer queries (the kernel's default is 0.7-3 ms).
const ANSWERING_SLICE_NS: u64 = 100_000;

/// Marks the calling thread latency-sensitive: a short scheduler slice (Linux 6.12+
/// EEVDF), so that its wake-up preempts a background thread in the middle of its slice
/// instead of waiting for the slice to end; its share of the CPU is unchanged. On older
/// kernels the slice is ignored; a failure is logged and ignored.
pub fn answer_promptly() {
    let attr = libc::sched_attr {
        size: u32::try_from(std::mem::size_of::<libc::sched_attr>()).unwrap_or(u32::MAX),
        sched_policy: u32::try_from(libc::SCHED_OTHER).unwrap_or_default(),
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 0,
        sched_runtime: ANSWERING_SLICE_NS,
        sched_deadline: 0,
        sched_period: 0,
    };
    #[allow(
        unsafe_code,
        reason = "sched_setattr has no wrapper in std, nix or glibc; it reads one struct \
                  that outlives the call"
    )]
    // SAFETY: `attr` is a valid, initialised sched_attr whose size field is its size;
    // pid 0 names the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, std::ptr::from_ref(&attr), 0u32) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot shorten an answering thread's slice");
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
    /// A field of the calling thread's `/proc/thread-self/sched`.
    fn sched_field(name: &str) -> Option<String> {
        let text = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        text.lines()
            .find_map(|line| Some(line.split_once(':')?).filter(|(k, _)| k.trim() == name))
            .map(|(_, v)| v.trim().to_owned())
    }

    #[test]
    fn an_answering_thread_gets_a_short_slice_and_keeps_its_priority() {
        let before = sched_field("se.slice").expect("se.slice");
        let (slice, nice) = std::thread::spawn(|| {
            super::answer_promptly();
            (sched_field("se.slice"), sched_field("prio"))
        })
        .join()
        .expect("thread");
        assert_eq!(slice, Some(super::ANSWERING_SLICE_NS.to_string()));
        assert_eq!(nice, sched_field("prio"), "the priority is unchanged");
        assert_eq!(
            sched_field("se.slice"),
            Some(before),
            "only the calling thread"
        );
    }

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
