//! Threads that keep the cluster's state (source, sync, DNS zone) run at a lower CPU
//! priority than the runtime that answers DNS, `/healthz` and `/metrics`: on a busy
//! node a burst of changes then waits for a query, not the other way round.

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
