//! Signals and liveness of agent process groups, and the host name: the few calls into
//! libc the launcher needs. Every agent is spawned as the leader of its own process group
//! (`process_group(0)`, no `pre_exec`), so its pid is also its group id and one signal
//! reaches everything it started.

// `kill`, `killpg` and `gethostname` are foreign functions: calling them is `unsafe` in
// Rust even though they take plain integers and a buffer we own.
#![allow(unsafe_code)]

use std::io;

/// A signal the launcher sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

impl Signal {
    fn raw(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
        }
    }
}

/// Sends `signal` to the process group `pgid`. A group that is already gone is not an
/// error (`Ok(false)`); `Ok(true)` means the signal was delivered to someone.
pub fn signal_group(pgid: i32, signal: Signal) -> io::Result<bool> {
    if pgid <= 1 {
        // 0 and 1 would name our own group or init: never.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal process group {pgid}"),
        ));
    }
    // SAFETY: killpg takes two integers and touches no memory of ours; pgid > 1 was
    // checked above so it can never address our own group (0) or every process (-1).
    let rc = unsafe { libc::killpg(pgid, signal.raw()) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Returns whether any process of group `pgid` still exists (zombies included: a group
/// whose leader was not reaped yet still counts as alive).
pub fn group_alive(pgid: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission; no memory is touched.
    let rc = unsafe { libc::kill(-pgid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Returns whether the process `pid` exists.
pub fn process_alive(pid: i32) -> bool {
    if pid <= 1 {
        return false;
    }
    // SAFETY: as above, signal 0 is an existence check.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Kills this process with SIGKILL: no destructor, no flush, no graceful anything — what
/// the OOM killer or `kill -9` does. Only the fault tests' failpoint calls it.
pub fn sigkill_self() -> ! {
    // SAFETY: getpid and kill take and return integers; no memory is touched. A signal
    // sent to our own pid is delivered before kill returns.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // Unreachable once the signal is delivered; abort is the next closest thing.
    std::process::abort()
}

/// This machine's host name (`localhost` when it cannot be read).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is ours, writable, and its length is passed; gethostname writes
    // at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_owned();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_owned();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_group_and_init_are_refused() {
        assert!(signal_group(0, Signal::Term).is_err());
        assert!(signal_group(1, Signal::Kill).is_err());
        assert!(!group_alive(0));
    }

    #[test]
    fn a_gone_group_is_not_an_error() {
        // pid_max is at most 2^22 on Linux: this group cannot exist.
        assert!(!signal_group(i32::MAX - 7, Signal::Term).expect("esrch"));
        assert!(!group_alive(i32::MAX - 7));
        assert!(process_alive(std::process::id() as i32));
    }

    #[test]
    fn the_host_has_a_name() {
        assert!(!hostname().is_empty());
    }
}
