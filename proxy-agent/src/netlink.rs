//! Blocking netlink requests with the field's typed messages (netlink-packet-*), for the
//! callers that run on plain threads, often inside another network namespace: replies
//! are matched to the request by sequence number and port, and an interrupted dump is
//! read again.
use std::{fmt::Debug, io, net::IpAddr};

use netlink_packet_core::{
    DecodeError, NetlinkBuffer, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_sys::{Socket, SocketAddr};
use thiserror::Error;

pub use netlink_packet_core::NLM_F_ACK;

/// How often a dump the kernel marks interrupted (the table changed under it) is read
/// again before giving up.
const DUMP_ATTEMPTS: usize = 5;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink refused the request: {0}")]
    Kernel(#[source] io::Error),
    #[error("netlink reply cannot be read: {0}")]
    Malformed(#[source] DecodeError),
    #[error(
        "the kernel interrupted the dump {DUMP_ATTEMPTS} times in a row (the table kept changing)"
    )]
    Interrupted,
}

impl NetlinkError {
    /// Whether the kernel answered "no such entry" (`ENOENT`).
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Kernel(e) if e.raw_os_error() == Some(libc::ENOENT))
    }

    /// The errno the kernel answered, if it answered one.
    #[must_use]
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// A netlink socket of one protocol, in the network namespace of the thread that opened
/// it.
pub struct Netlink {
    socket: Socket,
    port: u32,
    seq: u32,
}

impl Netlink {
    /// Opens and binds a socket (the kernel picks its port).
    ///
    /// # Errors
    /// When netlink is unavailable.
    pub fn open(protocol: isize) -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(protocol).map_err(NetlinkError::Socket)?;
        let bound = socket.bind_auto().map_err(NetlinkError::Socket)?;
        Ok(Self {
            socket,
            port: bound.port_number(),
            seq: 0,
        })
    }

    /// A dump: every message the kernel answers with, read again from the start if the
    /// kernel says the table changed while it was being read.
    ///
    /// # Errors
    /// On socket errors, refusals, unreadable replies, or a dump interrupted every time.
    pub fn dump<T>(&mut self, request: &T) -> Result<Vec<T>, NetlinkError>
    where
        T: NetlinkSerializable + NetlinkDeserializable + Clone + Debug,
    {
        self.dump_map(request, Some)
    }

    /// A dump as [`Self::dump`], keeping only what `keep` makes of each message as it
    /// arrives (a large table never sits in memory twice).
    ///
    /// # Errors
    /// As [`Self::dump`].
    pub fn dump_map<T, U>(
        &mut self,
        request: &T,
        mut keep: impl FnMut(T) -> Option<U>,
    ) -> Result<Vec<U>, NetlinkError>
    where
        T: NetlinkSerializable + NetlinkDeserializable + Clone + Debug,
    {
        for _ in 0..DUMP_ATTEMPTS {
            let mut kept = Vec::new();
            let interrupted = self.exchange(request, NLM_F_DUMP, |message| {
                kept.extend(keep(message));
            })?;
            if !interrupted {
                return Ok(kept);
            }
        }
        Err(NetlinkError::Interrupted)
    }

    /// A request answered by an ACK (or, with `flags` lacking `NLM_F_ACK`, by the
    /// messages it asks for); returns those messages.
    ///
    /// # Errors
    /// On socket errors, refusals or unreadable replies.
    pub fn request<T>(&mut self, request: &T, flags: u16) -> Result<Vec<T>, NetlinkError>
    where
        T: NetlinkSerializable + NetlinkDeserializable + Clone + Debug,
    {
        let mut messages = Vec::new();
        self.exchange(request, flags, |message| messages.push(message))?;
        Ok(messages)
    }

    /// Sends `request` and hands each message of the reply to `each`; `true` when the
    /// kernel marked the dump interrupted.
    fn exchange<T>(
        &mut self,
        request: &T,
        flags: u16,
        each: impl FnMut(T),
    ) -> Result<bool, NetlinkError>
    where
        T: NetlinkSerializable + NetlinkDeserializable + Clone + Debug,
    {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut message =
            NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request.clone()));
        message.finalize();
        let mut buffer = vec![0; message.buffer_len()];
        message.serialize(&mut buffer);
        self.socket
            .send_to(&buffer, &SocketAddr::new(0, 0), 0)
            .map_err(NetlinkError::Socket)?;
        let mut reply = Reply {
            seq: self.seq,
            port: self.port,
            expect_ack: flags & NLM_F_ACK != 0,
            dump: flags & NLM_F_DUMP == NLM_F_DUMP,
            each,
            interrupted: false,
        };
        loop {
            let (datagram, _) = self.socket.recv_from_full().map_err(NetlinkError::Socket)?;
            if reply.read(&datagram)? {
                return Ok(reply.interrupted);
            }
        }
    }
}

/// What has come back for one request so far.
struct Reply<F> {
    seq: u32,
    port: u32,
    expect_ack: bool,
    dump: bool,
    each: F,
    interrupted: bool,
}

impl<F> Reply<F> {
    /// Reads one datagram's messages; `true` once the exchange has ended. Messages for
    /// another request (an earlier one given up on) are skipped.
    fn read<T>(&mut self, mut datagram: &[u8]) -> Result<bool, NetlinkError>
    where
        T: NetlinkDeserializable + Debug,
        F: FnMut(T),
    {
        while !datagram.is_empty() {
            let length = NetlinkBuffer::new_checked(datagram)
                .map_err(NetlinkError::Malformed)?
                .length() as usize;
            let one = &datagram[..length];
            datagram = &datagram[align(length).min(datagram.len())..];
            let message = NetlinkMessage::<T>::deserialize(one).map_err(NetlinkError::Malformed)?;
            let header = message.header;
            if header.sequence_number != self.seq
                || (header.port_number != 0 && header.port_number != self.port)
            {
                continue;
            }
            self.interrupted |= header.flags & NLM_F_DUMP_INTR != 0;
            match message.payload {
                NetlinkPayload::InnerMessage(inner) => {
                    (self.each)(inner);
                    if !self.dump && !self.expect_ack {
                        return Ok(true);
                    }
                }
                NetlinkPayload::Error(error) => {
                    return match error.code {
                        None => Ok(true),
                        Some(_) => Err(NetlinkError::Kernel(error.to_io())),
                    };
                }
                NetlinkPayload::Done(_) => return Ok(true),
                // NOOP, OVERRUN and what the crate may add later carry nothing for us.
                _ => {}
            }
        }
        Ok(false)
    }
}

fn align(length: usize) -> usize {
    (length + 3) & !3
}

/// Reads every message of `datagram` as replies to request `seq` of port `port`, as
/// [`Netlink`] does (for the fuzzer): the messages, or the error that ends the read.
///
/// # Errors
/// As a reply read from the kernel would.
pub fn read_reply<T>(datagram: &[u8], seq: u32, port: u32) -> Result<Vec<T>, NetlinkError>
where
    T: NetlinkDeserializable + Debug,
{
    let mut messages = Vec::new();
    let mut reply = Reply {
        seq,
        port,
        expect_ack: true,
        dump: true,
        each: |message| messages.push(message),
        interrupted: false,
    };
    reply.read(datagram)?;
    Ok(messages)
}

/// `ip`, or the IPv4 address an IPv4-mapped IPv6 one stands for when `unmap`.
#[must_use]
pub fn unmapped(ip: IpAddr, unmap: bool) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if unmap => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        other => other,
    }
}

/// Whether `ip` is link-local (`169.254.0.0/16`, `fe80::/10`).
#[must_use]
pub fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => ip.is_link_local(),
        IpAddr::V6(ip) => ip.segments()[0] & 0xffc0 == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP_INTR, NLM_F_MULTIPART,
    };
    use netlink_packet_route::{link::LinkMessage, RouteNetlinkMessage};

    use super::{read_reply, Reply};

    fn datagram(messages: &[(u32, u32, u16)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(seq, port, flags) in messages {
            let mut header = NetlinkHeader::default();
            header.sequence_number = seq;
            header.port_number = port;
            header.flags = flags;
            let mut message = NetlinkMessage::new(
                header,
                NetlinkPayload::from(RouteNetlinkMessage::NewLink(LinkMessage::default())),
            );
            message.finalize();
            let mut buffer = vec![0; message.buffer_len()];
            message.serialize(&mut buffer);
            out.extend(buffer);
        }
        out
    }

    #[test]
    fn replies_to_other_requests_are_skipped_and_interrupted_dumps_noticed() {
        let raw = datagram(&[
            (6, 9, NLM_F_MULTIPART),
            (7, 9, NLM_F_MULTIPART),
            (7, 8, NLM_F_MULTIPART),
        ]);
        let got: Vec<RouteNetlinkMessage> = read_reply(&raw, 7, 9).unwrap();
        assert_eq!(got.len(), 1);
        let mut reply = Reply {
            seq: 7,
            port: 9,
            expect_ack: false,
            dump: true,
            each: |_: RouteNetlinkMessage| {},
            interrupted: false,
        };
        let raw = datagram(&[(7, 9, NLM_F_MULTIPART | NLM_F_DUMP_INTR)]);
        assert!(!reply.read(&raw).unwrap());
        assert!(reply.interrupted);
    }

    #[test]
    fn truncated_and_lying_lengths_are_errors_not_panics() {
        let mut lying = 64u32.to_ne_bytes().to_vec();
        lying.extend([0u8; 16]);
        assert!(read_reply::<RouteNetlinkMessage>(&lying, 1, 1).is_err());
        assert!(read_reply::<RouteNetlinkMessage>(&lying[..7], 1, 1).is_err());
    }
}
