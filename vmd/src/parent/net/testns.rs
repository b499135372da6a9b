//! Unit tests' network namespaces: a thread of its own that unshares
//! its network namespace (CLONE_NEWNET applies to the calling thread
//! only), so the taps, bridges and netlink sockets of a test live and
//! die with it and never meet the host's or another test's.

/// Runs `test` in a thread with a new, empty network namespace; panics
/// (the test fails, with the reason) if the namespace cannot be made
/// (this needs root) or if `test` fails.
pub fn in_new_netns<F>(test: F)
where
    F: FnOnce() -> Result<(), String> + Send + 'static,
{
    let outcome = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("cannot make a network namespace (run as root): {e}"))?;
        test()
    })
    .join();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
