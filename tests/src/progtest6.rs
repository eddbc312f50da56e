//! IPv6 frames for the `BPF_PROG_TEST_RUN` tests (`progtest` has the IPv4 ones): TCP and
//! UDP with correct checksums, and their checks after the programs rewrote them.
use std::net::{Ipv6Addr, SocketAddrV6};

use proxy_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::progtest::{checksum, sctp_packet, tcp_header, udp_datagram};

const IP6_HLEN: usize = 40;
const L4: usize = 14 + IP6_HLEN;

/// An Ethernet frame carrying an IPv6 TCP segment with `flags` (checksum correct).
#[must_use]
pub fn tcp6(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Vec<u8> {
    let l4 = tcp_header(src.port(), dst.port(), flags);
    frame6(src.ip(), dst.ip(), PROTO_TCP, l4, 16)
}

/// An Ethernet frame carrying an IPv6 UDP datagram (checksum correct: IPv6 needs one).
#[must_use]
pub fn udp6(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let l4 = udp_datagram(src.port(), dst.port(), payload);
    frame6(src.ip(), dst.ip(), PROTO_UDP, l4, 6)
}

/// An Ethernet frame carrying an IPv6 SCTP packet (see `progtest::sctp_crc`).
#[must_use]
pub fn sctp6(src: SocketAddrV6, dst: SocketAddrV6, chunk_type: u8, crc: bool) -> Vec<u8> {
    let l4 = sctp_packet(src.port(), dst.port(), chunk_type, crc);
    frame6(src.ip(), dst.ip(), PROTO_SCTP, l4, usize::MAX)
}

fn frame6(src: &Ipv6Addr, dst: &Ipv6Addr, proto: u8, mut l4: Vec<u8>, csum_at: usize) -> Vec<u8> {
    let mut ip = vec![0u8; IP6_HLEN];
    ip[0] = 0x60;
    let payload = u16::try_from(l4.len()).expect("length");
    ip[4..6].copy_from_slice(&payload.to_be_bytes());
    ip[6] = proto;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    if csum_at != usize::MAX {
        let sum = checksum(&[pseudo_header(&ip, l4.len()), l4.clone()].concat());
        l4[csum_at..csum_at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd];
    frame.extend(ip);
    frame.extend(l4);
    frame
}

fn pseudo_header(ip: &[u8], l4_len: usize) -> Vec<u8> {
    let mut pseudo = ip[8..40].to_vec();
    pseudo.extend(u32::try_from(l4_len).expect("length").to_be_bytes());
    pseudo.extend([0, 0, 0, ip[6]]);
    pseudo
}

/// Source and destination of a frame built by [`tcp6`] or [`udp6`].
#[must_use]
pub fn endpoints6(frame: &[u8]) -> (SocketAddrV6, SocketAddrV6) {
    let address = |at: usize| {
        let octets: [u8; 16] = frame[14 + at..14 + at + 16].try_into().expect("16 bytes");
        Ipv6Addr::from(octets)
    };
    let port = |at: usize| u16::from_be_bytes([frame[L4 + at], frame[L4 + at + 1]]);
    (
        SocketAddrV6::new(address(8), port(0), 0, 0),
        SocketAddrV6::new(address(24), port(2), 0, 0),
    )
}

/// Whether the TCP or UDP checksum of an IPv6 frame verifies (and is not absent).
#[must_use]
pub fn checksum6_valid(frame: &[u8]) -> bool {
    let ip = &frame[14..L4];
    let l4 = &frame[L4..];
    let field = if ip[6] == PROTO_TCP { 16 } else { 6 };
    let present = l4[field..field + 2] != [0, 0];
    present && checksum(&[pseudo_header(ip, l4.len()), l4.to_vec()].concat()) == 0
}
