//! Threads that keep the cluster's state (source, sync, DNS zone) run off the runtime
//! that answers DNS, `/healthz` and `/metrics`, on runtimes of their own, and at a
//! lower CPU priority: on a busy node a burst of changes then waits for a query, not
//! the other way round.
use std::future::Future;

use tokio::sync::oneshot;

/// The nice value of background threads (the answering threads keep 0).
const NICE: i32 = 10;
/// The scheduler slice of background threads: longer than any default slice (0.75 ms
/// times 1 + log2 of the CPUs, at most 3 ms), so that a normal thread waking up
/// preempts one mid-slice instead of waiting for its slice to end.
const BACKGROUND_SLICE_NS: u64 = 4_000_000;
/// The scheduler slice of threads that answer queries.
const ANSWERING_SLICE_NS: u64 = 100_000;

/// Sets the calling thread's fair-class policy, nice value and slice (the slice is
/// Linux 6.12+ EEVDF's, ignored by older kernels).
fn schedule(policy: i32, nice: i32, slice_ns: u64) -> std::io::Result<()> {
    let attr = libc::sched_attr {
        size: u32::try_from(std::mem::size_of::<libc::sched_attr>()).unwrap_or(u32::MAX),
        sched_policy: u32::try_from(policy).unwrap_or_default(),
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: slice_ns,
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
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes the calling thread a background one: `SCHED_BATCH` (its wake-ups never
/// preempt another thread), a lower priority and a long slice (other threads' wake-ups
/// preempt it). A failure is logged and ignored.
pub fn lower_priority() {
    if let Err(error) = schedule(libc::SCHED_BATCH, NICE, BACKGROUND_SLICE_NS) {
        tracing::debug!(%error, "cannot lower a background thread's priority");
    }
}

/// Marks the calling thread latency-sensitive: a short scheduler slice, so that its
/// wake-up preempts a background thread in the middle of its slice; its share of the
/// CPU is unchanged. A failure is logged and ignored.
pub fn answer_promptly() {
    if let Err(error) = schedule(libc::SCHED_OTHER, 0, ANSWERING_SLICE_NS) {
        tracing::debug!(%error, "cannot shorten an answering thread's slice");
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
            assert_eq!(sched_field("policy"), Some(libc::SCHED_BATCH.to_string()));
            assert_eq!(
                sched_field("se.slice"),
                Some(super::BACKGROUND_SLICE_NS.to_string())
            );
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
        assert_eq!(sched_field("policy"), Some(libc::SCHED_OTHER.to_string()));
    }
}
