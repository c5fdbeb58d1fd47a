//! The hub's TCP listeners, bound here rather than by zmq.rs.
//!
//! zmq.rs binds through the standard library, whose `listen(2)` backlog is
//! 128. In a registration storm every engine opens six connections to the
//! hub at once; once a listener's accept queue holds 128 connections the
//! kernel drops the next SYNs (`ListenOverflows` in `nstat`), and a dropped
//! SYN is retried only after Linux's 1 s initial retransmission timeout — so
//! 200 engines took ~1.1 s to register instead of ~0.2 s, and 1000 took
//! ~1.4 s. The hub binds its listeners itself with [`ACCEPT_BACKLOG`] (the
//! kernel caps it at `net.core.somaxconn`, 4096 by default since Linux 5.4)
//! and hands them to zmq.rs's `bind_listener`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, ToSocketAddrs};

use socket2::{Domain, Protocol, Socket, Type};

/// The accept backlog asked of the kernel for every hub listener.
pub const ACCEPT_BACKLOG: i32 = 4096;

/// The address `--ip` names: an IPv4 or IPv6 address (bracketed or not),
/// `*` (libzmq's and ipcontroller's spelling of every interface), or a host
/// name, resolved here (its first address).
pub fn resolve(ip: &str) -> io::Result<IpAddr> {
    if ip == "*" {
        return Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
    let bare = ip
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(ip);
    if let Ok(addr) = bare.parse::<IpAddr>() {
        return Ok(addr);
    }
    let mut found = (bare, 0).to_socket_addrs()?;
    found.next().map(|a| a.ip()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{ip}: the name resolves to no address"),
        )
    })
}

/// A TCP listener on `addr` with SO_REUSEADDR (as libzmq and the standard
/// library set it: a restarted hub rebinds its ports while the old
/// connections are in TIME_WAIT) and an accept backlog of
/// [`ACCEPT_BACKLOG`].
pub fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(ACCEPT_BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_what_ip_accepts() {
        assert_eq!(resolve("127.0.0.1").unwrap(), Ipv4Addr::LOCALHOST);
        assert_eq!(resolve("*").unwrap(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(resolve("::1").unwrap(), std::net::Ipv6Addr::LOCALHOST);
        assert_eq!(resolve("[::1]").unwrap(), std::net::Ipv6Addr::LOCALHOST);
        assert!(resolve("localhost").unwrap().is_loopback());
        assert!(resolve("no-such-host.invalid").is_err());
    }

    /// 300 connections complete their handshake with nobody accepting
    /// them: each waits in the accept queue. With the standard library's
    /// backlog of 128 the 130th SYN is dropped and its connect times out.
    /// (Needs `net.core.somaxconn` ≥ 300; Linux's default is 4096.)
    #[test]
    fn accept_queue_holds_a_storm() {
        let listener = tcp_listener(SocketAddr::new(resolve("127.0.0.1").unwrap(), 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for i in 0..300 {
            match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(700))
            {
                Ok(s) => held.push(s),
                Err(e) => panic!("connection {i} not queued ({e}); somaxconn too low?"),
            }
        }
        assert_eq!(held.len(), 300);
    }
}
