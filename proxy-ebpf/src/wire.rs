//! The per-packet path's family differences: header layout and parsing, NAT rewrites
//! with their checksum updates, and the family's flow, cluster-CIDR and source-range
//! maps. `packet.rs` holds the logic, written once over this trait.
use aya_ebpf::{helpers::bpf_csum_diff, maps::lpm_trie::Key, programs::TcContext};
use proxy_common::{
    Ct4Key, Ct4Value, Ct6Key, Ct6Value, SourceRange4, SourceRange6, CT_FLAG_CLOSING,
};

pub use crate::l4::Packet;
use crate::{
    family::{words, Family, V4, V6},
    maps::{CLUSTER_CIDR4, CLUSTER_CIDR6, LB4_CT, LB4_SOURCE_RANGES, LB6_CT, LB6_SOURCE_RANGES},
};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const IP_TOTAL_LEN: usize = ETH_HLEN + 2;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;
const IP6_PAYLOAD_LEN: usize = ETH_HLEN + 4;
const IP6_NEXT: usize = ETH_HLEN + 6;
const IP6_SRC: usize = ETH_HLEN + 8;
const IP6_DST: usize = ETH_HLEN + 24;
const IP6_HLEN: usize = 40;
/// The `T` at `offset` in the packet: straight from its linear data when it is there
/// (the common case, no helper call), else through `bpf_skb_load_bytes`.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    // The bounds check the verifier needs: the whole value lies before data_end. At
    // least two bytes: for one, LLVM turns the check into `end > start + offset`, which
    // proves no range to the verifier (it reads only `start + offset + 1 > end`).
    let size = core::mem::size_of::<T>().max(2);
    if start + offset + size <= end {
        // SAFETY: within the packet's linear data, as just checked; the read makes no
        // alignment assumption.
        return Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
    }
    ctx.load(offset).ok()
}

/// `bpf_l4_csum_replace` flag: the change is in the pseudo header.
const BPF_F_PSEUDO_HDR: u64 = 0x10;
/// How stale a flow's `last_seen_ns` may grow before a packet rewrites it.
const TOUCH_EVERY_NS: u64 = 1_000_000_000;
/// Marks `affinity::select` clients that are addresses, not network namespaces.
const ADDRESS_CLIENT: u64 = 1 << 63;

/// A flow-map value of either family, read out.
#[derive(Clone, Copy)]
pub struct Flow<A> {
    pub nat: A,
    pub nat_port_be: u16,
    pub rev_nat_index: u32,
    pub backend_id: u32,
    pub flags: u8,
}

pub trait Wire: Family {
    type CtKey: Copy;
    type CtValue: Copy;
    fn parse(ctx: &TcContext) -> Option<Packet<Self::Addr>>;
    /// Rewrites the destination (`dst`) or source address and port, checksums included.
    fn rewrite(
        ctx: &TcContext,
        packet: &Packet<Self::Addr>,
        dst: bool,
        to: (Self::Addr, u16),
    ) -> Option<()>;
    /// Compares without `memcmp` (which BPF has not).
    fn same(a: &Self::Addr, b: &Self::Addr) -> bool;
    fn fold(address: &Self::Addr) -> u32;
    /// The client as `sessionAffinity` knows it on the per-packet path.
    fn client(address: &Self::Addr) -> u64;
    fn ct_key(
        src: Self::Addr,
        dst: Self::Addr,
        ports: (u16, u16),
        proto: u8,
        dir: u8,
    ) -> Self::CtKey;
    fn ct_get(key: &Self::CtKey) -> Option<*mut Self::CtValue>;
    fn ct_read(value: &Self::CtValue) -> Flow<Self::Addr>;
    /// Another packet of the flow: its time, and whether it closes the flow.
    fn ct_touch(value: *mut Self::CtValue, now_ns: u64, closing: bool);
    /// A flow entry's value, seen at `now_ns`.
    fn ct_value(flow: &Flow<Self::Addr>, now_ns: u64) -> Self::CtValue;
    /// Points a flow entry's value at another address and port.
    fn ct_retarget(value: &mut Self::CtValue, to: &(Self::Addr, u16));
    /// Writes a flow entry; the kernel's error code if it refused.
    fn ct_put(key: &Self::CtKey, value: &Self::CtValue) -> Result<(), i64>;
    fn ct_remove(key: &Self::CtKey);
    /// Whether the source is a pod (inside `--cluster-cidr`).
    fn in_cluster(src: &Self::Addr) -> bool;
    fn source_allowed(rev_nat_index: u32, src: &Self::Addr) -> bool;
}

impl Wire for V4 {
    type CtKey = Ct4Key;
    type CtValue = Ct4Value;

    #[inline(always)]
    fn parse(ctx: &TcContext) -> Option<Packet<u32>> {
        let version_ihl: u8 = read(ctx, ETH_HLEN)?;
        let ihl = usize::from(version_ihl & 0x0f) * 4;
        if version_ihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        // Fragments carry no ports past the first: they pass untouched.
        let fragment: u16 = read(ctx, ETH_HLEN + 6)?;
        if u16::from_be(fragment) & 0x3fff != 0 {
            return None;
        }
        let proto: u8 = read(ctx, ETH_HLEN + 9)?;
        let (src, dst) = (read(ctx, IP_SRC)?, read(ctx, IP_DST)?);
        let total = u16::from_be(read(ctx, IP_TOTAL_LEN)?);
        // ihl is at most 60, so the cast cannot truncate.
        let l4_len = total.checked_sub(ihl as u16)?;
        Packet::l4_fields(ctx, (src, dst), proto, ETH_HLEN + ihl, l4_len)
    }

    #[inline(always)]
    fn rewrite(ctx: &TcContext, packet: &Packet<u32>, dst: bool, to: (u32, u16)) -> Option<()> {
        let (old, at) = if dst {
            (packet.dst, IP_DST)
        } else {
            (packet.src, IP_SRC)
        };
        if let Some((csum_at, mangled)) = packet.csum() {
            ctx.l4_csum_replace(
                csum_at,
                u64::from(old),
                u64::from(to.0),
                BPF_F_PSEUDO_HDR | mangled | 4,
            )
            .ok()?;
        }
        ctx.l3_csum_replace(IP_CSUM, u64::from(old), u64::from(to.0), 4)
            .ok()?;
        ctx.store(at, &to.0, 0).ok()?;
        packet.rewrite_port(ctx, dst, to.1)
    }

    #[inline(always)]
    fn same(a: &u32, b: &u32) -> bool {
        a == b
    }
    #[inline(always)]
    fn fold(address: &u32) -> u32 {
        *address
    }
    #[inline(always)]
    fn client(address: &u32) -> u64 {
        ADDRESS_CLIENT | u64::from(*address)
    }
    #[inline(always)]
    fn ct_key(src: u32, dst: u32, ports: (u16, u16), proto: u8, dir: u8) -> Ct4Key {
        Ct4Key {
            src_be: src,
            dst_be: dst,
            sport_be: ports.0,
            dport_be: ports.1,
            proto,
            direction: dir,
            pad: [0; 2],
        }
    }
    #[inline(always)]
    fn ct_get(key: &Ct4Key) -> Option<*mut Ct4Value> {
        LB4_CT.get_ptr_mut(key)
    }
    #[inline(always)]
    fn ct_read(value: &Ct4Value) -> Flow<u32> {
        Flow {
            nat: value.nat_be,
            nat_port_be: value.nat_port_be,
            rev_nat_index: value.rev_nat_index,
            backend_id: value.backend_id,
            flags: value.flags,
        }
    }
    #[inline(always)]
    fn ct_touch(value: *mut Ct4Value, now_ns: u64, closing: bool) {
        // SAFETY: a valid map value pointer; racing packets of one flow write the same.
        unsafe {
            touch(
                &mut (*value).last_seen_ns,
                &mut (*value).flags,
                now_ns,
                closing,
            )
        }
    }
    #[inline(always)]
    fn ct_value(flow: &Flow<u32>, now_ns: u64) -> Ct4Value {
        Ct4Value {
            last_seen_ns: now_ns,
            nat_be: flow.nat,
            nat_port_be: flow.nat_port_be,
            rev_nat_index: flow.rev_nat_index,
            backend_id: flow.backend_id,
            flags: flow.flags,
            pad: 0,
        }
    }
    #[inline(always)]
    fn ct_retarget(value: &mut Ct4Value, to: &(u32, u16)) {
        value.nat_be = to.0;
        value.nat_port_be = to.1;
    }
    #[inline(always)]
    fn ct_put(key: &Ct4Key, value: &Ct4Value) -> Result<(), i64> {
        // LRU maps evict rather than fail; a lost entry only means the next packet
        // chooses again.
        LB4_CT.insert(key, value, 0).map_err(i64::from)
    }
    #[inline(always)]
    fn ct_remove(key: &Ct4Key) {
        let _ = LB4_CT.remove(key);
    }
    #[inline(always)]
    fn in_cluster(src: &u32) -> bool {
        CLUSTER_CIDR4.get(Key::new(32, *src)).is_some()
    }
    #[inline(always)]
    fn source_allowed(rev_nat_index: u32, src: &u32) -> bool {
        let data = SourceRange4 {
            rev_nat_index_be: rev_nat_index.to_be(),
            address_be: *src,
        };
        LB4_SOURCE_RANGES.get(Key::new(64, data)).is_some()
    }
}

impl Wire for V6 {
    type CtKey = Ct6Key;
    type CtValue = Ct6Value;

    /// Not inlined: the addresses' copies stay off its callers' stack frames.
    #[inline(never)]
    fn parse(ctx: &TcContext) -> Option<Packet<[u8; 16]>> {
        let version: u8 = read(ctx, ETH_HLEN)?;
        if version >> 4 != 6 {
            return None;
        }
        // Extension headers (fragments among them) are not followed: such packets
        // pass untouched, as the node's own stack would see them.
        let next: u8 = read(ctx, IP6_NEXT)?;
        let (src, dst) = (read(ctx, IP6_SRC)?, read(ctx, IP6_DST)?);
        let l4_len = u16::from_be(read(ctx, IP6_PAYLOAD_LEN)?);
        Packet::l4_fields(ctx, (src, dst), next, ETH_HLEN + IP6_HLEN, l4_len)
    }

    #[inline(always)]
    fn rewrite(
        ctx: &TcContext,
        packet: &Packet<[u8; 16]>,
        dst: bool,
        to: ([u8; 16], u16),
    ) -> Option<()> {
        let (old, at) = if dst {
            (packet.dst, IP6_DST)
        } else {
            (packet.src, IP6_SRC)
        };
        // IPv6 has no header checksum: only the pseudo header in the L4 one changes.
        if let Some((csum_at, mangled)) = packet.csum() {
            let (mut from, mut into) = (words(old), words(to.0));
            // SAFETY: both buffers are 16 readable bytes on the stack.
            let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, into.as_mut_ptr(), 16, 0) };
            let diff = u64::try_from(diff).ok()?;
            ctx.l4_csum_replace(csum_at, 0, diff, BPF_F_PSEUDO_HDR | mangled)
                .ok()?;
        }
        ctx.store(at, &to.0, 0).ok()?;
        packet.rewrite_port(ctx, dst, to.1)
    }

    #[inline(always)]
    fn same(a: &[u8; 16], b: &[u8; 16]) -> bool {
        let (a, b) = (words(*a), words(*b));
        a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
    }
    #[inline(always)]
    fn fold(address: &[u8; 16]) -> u32 {
        let w = words(*address);
        w[0] ^ w[1].rotate_left(8) ^ w[2].rotate_left(16) ^ w[3].rotate_left(24)
    }
    #[inline(always)]
    fn client(address: &[u8; 16]) -> u64 {
        let w = words(*address);
        // Two clients may share a key only if these 63 bits of their addresses agree.
        let high = u64::from(w[0] ^ w[1]) << 32;
        ADDRESS_CLIENT | ((high | u64::from(w[2] ^ w[3].rotate_left(16))) & !ADDRESS_CLIENT)
    }
    #[inline(always)]
    fn ct_key(src: [u8; 16], dst: [u8; 16], ports: (u16, u16), proto: u8, dir: u8) -> Ct6Key {
        Ct6Key {
            src,
            dst,
            sport_be: ports.0,
            dport_be: ports.1,
            proto,
            direction: dir,
            pad: [0; 2],
        }
    }
    #[inline(always)]
    fn ct_get(key: &Ct6Key) -> Option<*mut Ct6Value> {
        LB6_CT.get_ptr_mut(key)
    }
    #[inline(always)]
    fn ct_read(value: &Ct6Value) -> Flow<[u8; 16]> {
        Flow {
            nat: value.nat,
            nat_port_be: value.nat_port_be,
            rev_nat_index: value.rev_nat_index,
            backend_id: value.backend_id,
            flags: value.flags,
        }
    }
    #[inline(always)]
    fn ct_touch(value: *mut Ct6Value, now_ns: u64, closing: bool) {
        // SAFETY: as for IPv4.
        unsafe {
            touch(
                &mut (*value).last_seen_ns,
                &mut (*value).flags,
                now_ns,
                closing,
            )
        }
    }
    #[inline(always)]
    fn ct_value(flow: &Flow<[u8; 16]>, now_ns: u64) -> Ct6Value {
        Ct6Value {
            last_seen_ns: now_ns,
            nat: flow.nat,
            nat_port_be: flow.nat_port_be,
            rev_nat_index: flow.rev_nat_index,
            backend_id: flow.backend_id,
            flags: flow.flags,
            pad: [0; 5],
        }
    }
    #[inline(always)]
    fn ct_retarget(value: &mut Ct6Value, to: &([u8; 16], u16)) {
        value.nat = to.0;
        value.nat_port_be = to.1;
    }
    #[inline(always)]
    fn ct_put(key: &Ct6Key, value: &Ct6Value) -> Result<(), i64> {
        // As for IPv4: LRU.
        LB6_CT.insert(key, value, 0).map_err(i64::from)
    }
    #[inline(always)]
    fn ct_remove(key: &Ct6Key) {
        let _ = LB6_CT.remove(key);
    }
    #[inline(always)]
    fn in_cluster(src: &[u8; 16]) -> bool {
        CLUSTER_CIDR6.get(Key::new(128, *src)).is_some()
    }
    #[inline(always)]
    fn source_allowed(rev_nat_index: u32, src: &[u8; 16]) -> bool {
        let data = SourceRange6 {
            rev_nat_index_be: rev_nat_index.to_be(),
            address: *src,
        };
        LB6_SOURCE_RANGES.get(Key::new(160, data)).is_some()
    }
}

/// Another packet of a flow: its time is written only when a second has passed (the
/// sweep's timeouts are 10 s and more), so a busy flow does not dirty its entry's cache
/// line on every packet; a FIN or RST marks it closing once.
#[inline(always)]
fn touch(last_seen_ns: &mut u64, flags: &mut u8, now_ns: u64, closing: bool) {
    if now_ns.wrapping_sub(*last_seen_ns) >= TOUCH_EVERY_NS {
        *last_seen_ns = now_ns;
    }
    if closing && *flags & CT_FLAG_CLOSING == 0 {
        *flags |= CT_FLAG_CLOSING;
    }
}
