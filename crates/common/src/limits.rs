//! Process limits. A gateway holds one socket per connected device, so the soft limit on
//! open files (often 1,024) would cap it long before memory or CPU does; the hard limit is
//! what an administrator granted, and a process may raise its soft limit up to it.

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit
/// (the unchanged one if it could not be raised).
///
/// # Errors
/// When the limit cannot be read or set.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; the soft limit does not exceed the hard one.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_the_open_files_limit_reaches_the_hard_limit() {
        let soft = raise_open_files_limit().expect("rlimit readable");
        assert!(soft > 0);
        assert_eq!(raise_open_files_limit().expect("idempotent"), soft);
    }
}
