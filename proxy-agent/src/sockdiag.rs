//! `sock_diag` over netlink (what `ss -K` uses): lists a network namespace's connected
//! UDP sockets and destroys one, so a socket the socket LB sent to a backend that has
//! since left its Service fails with ECONNABORTED and its owner reconnects afresh.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use crate::netlink::{Netlink, NetlinkError, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_UDP: u8 = 17;
/// `TCP_ESTABLISHED`, the state of a connected UDP socket.
const ESTABLISHED: u32 = 1;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_msg`: family, state, timer, retrans, the sockid, then five words.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// One socket as `sock_diag` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    family: u8,
    /// The raw `inet_diag_sockid`, handed back to identify the socket to destroy.
    id: [u8; SOCKID_LEN],
    pub local: SocketAddr,
    /// The connected peer; an IPv4-mapped peer of an IPv6 socket reads as IPv4.
    pub peer: SocketAddr,
    pub cookie: u64,
}

/// A `sock_diag` socket in the network namespace of the thread that opened it.
pub struct SockDiag(Netlink);

impl SockDiag {
    /// Opens the socket.
    ///
    /// # Errors
    /// When netlink is unavailable.
    pub fn open() -> Result<Self, NetlinkError> {
        Netlink::open(NETLINK_SOCK_DIAG, 0).map(Self)
    }

    /// Every connected UDP socket of both families.
    ///
    /// # Errors
    /// On socket errors or messages that cannot be read.
    pub fn connected_udp(&mut self) -> Result<Vec<DiagSocket>, NetlinkError> {
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            let request = request(family, 1 << ESTABLISHED, &[0; SOCKID_LEN]);
            self.0.send(
                SOCK_DIAG_BY_FAMILY,
                NLM_F_REQUEST | NLM_F_DUMP,
                &request,
                &[],
            )?;
            self.0.receive(|kind, body| {
                if kind == SOCK_DIAG_BY_FAMILY {
                    out.extend(parse(body));
                }
            })?;
        }
        Ok(out)
    }

    /// Destroys one socket: its owner's next call fails with ECONNABORTED. A socket
    /// already gone (closed, or its cookie taken by another) is not an error.
    ///
    /// # Errors
    /// On socket errors or a refusal other than "no such socket".
    pub fn destroy(&mut self, socket: &DiagSocket) -> Result<(), NetlinkError> {
        let request = request(socket.family, u32::MAX, &socket.id);
        self.0
            .send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &request, &[])?;
        match self.0.receive(|_, _| {}) {
            Err(NetlinkError::Kernel(-2)) => Ok(()),
            other => other,
        }
    }
}

/// `struct inet_diag_req_v2` for UDP sockets of `family` in `states`.
fn request(family: u8, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let mut r = vec![family, IPPROTO_UDP, 0, 0];
    r.extend(states.to_ne_bytes());
    r.extend(id);
    r
}

/// One `inet_diag_msg`; `None` for a short message or an unknown family.
#[must_use]
pub fn parse(msg: &[u8]) -> Option<DiagSocket> {
    let msg = msg.get(..MSG_LEN)?;
    let family = msg[0];
    let id: [u8; SOCKID_LEN] = msg[4..4 + SOCKID_LEN].try_into().ok()?;
    let port = |at: usize| u16::from_be_bytes([id[at], id[at + 1]]);
    let addr = |at: usize| -> Option<IpAddr> {
        let raw: [u8; 16] = id[at..at + 16].try_into().ok()?;
        match family {
            AF_INET => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
            AF_INET6 => {
                let v6 = Ipv6Addr::from(raw);
                Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
            }
            _ => None,
        }
    };
    let cookie = [&id[40..44], &id[44..48]]
        .map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
        .into_iter()
        .rev()
        .fold(0u64, |acc, w| acc << 32 | u64::from(w));
    Some(DiagSocket {
        family,
        id,
        local: SocketAddr::new(addr(4)?, port(0)),
        peer: SocketAddr::new(addr(20)?, port(2)),
        cookie,
    })
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::{parse, SockDiag, AF_INET6, MSG_LEN};

    #[test]
    fn messages_read_addresses_ports_and_the_cookie() {
        let mut msg = vec![AF_INET6, 1, 0, 0];
        msg.extend(40000u16.to_be_bytes());
        msg.extend(53u16.to_be_bytes());
        msg.extend("fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        msg.extend(
            "::ffff:10.96.0.10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        msg.extend(0u32.to_ne_bytes());
        // The kernel splits the 64-bit cookie into two words, low word first.
        msg.extend(7u32.to_ne_bytes());
        msg.extend(1u32.to_ne_bytes());
        msg.resize(MSG_LEN, 0);
        let socket = parse(&msg).unwrap();
        assert_eq!(socket.local, "[fd00::1]:40000".parse().unwrap());
        assert_eq!(socket.peer, "10.96.0.10:53".parse().unwrap());
        assert_eq!(socket.cookie, 1 << 32 | 7);
        assert_eq!(parse(&msg[..MSG_LEN - 1]), None);
    }

    /// Against this kernel: a connected loopback UDP socket is listed and, once
    /// destroyed, fails its pending receive with ECONNABORTED and is no longer
    /// connected; an unconnected one is not listed.
    #[test]
    fn a_destroyed_connected_socket_fails_with_connection_aborted() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let loose = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        client.send(b"before").unwrap();
        let mut diag = SockDiag::open().unwrap();
        let sockets = diag.connected_udp().unwrap();
        assert!(sockets
            .iter()
            .all(|s| s.local != loose.local_addr().unwrap()));
        let ours = sockets
            .iter()
            .find(|s| s.local == client.local_addr().unwrap())
            .expect("the connected socket is listed");
        assert_eq!(ours.peer, server.local_addr().unwrap());
        assert_ne!(ours.cookie, 0);
        diag.destroy(ours).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let error = client.recv(&mut [0; 16]).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(103), "{error}");
        let error = client.send(b"after").unwrap_err();
        assert_eq!(error.raw_os_error(), Some(89), "{error}");
        // Destroying it again finds nothing, which is fine.
        diag.destroy(ours).unwrap();
    }
}
