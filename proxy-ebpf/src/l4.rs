//! The transport header of a per-packet flow: TCP, UDP and SCTP ports, whether the
//! packet opens or closes its flow, and port rewrites with each protocol's checksum update.
use aya_ebpf::programs::TcContext;
use proxy_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::{crc32c, wire::read};

/// `bpf_l4_csum_replace` flag: a zero UDP checksum (none) stays zero.
const BPF_F_MARK_MANGLED_0: u64 = 0x20;
/// `bpf_skb_store_bytes`: keep a receive-side full checksum (`CHECKSUM_COMPLETE`) right.
const BPF_F_RECOMPUTE_CSUM: u64 = 0x01;
const TCP_FIN_OR_RST: u8 = 0x01 | 0x04;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// SCTP chunk types that start and end an association.
const SCTP_INIT: u8 = 1;
const SCTP_ABORT: u8 = 6;
const SCTP_SHUTDOWN_COMPLETE: u8 = 14;

/// `Packet::flow`: TCP FIN or RST; SCTP ABORT or SHUTDOWN COMPLETE.
pub const CLOSING: u8 = 1;
/// `Packet::flow`: a TCP SYN without ACK or an SCTP INIT, the first packet of a new
/// connection whatever an old flow with the same ports left behind.
pub const OPENING: u8 = 2;

/// The fields of a TCP, UDP or SCTP packet the programs read.
pub struct Packet<A> {
    pub src: A,
    pub dst: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// [`CLOSING`] and [`OPENING`] bits. One `u8`, not `bool`s: a `bool`'s niche would
    /// make `Option<Packet>` a union whose members do not all start at offset 0, BTF the
    /// kernel refuses; and one byte keeps the IPv6 path's stack under the verifier's 512.
    pub flow: u8,
    /// Where the L4 header starts, and its length with the payload (from the IP
    /// header: a short frame's Ethernet padding is not part of it).
    pub l4: usize,
    pub l4_len: u16,
}

impl<A> Packet<A> {
    #[inline(always)]
    pub fn l4_fields(
        ctx: &TcContext,
        (src, dst): (A, A),
        proto: u8,
        l4: usize,
        l4_len: u16,
    ) -> Option<Self> {
        if !matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
            return None;
        }
        // The bounds check the verifier demands: a packet cut short of its ports passes
        // as it came (the kernel drops it later), said in the kernel's debug records.
        let (Some(sport_be), Some(dport_be)) = (read::<u16>(ctx, l4), read::<u16>(ctx, l4 + 2))
        else {
            crate::records::too_short(proto);
            return None;
        };
        let flags = if proto == PROTO_TCP {
            read::<u8>(ctx, l4 + 13)?
        } else {
            0
        };
        let (opening, closing) = match proto {
            PROTO_TCP => (
                flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
                flags & TCP_FIN_OR_RST != 0,
            ),
            PROTO_UDP => (false, false),
            PROTO_SCTP => {
                // The first chunk's type, after the 12-byte common header.
                let chunk: u8 = read(ctx, l4 + 12)?;
                (
                    chunk == SCTP_INIT,
                    chunk == SCTP_ABORT || chunk == SCTP_SHUTDOWN_COMPLETE,
                )
            }
            _ => return None,
        };
        let opening = if opening { OPENING } else { 0 };
        let flow = if closing { CLOSING } else { 0 } | opening;
        Some(Self {
            src,
            dst,
            sport_be,
            dport_be,
            proto,
            flow,
            l4,
            l4_len,
        })
    }

    /// Where the L4 checksum is, and the flag that keeps an absent UDP checksum absent;
    /// `None` for SCTP, whose CRC covers neither addresses nor a pseudo header.
    pub fn csum(&self) -> Option<(usize, u64)> {
        match self.proto {
            PROTO_TCP => Some((self.l4 + 16, 0)),
            PROTO_UDP => Some((self.l4 + 6, BPF_F_MARK_MANGLED_0)),
            _ => None,
        }
    }

    /// Where the destination (`dst`) or source port is, and its value.
    fn port(&self, dst: bool) -> (usize, u16) {
        if dst {
            (self.l4 + 2, self.dport_be)
        } else {
            (self.l4, self.sport_be)
        }
    }

    /// Rewrites the destination (`dst`) or source port; the address is the caller's.
    pub fn rewrite_port(&self, ctx: &TcContext, dst: bool, port_be: u16) -> Option<()> {
        let Some((csum_at, mangled)) = self.csum() else {
            return sctp_port(ctx, self, dst, port_be);
        };
        let (at, old) = self.port(dst);
        ctx.l4_csum_replace(csum_at, u64::from(old), u64::from(port_be), mangled | 2)
            .ok()?;
        ctx.store(at, &port_be, 0).ok()
    }
}

/// An SCTP port rewrite: the port, and the CRC32c updated for it. A zero CRC is one
/// the sender left to offload (`CHECKSUM_PARTIAL`), computed later over the packet as
/// it will be: it stays zero.
#[inline(never)]
fn sctp_port<A>(ctx: &TcContext, packet: &Packet<A>, dst: bool, port_be: u16) -> Option<()> {
    let (at, old) = packet.port(dst);
    let crc_at = packet.l4 + 8;
    let crc: u32 = read(ctx, crc_at)?;
    if crc != 0 {
        // The four port bytes as a little-endian word: the source port is its low half.
        let change = u32::from(old ^ port_be);
        let delta = if dst { change << 16 } else { change };
        let crc = crc32c::update(crc, delta, packet.l4_len);
        ctx.store(crc_at, &crc, BPF_F_RECOMPUTE_CSUM).ok()?;
    }
    ctx.store(at, &port_be, BPF_F_RECOMPUTE_CSUM).ok()
}
