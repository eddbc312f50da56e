//! The packet-flow oracle: what the desired state says must happen to one new
//! connection (source, protocol, destination, port). Every dataplane is checked against
//! it, case by case (kube-proxy's `packetFlowTest` idea), and `trace` explains it.
use std::{fmt, net::IpAddr};

use super::{
    node::NodeInfo,
    types::{
        Backend, DesiredState, EmptyVerdict, Frontend, FrontendKey, FrontendKind, Protocol,
        SourceClass,
    },
};

/// The first packet of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub source: IpAddr,
    pub protocol: Protocol,
    pub destination: IpAddr,
    pub port: u16,
    /// The interface it arrived on (`None`: sent by the node, or not said), which
    /// interface-based local detection decides by.
    pub interface: Option<IfName>,
}

/// An interface name as the kernel bounds it (15 bytes), kept inline so a packet is `Copy`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IfName {
    bytes: [u8; 15],
    len: u8,
}

impl IfName {
    /// `None` for a name the kernel would refuse (empty, or longer than 15 bytes).
    #[must_use]
    pub fn new(name: &str) -> Option<Self> {
        let len = name.len();
        if len == 0 || len > 15 {
            return None;
        }
        let mut bytes = [0; 15];
        bytes[..len].copy_from_slice(name.as_bytes());
        Some(Self {
            bytes,
            len: u8::try_from(len).ok()?,
        })
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Debug for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not a Service address: the dataplane leaves the packet alone.
    Pass,
    /// Refused (TCP RST / ICMP port unreachable): the Service has no endpoints.
    Reject,
    /// Silently dropped: a Local policy leaves none here, or a source range forbids it.
    Drop,
    /// Sent to one of `backends`.
    Forward {
        backends: Vec<Backend>,
        /// Source NAT to the node for this class of client.
        masquerade: bool,
        /// The client is itself one of the backends: a connection to itself is
        /// masqueraded so the reply comes back through the node.
        hairpin: bool,
        /// `sessionAffinity: ClientIP` timeout: the client sticks to its first backend.
        affinity: Option<u32>,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pass => f.write_str("PASS"),
            Self::Reject => f.write_str("REJECT"),
            Self::Drop => f.write_str("DROP"),
            Self::Forward {
                backends,
                masquerade,
                hairpin,
                affinity,
            } => {
                let list: Vec<String> = backends.iter().map(ToString::to_string).collect();
                f.write_str(&list.join(","))?;
                if *masquerade {
                    f.write_str(" masq")?;
                }
                if *hairpin {
                    f.write_str(" hairpin")?;
                }
                if let Some(seconds) = affinity {
                    write!(f, " affinity={seconds}")?;
                }
                Ok(())
            }
        }
    }
}

/// Why a packet got its outcome, for `trace`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision<'a> {
    pub frontend: Option<(FrontendKey, &'a Frontend)>,
    pub class: SourceClass,
    pub outcome: Outcome,
    pub reason: String,
}

/// The outcome for `packet` on `node`.
#[must_use]
pub fn evaluate(state: &DesiredState, node: &NodeInfo, packet: Packet) -> Outcome {
    decide(state, node, packet).outcome
}

/// The outcome with the frontend matched and the reason, in words.
#[must_use]
pub fn decide<'a>(state: &'a DesiredState, node: &NodeInfo, packet: Packet) -> Decision<'a> {
    let interface = packet.interface;
    let class = node.classify(packet.source, interface.as_ref().map(IfName::as_str));
    let key = FrontendKey {
        ip: packet.destination,
        port: packet.port,
        protocol: packet.protocol,
    };
    let Some(frontend) = state.frontends.get(&key).map(AsRef::as_ref) else {
        return Decision {
            frontend: None,
            class,
            outcome: Outcome::Pass,
            reason: format!("{key} is not a Service frontend on node {}", node.name),
        };
    };
    let found = Some((key, frontend));
    let allowed = frontend.source_ranges.is_empty()
        || frontend
            .source_ranges
            .iter()
            .any(|r| r.contains(&packet.source));
    if frontend.kind == FrontendKind::LoadBalancer && !allowed {
        return Decision {
            frontend: found,
            class,
            outcome: Outcome::Drop,
            reason: format!("{} is outside loadBalancerSourceRanges", packet.source),
        };
    }
    let route = frontend.route(class);
    if route.backends.is_empty() {
        let (outcome, reason) = match route.when_empty {
            EmptyVerdict::Reject => (Outcome::Reject, "the Service has no usable endpoints"),
            EmptyVerdict::Drop => (
                Outcome::Drop,
                "a Local traffic policy leaves no endpoint on this node",
            ),
        };
        return Decision {
            frontend: found,
            class,
            outcome,
            reason: reason.to_owned(),
        };
    }
    let hairpin = route.backends.iter().any(|b| b.ip == packet.source);
    Decision {
        frontend: found,
        class,
        outcome: Outcome::Forward {
            backends: route.backends.to_vec(),
            masquerade: route.masquerade,
            hairpin,
            affinity: frontend.affinity_timeout,
        },
        reason: format!("{:?} client of a {} frontend", class, frontend.kind),
    }
}
