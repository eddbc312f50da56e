//! `sock_diag` over netlink (what `ss -K` uses): lists a network namespace's connected
//! UDP sockets and destroys one, so a socket the socket LB sent to a backend that has
//! since left its Service fails with ECONNABORTED and its owner reconnects afresh.
use std::net::SocketAddr;

use netlink_packet_sock_diag::{
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagDestroy, SockDiagMessage, AF_INET, AF_INET6, IPPROTO_UDP,
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use crate::netlink::{unmapped, Netlink, NetlinkError, NLM_F_ACK};

/// One socket as `sock_diag` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    family: u8,
    /// The socket as the kernel identified it, handed back to name the one to destroy.
    id: SocketId,
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
        Netlink::open(NETLINK_SOCK_DIAG).map(Self)
    }

    /// Every connected UDP socket of both families.
    ///
    /// # Errors
    /// On socket errors or messages that cannot be read.
    pub fn connected_udp(&mut self) -> Result<Vec<DiagSocket>, NetlinkError> {
        let mut out = Vec::new();
        for (family, id) in [
            (AF_INET, SocketId::new_v4()),
            (AF_INET6, SocketId::new_v6()),
        ] {
            let request = request(family, StateFlags::ESTABLISHED, id);
            out.extend(self.0.dump(&request)?.iter().filter_map(socket_of));
        }
        Ok(out)
    }

    /// Destroys one socket: its owner's next call fails with ECONNABORTED. A socket
    /// already gone (closed, or its cookie taken by another) is not an error.
    ///
    /// # Errors
    /// On socket errors or a refusal other than "no such socket".
    pub fn destroy(&mut self, socket: &DiagSocket) -> Result<(), NetlinkError> {
        let request =
            SockDiagDestroy::new(request(socket.family, StateFlags::all(), socket.id.clone()));
        match self.0.request(&request, NLM_F_ACK) {
            Err(error) if error.is_not_found() => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

/// The request for UDP sockets of `family` in `states`, or the one named by `id`.
fn request(family: u8, states: StateFlags, id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states,
        socket_id: id,
    })
}

/// One dump message as a socket; `None` for anything but an inet socket.
#[must_use]
pub fn socket_of(message: &SockDiagMessage) -> Option<DiagSocket> {
    let SockDiagMessage::InetResponse(response) = message else {
        return None;
    };
    let header = &response.header;
    let id = &header.socket_id;
    // The kernel splits the 64-bit cookie into two native words, low word first.
    let word = |at: usize| {
        u64::from(u32::from_ne_bytes([
            id.cookie[at],
            id.cookie[at + 1],
            id.cookie[at + 2],
            id.cookie[at + 3],
        ]))
    };
    Some(DiagSocket {
        family: header.family,
        id: id.clone(),
        local: SocketAddr::new(unmapped(id.source_address, true), id.source_port),
        peer: SocketAddr::new(unmapped(id.destination_address, true), id.destination_port),
        cookie: word(4) << 32 | word(0),
    })
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use netlink_packet_core::ParseableParametrized;
    use netlink_packet_sock_diag::{SockDiagMessage, AF_INET6, SOCK_DIAG_BY_FAMILY};

    use super::{socket_of, SockDiag};

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
        msg.resize(72, 0);
        let message = SockDiagMessage::parse_with_param(&msg, SOCK_DIAG_BY_FAMILY).unwrap();
        let socket = socket_of(&message).unwrap();
        assert_eq!(socket.local, "[fd00::1]:40000".parse().unwrap());
        assert_eq!(socket.peer, "10.96.0.10:53".parse().unwrap());
        assert_eq!(socket.cookie, 1 << 32 | 7);
        assert!(SockDiagMessage::parse_with_param(&msg[..71], SOCK_DIAG_BY_FAMILY).is_err());
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
