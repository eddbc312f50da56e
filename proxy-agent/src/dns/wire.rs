//! The hot path for repeated questions: a query is read by hand (header, one question,
//! at most an OPT record) and, when the same question was answered from the zone or a
//! fresh cache entry less than a second ago, those answer bytes go out again with the
//! id, the question's spelling and the RD flag patched — no message decode or encode.
//! A second is short enough that TTLs need no patching, zone reloads and prefetches
//! still run through the full path, and the one-second reload rule holds.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// How long an answer's bytes are reused.
pub const LIFETIME: Duration = Duration::from_secs(1);
/// Questions remembered; a full table starts over (at most ~5 MB of answers).
pub const CAPACITY: usize = 4096;

/// The zone of an answer no zone can change (a cached name outside the cluster domain):
/// reused whatever zone is current.
pub const ANY_ZONE: u64 = u64::MAX;

const TYPE_OPT: u16 = 41;
const HEADER: usize = 12;

/// What identifies an answer: the name as sent on the wire but lower-cased, type,
/// class, and whether EDNS (with its DO bit) was asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WireKey {
    name: Vec<u8>,
    qtype: u16,
    qclass: u16,
    edns: bool,
    dnssec_ok: bool,
}

/// A query as the hot path needs it.
#[derive(Debug)]
pub struct QueryView<'a> {
    pub id: u16,
    recursion_desired: bool,
    /// The question section as sent (name, type, class), copied into the answer so it
    /// echoes the client's spelling.
    question: &'a [u8],
    pub key: WireKey,
    pub qtype: u16,
    /// The largest answer the client takes over UDP (512 without EDNS).
    pub udp_limit: usize,
}

fn u16_at(packet: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]))
}

/// Reads a plain query: QR 0, opcode QUERY, one question with an uncompressed name,
/// no answer or authority records, at most one additional record that is an OPT.
/// Anything else (including every malformed packet) is left to the full path.
#[must_use]
pub fn parse(packet: &[u8]) -> Option<QueryView<'_>> {
    let flags = u16_at(packet, 2)?;
    if flags & 0xF800 != 0 {
        return None; // a response, or not opcode QUERY
    }
    let counts = (
        u16_at(packet, 4)?,
        u16_at(packet, 6)?,
        u16_at(packet, 8)?,
        u16_at(packet, 10)?,
    );
    let (1, 0, 0, additional @ (0 | 1)) = counts else {
        return None;
    };
    let mut at = HEADER;
    let mut name = Vec::with_capacity(64);
    loop {
        let len = usize::from(*packet.get(at)?);
        if len == 0 {
            name.push(0);
            at += 1;
            break;
        }
        if len > 63 || name.len() + len + 1 > 255 {
            return None; // a pointer, or a name the full path should judge
        }
        let label = packet.get(at..=at + len)?;
        name.extend(label.iter().map(u8::to_ascii_lowercase));
        at += len + 1;
    }
    let qtype = u16_at(packet, at)?;
    let qclass = u16_at(packet, at + 2)?;
    let question = packet.get(HEADER..at + 4)?;
    at += 4;
    let (mut edns, mut dnssec_ok, mut udp_limit) = (false, false, 512);
    if additional == 1 {
        // OPT: root name, type 41, class = payload size, TTL = rcode/version/flags.
        if packet.get(at) != Some(&0) || u16_at(packet, at + 1)? != TYPE_OPT {
            return None;
        }
        let payload = u16_at(packet, at + 3)?;
        let version = *packet.get(at + 6)?;
        let extended_flags = u16_at(packet, at + 7)?;
        let rdlength = usize::from(u16_at(packet, at + 9)?);
        if version != 0 || packet.len() != at + 11 + rdlength {
            return None;
        }
        edns = true;
        dnssec_ok = extended_flags & 0x8000 != 0;
        udp_limit = usize::from(payload.max(512));
    } else if packet.len() != at {
        return None;
    }
    Some(QueryView {
        id: u16_at(packet, 0)?,
        recursion_desired: flags & 0x0100 != 0,
        question,
        key: WireKey {
            name,
            qtype,
            qclass,
            edns,
            dnssec_ok,
        },
        qtype,
        udp_limit,
    })
}

struct Entry {
    bytes: Vec<u8>,
    stored: Instant,
    /// The zone (its serial) the answer came from; another zone means stale, unless it
    /// is [`ANY_ZONE`].
    zone: u64,
    /// For forwarded answers, the cache-hit kind it counts as (`success`, `denial`).
    cache_hit: Option<&'static str>,
}

/// A reused answer: the bytes to send, and how to count it.
pub struct Reuse {
    pub bytes: Vec<u8>,
    pub cache_hit: Option<&'static str>,
}

#[derive(Default)]
pub struct WireCache {
    entries: Mutex<HashMap<WireKey, Entry>>,
}

impl WireCache {
    /// The remembered answer to `query`, patched for it, if fresh and from `zone`.
    pub fn answer(&self, query: &QueryView<'_>, zone: u64, now: Instant) -> Option<Reuse> {
        let entries = self.entries.lock().ok()?;
        let entry = entries.get(&query.key)?;
        if (entry.zone != zone && entry.zone != ANY_ZONE)
            || now.duration_since(entry.stored) >= LIFETIME
        {
            return None;
        }
        let mut bytes = entry.bytes.clone();
        let cache_hit = entry.cache_hit;
        drop(entries);
        if bytes.len() < HEADER + query.question.len() {
            return None;
        }
        bytes[..2].copy_from_slice(&query.id.to_be_bytes());
        bytes[2] = (bytes[2] & !0x01) | u8::from(query.recursion_desired);
        bytes[HEADER..HEADER + query.question.len()].copy_from_slice(query.question);
        Some(Reuse { bytes, cache_hit })
    }

    /// Remembers `response`, the full path's answer to `query`.
    pub fn store(
        &self,
        query: &QueryView<'_>,
        response: &[u8],
        zone: u64,
        cache_hit: Option<&'static str>,
        now: Instant,
    ) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= CAPACITY && !entries.contains_key(&query.key) {
            entries.retain(|_, e| now.duration_since(e.stored) < LIFETIME);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(
            query.key.clone(),
            Entry {
                bytes: response.to_vec(),
                stored: now,
                zone,
                cache_hit,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use hickory_proto::{
        op::{Edns, Message, MessageType, Query},
        rr::{Name, RecordType},
    };

    use super::{parse, WireCache, ANY_ZONE, LIFETIME};

    fn query(name: &str, id: u16, edns: bool) -> Vec<u8> {
        let mut message = Message::new();
        message
            .set_id(id)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if edns {
            let mut opt = Edns::new();
            opt.set_max_payload(1232);
            message.set_edns(opt);
        }
        message.to_vec().unwrap()
    }

    #[test]
    fn reads_plain_queries_and_leaves_the_rest() {
        let q = query("Web.Default.svc.cluster.local.", 7, true);
        let view = parse(&q).unwrap();
        assert_eq!(view.id, 7);
        assert_eq!(view.udp_limit, 1232);
        assert_eq!(view.qtype, 1);
        let plain = query("web.default.svc.cluster.local.", 8, true);
        assert_eq!(parse(&plain).unwrap().key, view.key, "case-insensitive key");
        assert_ne!(parse(&query("web.", 9, false)).unwrap().key, view.key);
        let mut response = q.clone();
        response[2] |= 0x80;
        assert!(parse(&response).is_none());
        assert!(parse(&q[..q.len() - 1]).is_none());
        let mut pointer = query("a.", 1, false);
        pointer[12] = 0xC0;
        assert!(parse(&pointer).is_none());
        assert!(parse(&[0; 5]).is_none());
    }

    #[test]
    fn reuses_an_answer_for_a_second_with_the_new_id_and_spelling() {
        let cache = WireCache::default();
        let first = query("web.default.svc.cluster.local.", 1, false);
        let view = parse(&first).unwrap();
        let mut answer = Message::from_vec(&first).unwrap();
        answer.set_message_type(MessageType::Response);
        let bytes = answer.to_vec().unwrap();
        let now = Instant::now();
        cache.store(&view, &bytes, 1, None, now);
        let second = query("WEB.default.svc.cluster.local.", 2, false);
        let reused = cache.answer(&parse(&second).unwrap(), 1, now).unwrap();
        let decoded = Message::from_vec(&reused.bytes).unwrap();
        assert_eq!(decoded.id(), 2);
        assert_eq!(
            decoded.queries()[0].name().to_ascii(),
            "WEB.default.svc.cluster.local."
        );
        assert!(
            cache.answer(&parse(&second).unwrap(), 2, now).is_none(),
            "other zone"
        );
        let later = now + LIFETIME + Duration::from_millis(1);
        assert!(cache.answer(&parse(&second).unwrap(), 1, later).is_none());
    }

    #[test]
    fn an_answer_no_zone_can_change_survives_zone_changes() {
        let cache = WireCache::default();
        let first = query("host.example.org.", 1, false);
        let view = parse(&first).unwrap();
        let mut answer = Message::from_vec(&first).unwrap();
        answer.set_message_type(MessageType::Response);
        let now = Instant::now();
        cache.store(
            &view,
            &answer.to_vec().unwrap(),
            ANY_ZONE,
            Some("success"),
            now,
        );
        let again = query("host.example.org.", 2, false);
        let second = parse(&again).unwrap();
        for zone in [1, 2, 3] {
            let reused = cache
                .answer(&second, zone, now)
                .expect("reused in any zone");
            assert_eq!(reused.cache_hit, Some("success"));
        }
        let later = now + LIFETIME + Duration::from_millis(1);
        assert!(
            cache.answer(&second, 3, later).is_none(),
            "still a second only"
        );
    }
}
