//! The per-packet programs run on crafted packets through `BPF_PROG_TEST_RUN`: the real
//! object and maps, written by the agent's own map writer, with no network at all.
#![allow(
    unsafe_code,
    reason = "BPF_PROG_TEST_RUN has no safe wrapper in aya; one bpf(2) call"
)]
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Map, MapData,
    },
    programs::SchedClassifier,
    Ebpf, EbpfLoader,
};
use proxy_agent::{
    dataplane::ebpf::{kernel::KernelMaps, loader, nodeport, MapWriter},
    model::{
        diff, Backend, DesiredState, EmptyVerdict, Frontend, FrontendKind, Route, ServicePortName,
    },
};

/// `TC_ACT_OK` and `TC_ACT_SHOT`.
pub const PASS: u32 = 0;
pub const DROP: u32 = 2;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// `sizeof(struct __sk_buff)`, and where `mark` sits in it.
const SKB_SIZE: usize = 192;
const SKB_MARK: usize = 8;

/// The object loaded with its maps pinned in a directory of its own.
pub struct Programs {
    ebpf: Ebpf,
    dir: PathBuf,
    writer: Writer,
}

/// The agent's map writer over the pinned maps, and what it programmed.
pub struct Writer {
    writer: MapWriter<KernelMaps>,
    programmed: DesiredState,
}

impl Writer {
    /// Programs `desired` as the agent would.
    ///
    /// # Panics
    /// When a map write fails.
    pub fn program(&mut self, desired: &DesiredState) {
        self.writer
            .apply(&diff(&self.programmed, desired))
            .expect("map writes");
        self.programmed = desired.clone();
    }
}

/// What a program did to one packet.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: u32,
    pub packet: Vec<u8>,
    pub mark: u32,
}

impl Programs {
    /// Loads the embedded object; `tag` names its pin directory.
    ///
    /// # Panics
    /// When the object or the kernel refuses (these tests need root).
    #[must_use]
    pub fn load(tag: &str) -> Self {
        Self::load_with(tag, None)
    }

    /// [`Self::load`] with the kernel programs' log level set as the agent sets it
    /// (`Some(0)`: off, its default; `Some(4)`: debug, with `-v`), or left at the
    /// object's default (every record on) with `None`.
    ///
    /// # Panics
    /// As [`Self::load`].
    #[must_use]
    pub fn load_with(tag: &str, kernel_log_level: Option<&'static u8>) -> Self {
        crate::cluster::ensure_bpffs();
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/pa-progtest-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pin directory");
        // Unless told, the kernel log level stays at the object's default (every record
        // on), unlike the agent's (off unless `-v`): the verifier checks the records'
        // code too.
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&dir);
        if let Some(level) = kernel_log_level {
            loader.override_global("AYA_LOG_LEVEL", level, true);
        }
        let mut ebpf = loader.load(loader::object()).expect("eBPF object");
        for name in [nodeport::INGRESS_PROGRAM, nodeport::EGRESS_PROGRAM] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .expect("program")
                .try_into()
                .expect("classifier");
            program.load().expect("verifier");
        }
        let writer = Writer {
            writer: MapWriter::restore(KernelMaps::from_pins(&dir).expect("pinned maps"))
                .expect("writer"),
            programmed: DesiredState::default(),
        };
        Self { ebpf, dir, writer }
    }

    /// Programs `desired` as the agent would.
    ///
    /// # Panics
    /// When a map write fails.
    pub fn program(&mut self, desired: &DesiredState) {
        self.writer.program(desired);
    }

    /// A writer of its own over the same maps, starting from what was programmed
    /// here, for a thread that rewrites them while packets run (as the agent's sync
    /// thread does while the programs run on every CPU). Programs nothing through
    /// [`Self::program`] while it is in use.
    ///
    /// # Panics
    /// When the pinned maps cannot be opened or read.
    #[must_use]
    pub fn second_writer(&self) -> Writer {
        Writer {
            writer: MapWriter::restore(KernelMaps::from_pins(&self.dir).expect("pinned maps"))
                .expect("writer"),
            programmed: self.writer.programmed.clone(),
        }
    }

    /// Sets the cluster CIDRs (sources taking the pod route).
    ///
    /// # Panics
    /// When the map cannot be written.
    pub fn cluster_cidr(&self, network: Ipv4Addr, prefix_len: u32) {
        let data = MapData::from_pin(self.dir.join(proxy_common::MAP_CLUSTER_CIDR4)).expect("pin");
        let mut trie: LpmTrie<MapData, u32, u8> =
            LpmTrie::try_from(Map::LpmTrie(data)).expect("trie");
        trie.insert(
            &Key::new(prefix_len, u32::from_ne_bytes(network.octets())),
            1,
            0,
        )
        .expect("insert");
    }

    /// Deletes one backend slot of an IPv4 frontend (pod scope) behind the writer's
    /// back, leaving a count its slots do not back: what a program sees when the agent
    /// shrinks the frontend between its two reads.
    ///
    /// # Panics
    /// When the map cannot be opened or the slot is not there.
    pub fn delete_slot(&self, frontend: SocketAddrV4, proto: u8, slot: u16) {
        let mut services: aya::maps::HashMap<
            MapData,
            proxy_common::Service4Key,
            proxy_common::ServiceValue,
        > = self.hash_map(proxy_common::MAP_SERVICES4, Map::HashMap);
        let key = proxy_common::Service4Key {
            address_be: u32::from(*frontend.ip()).to_be(),
            dport_be: frontend.port().to_be(),
            backend_slot: slot,
            proto,
            scope: 0,
            pad: [0; 2],
        };
        services.remove(&key).expect("the slot");
    }

    /// Deletes an IPv4 backend behind the writer's back while its frontends still name
    /// it: what a program sees when the agent deletes a backend between its reads.
    ///
    /// # Panics
    /// When the map cannot be opened or holds no such backend.
    pub fn delete_backend(&self, backend: SocketAddrV4, proto: u8) {
        let mut backends: aya::maps::HashMap<MapData, u32, proxy_common::Backend4> =
            self.hash_map(proxy_common::MAP_BACKENDS4, Map::HashMap);
        let id = backends
            .iter()
            .filter_map(Result::ok)
            .find(|(_, b)| {
                b.address_be == u32::from(*backend.ip()).to_be()
                    && b.port_be == backend.port().to_be()
                    && b.proto == proto
            })
            .map(|(id, _)| id)
            .expect("the backend");
        backends.remove(&id).expect("delete");
    }

    /// The pinned IPv4 flow map.
    fn flows(&self) -> aya::maps::HashMap<MapData, proxy_common::Ct4Key, proxy_common::Ct4Value> {
        self.hash_map(proxy_common::MAP_CT4, Map::LruHashMap)
    }

    /// A pinned hash map of the object (`kind`: plain or LRU).
    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &str,
        kind: fn(MapData) -> Map,
    ) -> aya::maps::HashMap<MapData, K, V> {
        let data = MapData::from_pin(self.dir.join(name)).expect("pin");
        aya::maps::HashMap::try_from(kind(data)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Forgets every flow the programs remember (as if each packet were a new flow).
    ///
    /// # Panics
    /// When the map cannot be read or written.
    pub fn forget_flows(&self) {
        let mut flows = self.flows();
        let keys: Vec<proxy_common::Ct4Key> = flows.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = flows.remove(&key);
        }
    }

    /// Fills the flow map with `count` made-up forward entries (clients in
    /// 198.18.0.0/15, seen now), as a flood of flows would.
    ///
    /// # Panics
    /// When the map cannot be written.
    pub fn fill_flows(&self, count: u32) {
        let mut flows = self.flows();
        let now = proxy_agent::dataplane::system::monotonic_ns();
        for i in 0..count {
            let key = proxy_common::Ct4Key {
                src_be: u32::from(Ipv4Addr::new(198, 18, 0, 0))
                    .wrapping_add(i >> 8)
                    .to_be(),
                dst_be: u32::from(Ipv4Addr::new(10, 100, 0, 1)).to_be(),
                sport_be: u16::try_from(1024 + (i & 0xff)).expect("port").to_be(),
                dport_be: 30080u16.to_be(),
                proto: proxy_common::PROTO_TCP,
                direction: proxy_common::CT_FORWARD,
                pad: [0; 2],
            };
            let value = proxy_common::Ct4Value {
                last_seen_ns: now,
                ..proxy_common::Ct4Value::default()
            };
            flows.insert(key, value, 0).expect("insert");
        }
    }

    /// Entries in the flow map now.
    ///
    /// # Panics
    /// When the map cannot be read.
    #[must_use]
    pub fn flow_count(&self) -> usize {
        let flows = self.flows();
        flows.keys().filter_map(Result::ok).count()
    }

    /// One garbage-collection sweep as the agent runs it, at `now_ns` (`CLOCK_MONOTONIC`).
    ///
    /// # Panics
    /// When the map cannot be swept.
    #[must_use]
    pub fn sweep_flows(&self, now_ns: u64) -> usize {
        proxy_agent::dataplane::ebpf::flows::sweep(&self.dir, now_ns).expect("sweep")
    }

    /// Runs the ingress or egress program once on `packet` (Ethernet frame).
    ///
    /// # Panics
    /// When the kernel refuses the run.
    #[must_use]
    pub fn run(&self, ingress: bool, packet: &[u8]) -> Outcome {
        self.run_repeated(ingress, packet, 1).0
    }

    /// The kernel programs' debug records (aya-log) written since the last call, as the
    /// agent's `-v` would log them.
    ///
    /// # Panics
    /// When the object has no record ring buffer left to read (taken by an earlier call).
    pub fn kernel_records(&mut self) -> Vec<String> {
        struct Capture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);
        impl log::Log for Capture {
            fn enabled(&self, _: &log::Metadata<'_>) -> bool {
                true
            }
            fn log(&self, record: &log::Record<'_>) {
                self.0.lock().expect("records").push(format!(
                    "{}: {}",
                    record.level(),
                    record.args()
                ));
            }
            fn flush(&self) {}
        }
        let seen = std::sync::Arc::default();
        let mut logger = aya_log::EbpfLogger::init_with_logger(
            &mut self.ebpf,
            Capture(std::sync::Arc::clone(&seen)),
        )
        .expect("the AYA_LOGS ring buffer");
        logger.flush();
        let records = seen.lock().expect("records").clone();
        records
    }

    /// Runs the program `repeat` times on `packet`: the last outcome, and the kernel's
    /// mean time per run in nanoseconds.
    ///
    /// # Panics
    /// When the kernel refuses the run.
    #[must_use]
    pub fn run_repeated(&self, ingress: bool, packet: &[u8], repeat: u32) -> (Outcome, u32) {
        let name = if ingress {
            nodeport::INGRESS_PROGRAM
        } else {
            nodeport::EGRESS_PROGRAM
        };
        let program: &SchedClassifier = self
            .ebpf
            .program(name)
            .expect("program")
            .try_into()
            .expect("classifier");
        let fd = program.fd().expect("loaded").as_fd().as_raw_fd();
        let mut out = vec![0u8; packet.len() + 256];
        let ctx_in = [0u8; SKB_SIZE];
        let mut ctx_out = [0u8; SKB_SIZE];
        let mut attr = [0u8; 80];
        let put32 = |attr: &mut [u8; 80], at: usize, v: u32| {
            attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        };
        let put64 = |attr: &mut [u8; 80], at: usize, v: u64| {
            attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        };
        put32(&mut attr, 0, u32::try_from(fd).expect("fd"));
        put32(&mut attr, 8, u32::try_from(packet.len()).expect("size"));
        put32(&mut attr, 12, u32::try_from(out.len()).expect("size"));
        put64(&mut attr, 16, packet.as_ptr() as u64);
        put64(&mut attr, 24, out.as_mut_ptr() as u64);
        put32(&mut attr, 32, repeat);
        put32(&mut attr, 40, u32::try_from(SKB_SIZE).expect("size"));
        put32(&mut attr, 44, u32::try_from(SKB_SIZE).expect("size"));
        put64(&mut attr, 48, ctx_in.as_ptr() as u64);
        put64(&mut attr, 56, ctx_out.as_mut_ptr() as u64);
        // SAFETY: `attr` is a valid bpf_attr for BPF_PROG_TEST_RUN whose pointers refer to
        // buffers of the sizes given, all alive across the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                attr.as_mut_ptr(),
                attr.len(),
            )
        };
        assert_eq!(
            rc,
            0,
            "BPF_PROG_TEST_RUN: {}",
            std::io::Error::last_os_error()
        );
        let read32 = |bytes: &[u8], at: usize| {
            u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
        };
        let size = usize::try_from(read32(&attr, 12)).expect("size");
        out.truncate(size);
        let outcome = Outcome {
            verdict: read32(&attr, 4),
            packet: out,
            mark: read32(&ctx_out, SKB_MARK),
        };
        (outcome, read32(&attr, 36))
    }
}

impl Drop for Programs {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.dir);
    }
}

/// A route to `backends` (either family), as the model builds them.
#[must_use]
pub fn route<A: Into<std::net::SocketAddr> + Copy>(
    backends: &[A],
    masquerade: bool,
    when_empty: EmptyVerdict,
) -> Route {
    let backends: std::sync::Arc<[Backend]> = backends
        .iter()
        .map(|&b| {
            let b: std::net::SocketAddr = b.into();
            Backend {
                ip: b.ip(),
                port: b.port(),
            }
        })
        .collect();
    Route::new(
        backends,
        masquerade,
        when_empty,
        when_empty == EmptyVerdict::Drop,
    )
}

/// A frontend of Service `default/<name>` with these routes (nodes use the pods').
#[must_use]
pub fn frontend(name: &str, kind: FrontendKind, pod: Route, external: Route) -> Frontend {
    Frontend {
        service: ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port: String::new(),
        },
        kind,
        node: pod.clone(),
        pod,
        external,
        affinity_timeout: None,
        source_ranges: Vec::new(),
        health_check_node_port: None,
        hints_passed_over: None,
    }
}

/// A TCP header with `flags` and its checksum field zero (either family).
pub(crate) fn tcp_header(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    l4[4..8].copy_from_slice(&1000u32.to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = flags;
    l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
    l4
}

/// A UDP datagram with its checksum field zero (either family).
pub(crate) fn udp_datagram(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![0u8; 8];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    let len = u16::try_from(8 + payload.len()).expect("length");
    l4[4..6].copy_from_slice(&len.to_be_bytes());
    l4.extend_from_slice(payload);
    l4
}

/// An SCTP packet: the common header and one chunk of `chunk_type` with four bytes
/// of value (either family). Its CRC-32C is correct, or zero (left to offload) without
/// `crc`.
pub(crate) fn sctp_packet(sport: u16, dport: u16, chunk_type: u8, crc: bool) -> Vec<u8> {
    let mut l4 = vec![0u8; 12];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    l4[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    l4.extend([chunk_type, 0, 0, 8, 1, 2, 3, 4]);
    if crc {
        let sum = crc32c(&l4);
        l4[8..12].copy_from_slice(&sum.to_le_bytes());
    }
    l4
}

/// CRC-32C (Castagnoli), bit by bit, as RFC 9260 appendix A defines SCTP's checksum.
#[must_use]
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The SCTP packet of an IPv4 or IPv6 frame: its stored CRC-32C, and whether that is
/// the CRC of the packet as it is now.
#[must_use]
pub fn sctp_crc(frame: &[u8]) -> (u32, bool) {
    let l4 = if frame[12..14] == [0x86, 0xdd] {
        54
    } else {
        34
    };
    let mut packet = frame[l4..].to_vec();
    let stored = u32::from_le_bytes(packet[8..12].try_into().expect("4 bytes"));
    packet[8..12].fill(0);
    (stored, crc32c(&packet) == stored)
}

/// An Ethernet frame carrying an IPv4 SCTP packet (see [`sctp_crc`]).
#[must_use]
pub fn sctp(src: SocketAddrV4, dst: SocketAddrV4, chunk_type: u8, crc: bool) -> Vec<u8> {
    let l4 = sctp_packet(src.port(), dst.port(), chunk_type, crc);
    frame(src, dst, proxy_common::PROTO_SCTP, l4, usize::MAX)
}

/// An Ethernet frame carrying an IPv4 TCP segment with `flags` (checksums correct).
#[must_use]
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    let l4 = tcp_header(src.port(), dst.port(), flags);
    frame(src, dst, proxy_common::PROTO_TCP, l4, 16)
}

/// An Ethernet frame carrying an IPv4 UDP datagram, with or without a checksum.
#[must_use]
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], checksum: bool) -> Vec<u8> {
    let l4 = udp_datagram(src.port(), dst.port(), payload);
    let at = if checksum { 6 } else { usize::MAX };
    frame(src, dst, proxy_common::PROTO_UDP, l4, at)
}

fn frame(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: u8,
    mut l4: Vec<u8>,
    csum_at: usize,
) -> Vec<u8> {
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    let total = u16::try_from(20 + l4.len()).expect("length");
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    if csum_at != usize::MAX {
        let mut sum = checksum(&[pseudo_header(&ip, l4.len()), l4.clone()].concat());
        if sum == 0 && proto == proxy_common::PROTO_UDP {
            sum = 0xffff;
        }
        l4[csum_at..csum_at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    frame.extend(ip);
    frame.extend(l4);
    frame
}

fn pseudo_header(ip: &[u8], l4_len: usize) -> Vec<u8> {
    let mut pseudo = ip[12..20].to_vec();
    pseudo.extend([0, ip[9]]);
    pseudo.extend(u16::try_from(l4_len).expect("length").to_be_bytes());
    pseudo
}

/// The Internet checksum of `bytes`.
pub(crate) fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded")
}

/// Source and destination of a frame built by [`tcp`] or [`udp`].
#[must_use]
pub fn endpoints(frame: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let ip = &frame[14..];
    let at = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
    let port = |o: usize| u16::from_be_bytes([ip[20 + o], ip[21 + o]]);
    (
        SocketAddrV4::new(at(12), port(0)),
        SocketAddrV4::new(at(16), port(2)),
    )
}

/// Whether the IPv4 header and the TCP/UDP checksums of a frame verify; a zero UDP
/// checksum (none) counts as valid, and is reported by [`udp_checksum`]. SCTP's is
/// [`sctp_crc`]'s.
#[must_use]
pub fn checksums_valid(frame: &[u8]) -> bool {
    let ip = &frame[14..34];
    let l4 = &frame[34..];
    if checksum(ip) != 0 {
        return false;
    }
    if ip[9] == proxy_common::PROTO_SCTP {
        return sctp_crc(frame).1;
    }
    if ip[9] == proxy_common::PROTO_UDP && udp_checksum(frame) == 0 {
        return true;
    }
    checksum(&[pseudo_header(ip, l4.len()), l4.to_vec()].concat()) == 0
}

/// The UDP checksum field of a frame built by [`udp`].
#[must_use]
pub fn udp_checksum(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[40], frame[41]])
}
