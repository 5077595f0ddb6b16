//! Listening sockets: one per worker, all bound to the same address with
//! `SO_REUSEPORT`, so the kernel spreads new connections over the workers.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// The listen backlog of each worker's socket.
pub const BACKLOG: i32 = 4096;

/// Binds a `SO_REUSEPORT` listener on `addr`.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Binds `n` listeners on `addr`. When `addr` has port 0 the first listener picks the
/// port and the others join it.
pub fn bind_all(addr: SocketAddr, n: usize) -> io::Result<(Vec<TcpListener>, SocketAddr)> {
    let first = bind_reuseport(addr)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(bind_reuseport(bound)?);
    }
    Ok((listeners, bound))
}
