//! Running `nft` and `ip`.
//!
//! A child process starts in the network namespace of the thread that
//! spawns it, so both tools act on the namespace the calling thread is in:
//! the node's, or a pod's inside `PodNetns::run_in`.

use std::io::Write as _;
use std::process::{Command, Stdio};

use super::CaptureError;

/// Runs `program` with `args`, feeding `stdin` (if any) to it, and returns
/// what it printed. Fails with the command, its exit status and its stderr
/// when it does not succeed; `operation` says what it was for.
pub(super) fn run(
    operation: &str,
    program: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, CaptureError> {
    let command_line = || format!("{program} {}", args.join(" "));
    tracing::debug!(command = command_line(), stdin, "{operation}");
    let start_error = |source| CaptureError::Start {
        operation: operation.to_owned(),
        program,
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(start_error)?;
    if let Some(input) = stdin {
        // Dropping the pipe at the end of this block closes the child's stdin.
        if let Some(mut pipe) = child.stdin.take() {
            // A child that exits early breaks the pipe; its status and
            // stderr below tell why, so a write error adds nothing.
            let _ = pipe.write_all(input.as_bytes());
        }
    }
    let output = child.wait_with_output().map_err(start_error)?;
    if !output.status.success() {
        return Err(CaptureError::Command {
            operation: operation.to_owned(),
            command: command_line(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
