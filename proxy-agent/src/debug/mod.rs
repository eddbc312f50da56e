//! The packet-path tools that run beside a live agent: `dump` reads what the dataplane
//! holds (pinned maps or the nftables table) and names it through the agent, `monitor`
//! streams the datapath's decisions, `flows` finds a traced connection's existing flows.
pub mod ebpf;
pub mod flows;
pub mod monitor;
pub mod nft;
pub mod packet_flows;
pub mod rows;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::SocketAddr,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tracing::warn;

use crate::cli::{DataplaneKind, DumpArgs, DumpWhat};
use rows::render;

/// `GET path` on the running agent's metrics address (plain HTTP/1.0); the body.
///
/// # Errors
/// When nobody answers there, or the answer is not a 200.
pub fn agent_get(agent: SocketAddr, path: &str) -> Result<String> {
    let mut stream = std::net::TcpStream::connect_timeout(&agent, Duration::from_secs(2))
        .with_context(|| format!("no agent at {agent}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {agent}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!(
            "agent answered: {} {}",
            head.lines().next().unwrap_or_default(),
            body.trim()
        );
    }
    Ok(body.to_owned())
}

/// A frontend the agent programmed, as `/debug/frontends` lists it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FrontendName {
    pub frontend: String,
    pub service: String,
    pub kind: String,
}

/// Service names by frontend (`IP:PORT/PROTO`), and by `PORT/PROTO` for NodePorts;
/// empty (with a warning) when the agent cannot be asked, since the kernel keeps none.
#[derive(Debug, Default)]
pub struct Names {
    by_frontend: BTreeMap<String, String>,
    by_node_port: BTreeMap<String, String>,
}

impl Names {
    #[must_use]
    pub fn ask(agent: SocketAddr) -> Self {
        let listed = agent_get(agent, "/debug/frontends").and_then(|body| {
            serde_json::from_str::<Vec<FrontendName>>(&body).map_err(anyhow::Error::from)
        });
        match listed {
            Ok(list) => Self::from_list(list),
            Err(error) => {
                warn!(%error, "Service names unavailable (the kernel keeps only addresses)");
                Self::default()
            }
        }
    }

    #[must_use]
    pub fn from_list(list: Vec<FrontendName>) -> Self {
        let mut names = Self::default();
        for entry in list {
            if entry.kind == "NodePort" {
                if let Some((_, port)) = entry.frontend.rsplit_once(':') {
                    names
                        .by_node_port
                        .insert(port.to_owned(), entry.service.clone());
                }
            }
            names.by_frontend.insert(entry.frontend, entry.service);
        }
        names
    }

    /// The Service behind `frontend` (`IP:PORT/PROTO`), or `-`.
    #[must_use]
    pub fn of(&self, frontend: &str) -> String {
        self.by_frontend
            .get(frontend)
            .cloned()
            .unwrap_or_else(|| "-".to_owned())
    }

    /// The Service behind a NodePort (`PORT/PROTO`), or `-`.
    #[must_use]
    pub fn of_node_port(&self, port_proto: &str) -> String {
        self.by_node_port
            .get(port_proto)
            .cloned()
            .unwrap_or_else(|| "-".to_owned())
    }
}

/// Which dataplane's state is installed here.
fn installed(args: &DumpArgs) -> Result<DataplaneKind> {
    match args.dataplane {
        DataplaneKind::Auto => {
            if args.bpffs.join(proxy_common::MAP_SERVICES4).exists() {
                Ok(DataplaneKind::Ebpf)
            } else if nft::installed() {
                Ok(DataplaneKind::Nftables)
            } else {
                bail!(
                    "no dataplane state found: no maps under {} and no nftables table {}",
                    args.bpffs.display(),
                    crate::dataplane::nftables::table::TABLE
                )
            }
        }
        DataplaneKind::None => bail!("--dataplane none programs nothing to dump"),
        kind => Ok(kind),
    }
}

/// `proxy-agent dump`.
///
/// # Errors
/// When no dataplane state is installed or it cannot be read.
pub fn dump(args: &DumpArgs) -> Result<()> {
    let names = Names::ask(args.agent);
    let out = if installed(args)? == DataplaneKind::Ebpf {
        let state = ebpf::State::read(&args.bpffs)?;
        match args.what {
            DumpWhat::Services => render(&state.services(&names), args.json),
            DumpWhat::Backends => render(&state.backends(&names), args.json),
            DumpWhat::Conntrack => render(&state.flows(&names), args.json),
            DumpWhat::Affinity => render(&state.affinity(&names), args.json),
        }
    } else {
        let table = nft::Tables::read()?;
        match args.what {
            DumpWhat::Services => render(&table.services(&names), args.json),
            DumpWhat::Backends => render(&table.backends(&names), args.json),
            DumpWhat::Conntrack => render(&nft::flows(&table, &names)?, args.json),
            DumpWhat::Affinity => render(&table.affinity(&names), args.json),
        }
    };
    print!("{out}");
    Ok(())
}
