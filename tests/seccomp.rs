//! The fallback the way a container does it: `ringsocket serve` started under a
//! seccomp filter that denies the three io_uring system calls with EPERM, as Docker's
//! default profile (Engine 25.0 and later) and containerd 2.0's `RuntimeDefault` do.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const IO_URING_SETUP: u32 = 425;
const IO_URING_ENTER: u32 = 426;
const IO_URING_REGISTER: u32 = 427;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// A classic BPF program for seccomp: io_uring_setup, io_uring_enter and
/// io_uring_register fail with EPERM, everything else is allowed.
fn deny_io_uring() -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const RET_ALLOW: u32 = 0x7fff_0000; // SECCOMP_RET_ALLOW
    const RET_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32; // SECCOMP_RET_ERRNO
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    vec![
        // struct seccomp_data: nr at offset 0, arch at offset 4.
        op(LD_W_ABS, 0, 0, 4),
        op(JEQ_K, 0, 5, AUDIT_ARCH),
        op(LD_W_ABS, 0, 0, 0),
        op(JEQ_K, 2, 0, IO_URING_SETUP),
        op(JEQ_K, 1, 0, IO_URING_ENTER),
        op(JEQ_K, 0, 1, IO_URING_REGISTER),
        op(RET_K, 0, 0, RET_EPERM),
        op(RET_K, 0, 0, RET_ALLOW),
    ]
}

/// `ringsocket serve ARGS` in a child under the filter, with stdout and stderr piped.
fn serve_without_io_uring(args: &[&str]) -> Child {
    let filter = deny_io_uring();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ringsocket"));
    for (key, _) in std::env::vars() {
        if key.starts_with("RINGSOCKET_") {
            command.env_remove(key);
        }
    }
    command
        .arg("serve")
        .args(args)
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and makes only two
    // prctl calls (async-signal-safe) on memory prepared before the fork: `filter`
    // and the `sock_fprog` pointing to it, both alive until exec replaces the image.
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog {
                len: filter.len() as libc::c_ushort,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &raw const program,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().expect("the binary starts under the filter")
}

/// Under the filter, `serve` with no flags falls back to epoll, says so once, serves a
/// WebSocket echo and reports the backend in `/metrics`.
#[tokio::test]
async fn serve_falls_back_to_epoll_where_io_uring_is_denied() {
    let mut child = serve_without_io_uring(&["--bind", "127.0.0.1:0", "--workers", "1"]);
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("the listening line");
    assert!(line.contains("listening on 127.0.0.1:"), "{line:?}");
    assert!(
        line.contains("(epoll backend)"),
        "the listening line names the backend: {line:?}"
    );
    let addr = line
        .split("ws://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("an address in the listening line")
        .to_owned();

    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(format!("ws://{addr}/echo")),
    )
    .await
    .expect("connects in time")
    .expect("the upgrade");
    ws.send(Message::text("through epoll")).await.expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo in time")
        .expect("a message")
        .expect("no error");
    assert_eq!(echoed, Message::text("through epoll"));
    ws.close(None).await.expect("close");

    let metrics = common::http_exchange(
        addr.parse().expect("a socket address"),
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        metrics.contains("ringsocket_info{io_backend=\"epoll\"} 1"),
        "{metrics}"
    );

    // SAFETY: kill(2) on our own child's pid, with a valid signal number.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{status:?}");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("running on the epoll backend"))
        .collect();
    assert_eq!(warnings.len(), 1, "one WARN for the fallback:\n{stderr}");
    assert!(warnings[0].contains("WARN"), "{stderr}");
    assert!(
        warnings[0].contains("Operation not permitted") && warnings[0].contains("seccomp"),
        "names the cause and the fix: {stderr}"
    );
}

/// Under the filter, `--io-backend io_uring` refuses to start: exit 1 with the cause.
#[test]
fn io_uring_required_where_it_is_denied_exits_1_with_the_cause() {
    let child = serve_without_io_uring(&["--bind", "127.0.0.1:0", "--io-backend", "io_uring"]);
    let output = child.wait_with_output().expect("wait");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("io_uring is not available") && stderr.contains("Operation not permitted"),
        "{stderr}"
    );
}
