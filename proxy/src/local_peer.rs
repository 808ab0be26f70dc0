//! Who is on the other end of a connection to the admin socket, and whether
//! it may change the proxy. The kernel says which process connected
//! (`SO_PEERCRED`: its pid and uid, which the process cannot forge); it may
//! change the proxy if it runs as the proxy's user and in the proxy's own
//! mount namespace, that is inside the proxy's container (`kubectl exec`).
//! Being root on the node is not enough: a root hostNetwork container, or
//! a process that reaches the socket through `/proc/<pid>/root`, runs in
//! another mount namespace. (A process that can enter the proxy's mount
//! namespace, with CAP_SYS_ADMIN and the host's PIDs, can do anything the
//! proxy can anyway. The pid is read after the connection was made; a
//! caller that exits and has its pid reused by a process of the proxy's
//! container in between would pass: SO_PEERPIDFD would close that gap.)

use std::os::fd::AsFd;

/// The caller's pid and uid if it may change the proxy; why not otherwise.
pub(crate) fn check(stream: &impl AsFd) -> Result<(i32, u32), String> {
    let credentials =
        nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(|e| format!("refused: the kernel did not say who is calling: {e}"))?;
    let (pid, uid) = (credentials.pid(), credentials.uid());
    let own = nix::unistd::geteuid().as_raw();
    if uid != own {
        return Err(format!(
            "refused: only uid {own} may change the proxy; pid {pid} runs as uid {uid}"
        ));
    }
    let namespace = |pid: &str| {
        std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .map_err(|e| format!("refused: cannot read the mount namespace of pid {pid}: {e}"))
    };
    if namespace(&pid.to_string())? != namespace("self")? {
        return Err(format!(
            "refused: pid {pid} is not in the proxy's container (another mount namespace)"
        ));
    }
    Ok((pid, uid))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

    use super::*;

    #[test]
    fn this_process_may_call_itself() {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (pid, _) = check(&ours).unwrap();
        assert_eq!(pid, i32::try_from(std::process::id()).unwrap());
    }
}
