//! Partial transactions straight to the kernel as one `nf_tables` netlink batch, without
//! `nft`: nft before 1.0.7 fetches every chain of the ruleset before any `add rule` or
//! `add element`, and the kernel's chain dump is quadratic, so at 10 000 Services one
//! endpoint change cost a second in `nft` alone. The statements a partial sync writes
//! are encoded as `nft` itself encodes them (same expressions, same registers), so the
//! kernel holds, and `nft list` prints, exactly what `nft -f` would have left. A
//! statement outside that small grammar sends the whole transaction through `nft -f`.
use std::{
    io::ErrorKind,
    net::IpAddr,
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use netlink_sys::{Socket, SocketAddr};

use super::{ruleset::DISPATCH, table::is_ours, NftError};
use netlink_packet_core::{NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST};

const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
/// Larger batches (a rare, big change) go through `nft -f`, which sizes its buffers.
const MAX_BATCH: usize = 128 * 1024;

/// Registers as `nft` uses them: the verdict register and two 16-byte data registers.
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_2: u32 = 2;
/// `NFT_META_IIFNAME`, and the kernel's interface name size.
const META_IIFNAME: u32 = 6;
const IFNAMSIZ: usize = 16;

/// Netlink attributes and messages are padded to four bytes.
fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// One attribute, padded.
fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
    let mut a = Vec::with_capacity(align(len as usize));
    a.extend(len.to_ne_bytes());
    a.extend(kind.to_ne_bytes());
    a.extend(value);
    a.resize(align(a.len()), 0);
    a
}

fn string(kind: u16, value: &str) -> Vec<u8> {
    let mut bytes = value.as_bytes().to_vec();
    bytes.push(0);
    attr(kind, &bytes)
}

fn be32(kind: u16, value: u32) -> Vec<u8> {
    attr(kind, &value.to_be_bytes())
}

fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
    attr(kind | NLA_F_NESTED, &parts.concat())
}

/// `NFTA_DATA_VALUE` inside the nest `kind`.
fn value(kind: u16, bytes: &[u8]) -> Vec<u8> {
    nested(kind, &[attr(1, bytes)])
}

/// `NFTA_DATA_VERDICT` (jump or goto a chain) inside the nest `kind`.
fn verdict(kind: u16, goto: bool, chain: &str) -> Vec<u8> {
    let code: i32 = if goto { -4 } else { -3 };
    nested(
        kind,
        &[nested(2, &[attr(1, &code.to_be_bytes()), string(2, chain)])],
    )
}

fn expr(name: &str, data: &[Vec<u8>]) -> Vec<u8> {
    nested(1, &[string(1, name), nested(2, data)])
}

fn payload(base: u32, offset: u32, len: u32) -> Vec<u8> {
    expr(
        "payload",
        &[be32(1, REG_1), be32(2, base), be32(3, offset), be32(4, len)],
    )
}

fn cmp(equal: bool, data: &[u8]) -> Vec<u8> {
    expr(
        "cmp",
        &[be32(1, REG_1), be32(2, u32::from(!equal)), value(3, data)],
    )
}

fn immediate(register: u32, data: &[u8]) -> Vec<u8> {
    expr("immediate", &[be32(1, register), value(2, data)])
}

fn protocol(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(6),
        "udp" => Some(17),
        "sctp" => Some(132),
        _ => None,
    }
}

fn address_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// `IP:PORT` or `[IP6]:PORT`.
fn endpoint(text: &str) -> Option<(IpAddr, u16)> {
    let (ip, port) = text.rsplit_once(':')?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    Some((ip.parse().ok()?, port.parse().ok()?))
}

/// `ip saddr 10.0.0.1`, `ip6 daddr != @set` and the like: load the address, compare or
/// look it up.
fn address_match(v6: bool, field: &str, equal: bool, operand: &str) -> Option<Vec<Vec<u8>>> {
    let offset = match (field, v6) {
        ("saddr", false) => 12,
        ("daddr", false) => 16,
        ("saddr", true) => 8,
        ("daddr", true) => 24,
        _ => return None,
    };
    let load = payload(1, offset, if v6 { 16 } else { 4 });
    if let Some(set) = operand.strip_prefix('@') {
        let mut lookup = vec![string(1, set), be32(2, REG_1)];
        if !equal {
            lookup.push(be32(5, 1));
        }
        return Some(vec![load, expr("lookup", &lookup)]);
    }
    let ip: IpAddr = operand.parse().ok()?;
    (ip.is_ipv6() == v6).then(|| vec![load, cmp(equal, &address_bytes(ip))])
}

/// A quoted interface name as `nft` compares it: the whole name padded to `IFNAMSIZ`,
/// or only the bytes before a trailing `*` (a prefix match).
fn interface_bytes(quoted: &str) -> Option<Vec<u8>> {
    let name = quoted.strip_prefix('"')?.strip_suffix('"')?;
    if let Some(prefix) = name.strip_suffix('*') {
        return (!prefix.is_empty() && prefix.len() < IFNAMSIZ).then(|| prefix.as_bytes().to_vec());
    }
    if name.is_empty() || name.len() >= IFNAMSIZ {
        return None;
    }
    let mut bytes = name.as_bytes().to_vec();
    bytes.resize(IFNAMSIZ, 0);
    Some(bytes)
}

/// `dnat to IP:PORT` after a protocol match: address and port into registers, then NAT.
fn dnat(ip: IpAddr, port: u16) -> [Vec<u8>; 3] {
    let nfproto = if ip.is_ipv6() { 10 } else { 2 };
    [
        immediate(REG_1, &address_bytes(ip)),
        immediate(REG_2, &port.to_be_bytes()),
        // Type DNAT; flags: a port is given (the kernel adds "map addresses").
        expr(
            "nat",
            &[
                be32(1, 1),
                be32(2, nfproto),
                be32(3, REG_1),
                be32(5, REG_2),
                be32(7, 2),
            ],
        ),
    ]
}

/// The expressions of one rule as `nft` linearizes it, for the forms our ruleset writes
/// into per-Service chains; `None` for anything else.
fn rule(family: &str, text: &str) -> Option<Vec<u8>> {
    let v6 = family == "ip6";
    let mut words = text.split_whitespace().peekable();
    let mut exprs = Vec::new();
    let mut l4proto = false;
    while let Some(word) = words.next() {
        match word {
            "ip" | "ip6" => {
                if (word == "ip6") != v6 {
                    return None;
                }
                let field = words.next()?;
                let equal = words.next_if_eq(&"!=").is_none();
                exprs.extend(address_match(v6, field, equal, words.next()?)?);
            }
            "meta" => {
                if words.next()? != "l4proto" {
                    return None;
                }
                let proto = protocol(words.next()?)?;
                exprs.push(expr("meta", &[be32(1, REG_1), be32(2, 16)]));
                exprs.push(cmp(true, &[proto]));
                l4proto = true;
            }
            "th" => {
                if words.next()? != "dport" {
                    return None;
                }
                let port: u16 = words.next()?.parse().ok()?;
                exprs.push(payload(2, 2, 2));
                exprs.push(cmp(true, &port.to_be_bytes()));
            }
            "iifname" => {
                let equal = words.next_if_eq(&"!=").is_none();
                exprs.push(expr("meta", &[be32(1, REG_1), be32(2, META_IIFNAME)]));
                exprs.push(cmp(equal, &interface_bytes(words.next()?)?));
            }
            "fib" => {
                if [words.next()?, words.next()?, words.next()?] != ["saddr", "type", "local"] {
                    return None;
                }
                // Result: address type; flags: by source address. RTN_LOCAL is 2.
                exprs.push(expr("fib", &[be32(1, REG_1), be32(2, 3), be32(3, 1)]));
                exprs.push(cmp(true, &2u32.to_ne_bytes()));
            }
            "numgen" => {
                if [words.next()?, words.next()?] != ["random", "mod"] {
                    return None;
                }
                let modulus: u32 = words.next()?.parse().ok()?;
                let pick: u32 = words.next()?.parse().ok()?;
                exprs.push(expr(
                    "numgen",
                    &[be32(1, REG_1), be32(2, modulus), be32(3, 1), be32(4, 0)],
                ));
                exprs.push(cmp(true, &pick.to_ne_bytes()));
            }
            "goto" | "jump" => {
                let chain = words.next()?;
                if words.next().is_some() {
                    return None;
                }
                exprs.push(expr(
                    "immediate",
                    &[be32(1, REG_VERDICT), verdict(2, word == "goto", chain)],
                ));
            }
            "dnat" => {
                if !l4proto || words.next()? != "to" {
                    return None;
                }
                let (ip, port) = endpoint(words.next()?)?;
                if ip.is_ipv6() != v6 || words.next().is_some() {
                    return None;
                }
                exprs.extend(dnat(ip, port));
            }
            _ => return None,
        }
    }
    Some(exprs.concat())
}

/// A set element key: `IP`, or fields joined by ` . ` (each padded to 4 bytes).
fn element_key(text: &str) -> Option<Vec<u8>> {
    let fields: Vec<&str> = text.split(" . ").collect();
    let mut key = Vec::new();
    for field in &fields {
        let mut bytes = if let Ok(ip) = field.parse::<IpAddr>() {
            address_bytes(ip)
        } else if let Some(proto) = protocol(field) {
            vec![proto]
        } else {
            field.parse::<u16>().ok()?.to_be_bytes().to_vec()
        };
        if fields.len() > 1 {
            bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        }
        key.extend(bytes);
    }
    Some(key)
}

/// One netlink message of the batch: type, flags, family and attributes.
struct Message {
    kind: u16,
    flags: u16,
    family: u8,
    attrs: Vec<u8>,
}

fn family_number(family: &str) -> Option<u8> {
    match family {
        "ip" => Some(2),
        "ip6" => Some(10),
        _ => None,
    }
}

/// The chain's user data for `{ comment "…"; }` after `add chain … NAME` (empty when
/// there is no comment); `None` for any other specification.
fn chain_comment(rest: &str) -> Option<Vec<u8>> {
    let rest = rest.trim();
    if rest.is_empty() {
        return Some(Vec::new());
    }
    let comment = rest.strip_prefix("{ comment \"")?.strip_suffix("\"; }")?;
    if comment.contains('"') {
        return None;
    }
    // One TLV, type 0 (comment), the text with its NUL.
    let mut udata = vec![0u8, u8::try_from(comment.len() + 1).ok()?];
    udata.extend(comment.as_bytes());
    udata.push(0);
    Some(attr(12, &udata))
}

/// One statement of a partial transaction.
fn message(statement: &str) -> Option<Message> {
    let mut parts = statement.splitn(5, ' ');
    let (verb, object, family, table) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if !is_ours(table) {
        return None;
    }
    let family_id = family_number(family)?;
    let table_attr = string(1, table);
    let Some(rest) = parts.next() else {
        // `delete table ip NAME`: a Service table left with no Service.
        return ((verb, object) == ("delete", "table")).then_some(Message {
            kind: (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE,
            flags: 0,
            family: family_id,
            attrs: table_attr,
        });
    };
    let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
    let (kind, flags, attrs) = match (verb, object) {
        ("add", "chain") => {
            let attrs = vec![table_attr, string(3, name), chain_comment(tail)?];
            (NFT_MSG_NEWCHAIN, NLM_F_CREATE, attrs)
        }
        ("delete", "chain") if tail.is_empty() => {
            (NFT_MSG_DELCHAIN, 0, vec![table_attr, string(3, name)])
        }
        ("flush", "chain") if tail.is_empty() => {
            (NFT_MSG_DELRULE, 0, vec![table_attr, string(2, name)])
        }
        ("add", "rule") => (
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            vec![
                table_attr,
                string(2, name),
                nested(4, &[rule(family, tail)?]),
            ],
        ),
        // A set's elements all go (a full load refills the dispatch maps).
        ("flush", "set" | "map") if tail.is_empty() && DISPATCH.contains(&name) => {
            (NFT_MSG_DELSETELEM, 0, vec![table_attr, string(2, name)])
        }
        // A set no Service names any more (an affinity set).
        ("delete", "set" | "map") if tail.is_empty() => {
            (NFT_MSG_DELSET, 0, vec![table_attr, string(2, name)])
        }
        ("add" | "delete", "element") if DISPATCH.contains(&name) => {
            let inner = tail.strip_prefix("{ ")?.strip_suffix(" }")?;
            let (key, data) = inner.split_once(" : ").unwrap_or((inner, ""));
            let mut element = vec![value(1, &element_key(key)?)];
            if verb == "add" && !data.is_empty() {
                let (verb, chain) = data.split_once(' ')?;
                if !matches!(verb, "goto" | "jump") || chain.contains(' ') {
                    return None;
                }
                element.push(verdict(2, verb == "goto", chain));
            }
            let (kind, flags) = if verb == "add" {
                (NFT_MSG_NEWSETELEM, NLM_F_CREATE)
            } else {
                (NFT_MSG_DELSETELEM, 0)
            };
            let list = nested(3, &[nested(1, &element)]);
            (kind, flags, vec![table_attr, string(2, name), list])
        }
        _ => return None,
    };
    Some(Message {
        kind: (NFNL_SUBSYS_NFTABLES << 8) | kind,
        flags,
        family: family_id,
        attrs: attrs.concat(),
    })
}

static SEQUENCE: AtomicU32 = AtomicU32::new(1);

fn frame(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, genmsg: [u8; 4], attrs: &[u8]) {
    let len = u32::try_from(20 + attrs.len()).unwrap_or(u32::MAX);
    out.extend(len.to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend((NLM_F_REQUEST | flags).to_ne_bytes());
    out.extend(seq.to_ne_bytes());
    out.extend(0u32.to_ne_bytes());
    out.extend(genmsg);
    out.extend(attrs);
}

/// An encoded batch: the bytes, and the sequence numbers of its messages.
pub struct Batch {
    bytes: Vec<u8>,
    first: u32,
    last: u32,
}

/// A batch made one statement at a time (a full load's Service table is tens of
/// thousands of them: each is encoded as it comes, never kept as text).
pub struct BatchWriter {
    bytes: Vec<u8>,
    /// The last message so far, not yet framed: it is the one that asks for an ACK.
    last: Option<Message>,
    count: u32,
}

const BATCH_GENMSG: [u8; 4] = [0, 0, 0, 10];

impl Default for BatchWriter {
    fn default() -> Self {
        let mut bytes = Vec::new();
        // Sequence numbers are given out when the batch is done; the begin message
        // takes the first one, patched in then.
        frame(&mut bytes, NFNL_MSG_BATCH_BEGIN, 0, 0, BATCH_GENMSG, &[]);
        Self {
            bytes,
            last: None,
            count: 0,
        }
    }
}

impl BatchWriter {
    /// Adds every one of `statements`, or (when one is outside the grammar) none.
    pub fn push_all<S: AsRef<str>>(&mut self, statements: &[S]) -> bool {
        let Some(messages) = statements
            .iter()
            .map(|s| message(s.as_ref()))
            .collect::<Option<Vec<_>>>()
        else {
            return false;
        };
        for message in messages {
            if let Some(previous) = self.last.replace(message) {
                self.put(&previous, 0);
            }
        }
        true
    }

    /// The statements so far.
    #[must_use]
    pub fn len(&self) -> usize {
        self.count as usize + usize::from(self.last.is_some())
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The encoded size so far, in bytes.
    #[must_use]
    pub fn size(&self) -> usize {
        self.bytes.len() + self.last.as_ref().map_or(0, |m| 20 + m.attrs.len())
    }

    fn put(&mut self, m: &Message, flags: u16) {
        self.count += 1;
        // Numbered from 1 after the begin message; made absolute in `finish`.
        let seq = self.count;
        frame(
            &mut self.bytes,
            m.kind,
            m.flags | flags,
            seq,
            [m.family, 0, 0, 0],
            &m.attrs,
        );
    }

    /// The batch (`None` when empty). Errors are always answered; the last message also
    /// asks for an ACK, so success is confirmed rather than inferred.
    #[must_use]
    pub fn finish(mut self) -> Option<Batch> {
        let last = self.last.take()?;
        self.put(&last, NLM_F_ACK);
        let first = SEQUENCE.fetch_add(self.count + 2, Ordering::Relaxed);
        // Each message's sequence number sits at offset 8 of its header.
        let mut at = 0;
        let mut n = 0;
        while at + 20 <= self.bytes.len() {
            let len = u32::from_ne_bytes([
                self.bytes[at],
                self.bytes[at + 1],
                self.bytes[at + 2],
                self.bytes[at + 3],
            ]) as usize;
            self.bytes[at + 8..at + 12].copy_from_slice(&(first + n).to_ne_bytes());
            n += 1;
            at += align(len);
        }
        let last = first + self.count;
        frame(
            &mut self.bytes,
            NFNL_MSG_BATCH_END,
            0,
            last + 1,
            BATCH_GENMSG,
            &[],
        );
        Some(Batch {
            bytes: self.bytes,
            first,
            last,
        })
    }
}

/// The batch for `statements`, or `None` when one of them is outside the grammar
/// (or the batch would be too large for one datagram).
#[must_use]
pub fn encode(statements: &[String]) -> Option<Batch> {
    let mut writer = BatchWriter::default();
    (writer.push_all(statements) && writer.size() <= MAX_BATCH).then(|| writer.finish())?
}

/// A netfilter netlink socket in the dataplane's network namespace.
pub struct Wire {
    socket: Socket,
    /// The send buffer asked for so far (a batch must fit in it whole).
    send_buffer: usize,
}

impl Wire {
    /// Opens the socket in `netns` (a `/run/netns/NAME` path) or the current one.
    ///
    /// # Errors
    /// When netlink or the namespace is unavailable.
    pub fn open(netns: Option<&Path>) -> std::io::Result<Self> {
        let open = || -> std::io::Result<Socket> {
            let mut socket = Socket::new(NETLINK_NETFILTER)?;
            socket.bind(&SocketAddr::new(0, 0))?;
            socket.set_non_blocking(true)?;
            Ok(socket)
        };
        let socket = match netns {
            None => open()?,
            // A socket stays in the namespace it was made in; a short-lived thread enters
            // it so that this one does not move.
            Some(path) => std::thread::scope(|s| {
                s.spawn(|| {
                    let file = std::fs::File::open(path)?;
                    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)?;
                    open()
                })
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
            })?,
        };
        Ok(Self {
            socket,
            send_buffer: 0,
        })
    }

    /// Makes room for a batch of `size` bytes (a full load's table is megabytes; the
    /// kernel takes a batch in one datagram). Forced: past `wmem_max`, as `nft` does.
    fn room_for(&mut self, size: usize) -> std::io::Result<()> {
        if size + 4096 <= self.send_buffer.max(MAX_BATCH) {
            return Ok(());
        }
        let want = (size + 4096).next_power_of_two();
        nix::sys::socket::setsockopt(&self.socket, nix::sys::socket::sockopt::SndBufForce, &want)
            .map_err(std::io::Error::from)?;
        self.send_buffer = want;
        Ok(())
    }

    /// Commits `batch` as one transaction: all of it or (on any error) none of it.
    ///
    /// # Errors
    /// The kernel's first error, as `nft` would report it.
    pub fn commit(&mut self, batch: &Batch) -> Result<(), NftError> {
        NftError::fault()?;
        let io = |e: std::io::Error| NftError::Spawn(e);
        // Answers to an earlier batch that failed part-way are not ours.
        while self.socket.recv_from_full().is_ok() {}
        self.room_for(batch.bytes.len()).map_err(io)?;
        self.socket
            .send_to(&batch.bytes, &SocketAddr::new(0, 0), 0)
            .map_err(io)?;
        // The kernel runs the batch inside sendmsg, so every answer is queued by now.
        let (mut acked, mut error) = (false, None);
        loop {
            let buffer = match self.socket.recv_from_full() {
                Ok((buffer, _)) => buffer,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(io(e)),
            };
            let mut rest = &buffer[..];
            while rest.len() >= 20 {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                if len < 16 || len > rest.len() {
                    break;
                }
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
                let code = i32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
                if kind == NLMSG_ERROR && (batch.first..=batch.last + 1).contains(&seq) {
                    if code != 0 {
                        error.get_or_insert(-code);
                    } else if seq == batch.last {
                        acked = true;
                    }
                }
                rest = &rest[align(len).min(rest.len())..];
            }
        }
        match (error, acked) {
            (Some(errno), _) => Err(NftError::Rejected(format!(
                "netlink batch: {}",
                std::io::Error::from_raw_os_error(errno)
            ))),
            (None, true) => Ok(()),
            (None, false) => Err(NftError::Rejected(
                "netlink batch: no answer from nf_tables".to_owned(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{element_key, encode, message, rule};

    #[test]
    fn the_grammar_covers_endpoint_chains_and_refuses_the_rest() {
        for (family, text) in [
            ("ip", "ip saddr 10.0.0.1 jump KUBE-MARK-MASQ"),
            ("ip", "meta l4proto tcp dnat to 10.0.0.1:8080"),
            ("ip6", "meta l4proto udp dnat to [fd00::1]:53"),
            ("ip", "numgen random mod 3 0 goto KUBE-SEP-X"),
            ("ip", "ip daddr 10.96.0.1 meta l4proto tcp th dport 80 ip saddr != @cluster-cidrs jump KUBE-MARK-MASQ"),
            ("ip", "fib saddr type local goto KUBE-SVC-X"),
            ("ip", "iifname \"veth*\" goto KUBE-SVC-X"),
            ("ip6", "iifname != \"cbr0\" jump KUBE-MARK-MASQ"),
        ] {
            assert!(rule(family, text).is_some(), "{text}");
        }
        for (family, text) in [
            ("ip", "numgen random mod 20 vmap { 0 : goto A, 1 : goto B }"),
            ("ip", "update @affinity-X { ip saddr }"),
            ("ip", "ip6 saddr fd00::1 jump KUBE-MARK-MASQ"),
            ("ip", "dnat to 10.0.0.1:80"),
            ("ip", "goto A B"),
            ("ip", "ip saddr { 10.0.0.0/8 } goto A"),
            ("ip", "iifname veth goto A"),
            ("ip", "iifname \"a-name-longer-than-15\" goto A"),
        ] {
            assert!(rule(family, text).is_none(), "{text}");
        }
        assert!(message("add map ip proxy-agent m { type ipv4_addr : verdict; }").is_none());
        assert!(message("add element ip proxy-agent cluster-cidrs { 10.0.0.0/8 }").is_none());
        assert!(message(
            "add chain ip proxy-agent X { type nat hook output priority -100; policy accept; }"
        )
        .is_none());
        assert!(message("add chain ip proxy-agent X { comment \"a/b:c\"; }").is_some());
        assert!(message("add chain ip proxy-agent-svc-07 X").is_some());
        assert!(message("delete table ip proxy-agent-svc-07").is_some());
        assert!(message("delete table ip other-table").is_none());
        assert!(message("table ip proxy-agent-svc-07 {\n}").is_none());
        assert!(encode(&["add chain ip other-table X".to_owned()]).is_none());
    }

    #[test]
    fn concatenated_keys_pad_each_field_to_a_register() {
        assert_eq!(
            element_key("10.96.0.1 . tcp . 80").unwrap(),
            [10, 96, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]
        );
        assert_eq!(
            element_key("udp . 30080").unwrap(),
            [17, 0, 0, 0, 0x75, 0x80, 0, 0]
        );
        assert_eq!(element_key("10.0.0.1").unwrap(), [10, 0, 0, 1]);
    }
}
