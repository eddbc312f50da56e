//! Raw netlink framing shared by the agent's two small netlink clients (ctnetlink for
//! conntrack, rtnetlink for node addresses): requests, dumps, ACKs and attributes.
use std::collections::BTreeMap;

use netlink_sys::{Socket, SocketAddr};
use thiserror::Error;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLA_F_NESTED: u16 = 0x8000;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink answered error {0}")]
    Kernel(i32),
    #[error("netlink message is malformed")]
    Malformed,
}

/// A netlink socket of one protocol in the current network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    /// Opens a socket for requests, subscribed to the multicast `groups` (a bit mask;
    /// 0 for none).
    ///
    /// # Errors
    /// When netlink is unavailable.
    pub fn open(protocol: isize, groups: u32) -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(protocol).map_err(NetlinkError::Socket)?;
        socket
            .bind(&SocketAddr::new(0, groups))
            .map_err(NetlinkError::Socket)?;
        Ok(Self { socket, seq: 1 })
    }

    /// Sends one request: the fixed `header` of the message family, then `attrs`.
    ///
    /// # Errors
    /// On socket errors.
    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        header: &[u8],
        attrs: &[u8],
    ) -> Result<(), NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let len = u32::try_from(16 + header.len() + attrs.len()).unwrap_or(u32::MAX);
        let mut m = Vec::with_capacity(len as usize);
        m.extend(len.to_ne_bytes());
        m.extend(kind.to_ne_bytes());
        m.extend(flags.to_ne_bytes());
        m.extend(self.seq.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend(header);
        m.extend(attrs);
        self.socket
            .send_to(&m, &SocketAddr::new(0, 0), 0)
            .map_err(NetlinkError::Socket)?;
        Ok(())
    }

    /// Reads messages until DONE or an ACK/error, handing each other message's type
    /// and body (after the netlink header) over.
    ///
    /// # Errors
    /// On socket errors, malformed messages or an error answer.
    pub fn receive(&mut self, mut each: impl FnMut(u16, &[u8])) -> Result<(), NetlinkError> {
        loop {
            let (buffer, _) = self.socket.recv_from_full().map_err(NetlinkError::Socket)?;
            if let Some(result) = messages(&buffer, &mut each)? {
                return result;
            }
        }
    }

    /// Blocks until the next multicast message arrives (its content is not needed:
    /// callers re-read the state they follow).
    ///
    /// # Errors
    /// On socket errors.
    pub fn wait_event(&mut self) -> Result<(), NetlinkError> {
        self.socket
            .recv_from_full()
            .map(|_| ())
            .map_err(NetlinkError::Socket)
    }
}

/// Walks the messages of one datagram; `Some` once the exchange has ended.
///
/// # Errors
/// On a message whose length is shorter than its header or runs past the datagram.
pub fn messages(
    mut rest: &[u8],
    each: &mut impl FnMut(u16, &[u8]),
) -> Result<Option<Result<(), NetlinkError>>, NetlinkError> {
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            return Err(NetlinkError::Malformed);
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let body = &rest[16..len];
        match kind {
            NLMSG_DONE => return Ok(Some(Ok(()))),
            NLMSG_ERROR => {
                let code = body
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or(NetlinkError::Malformed)?;
                return Ok(Some(if code == 0 {
                    Ok(())
                } else {
                    Err(NetlinkError::Kernel(code))
                }));
            }
            _ => each(kind, body),
        }
        rest = &rest[align(len).min(rest.len())..];
    }
    Ok(None)
}

#[must_use]
pub fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// One attribute, padded.
#[must_use]
pub fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
    let mut a = Vec::with_capacity(align(len as usize));
    a.extend(len.to_ne_bytes());
    a.extend(kind.to_ne_bytes());
    a.extend(value);
    a.resize(align(a.len()), 0);
    a
}

/// The attributes in `data`, by type (nesting flag cleared).
#[must_use]
pub fn attrs(mut data: &[u8]) -> BTreeMap<u16, &[u8]> {
    let mut out = BTreeMap::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        if len < 4 || len > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        out.insert(kind, &data[4..len]);
        data = &data[align(len).min(data.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{attr, attrs, messages, NetlinkError};

    #[test]
    fn truncated_and_lying_lengths_are_errors_not_panics() {
        let mut seen = 0;
        let mut count = |_: u16, _: &[u8]| seen += 1;
        // A header claiming 64 bytes in a 20-byte buffer.
        let mut lying = 64u32.to_ne_bytes().to_vec();
        lying.extend([0u8; 16]);
        assert!(matches!(
            messages(&lying, &mut count),
            Err(NetlinkError::Malformed)
        ));
        // Attributes: a short one is kept, a truncated tail is ignored.
        let mut data = attr(1, &[1, 2, 3]);
        data.extend([200, 0, 2, 0, 9]);
        let parsed = attrs(&data);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[&1], &[1, 2, 3]);
    }
}
