//! The live agent's last programmed state, kept for questions asked of the running
//! agent (`trace` without `--manifests`), answered over HTTP beside `/metrics`.
use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, PoisonError, RwLock},
};

use axum::{
    extract::{Query, State},
    http::StatusCode,
    Json,
};

use crate::model::{
    self,
    flow::{IfName, Packet},
    DesiredState, NodeInfo, Protocol, Snapshot,
};

/// What the kernel was last programmed from.
pub struct Programmed {
    pub snapshot: Arc<Snapshot>,
    pub node: NodeInfo,
    pub desired: Arc<DesiredState>,
}

/// Shared between the sync loop (writer) and the debug endpoints (readers).
#[derive(Default)]
pub struct Live {
    state: RwLock<Option<Arc<Programmed>>>,
    /// The dataplane running and where its maps are pinned, for existing flows.
    dataplane: &'static str,
    bpffs: PathBuf,
}

impl Live {
    #[must_use]
    pub fn new(dataplane: &'static str, bpffs: PathBuf) -> Self {
        Self {
            state: RwLock::default(),
            dataplane,
            bpffs,
        }
    }

    pub fn set(&self, programmed: Programmed) {
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(programmed));
    }

    pub fn get(&self) -> Option<Arc<Programmed>> {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Parses `IP:PORT[/proto]` (IPv6 as `[IP]:PORT`).
pub fn parse_destination(to: &str) -> Result<(IpAddr, u16, Protocol), String> {
    let (address, protocol) = match to.rsplit_once('/') {
        Some((address, proto)) => (address, proto.to_uppercase()),
        None => (to, "TCP".to_owned()),
    };
    let destination: std::net::SocketAddr = address
        .parse()
        .map_err(|_| format!("{address}: want IP:PORT or [IP]:PORT"))?;
    let protocol = Protocol::from_k8s(Some(&protocol))
        .ok_or_else(|| format!("protocol {protocol}: want tcp, udp or sctp"))?;
    Ok((destination.ip(), destination.port(), protocol))
}

/// The query of `/debug/trace`.
#[derive(serde::Deserialize)]
pub struct TraceQuery {
    from: Option<String>,
    to: Option<String>,
    /// The interface the packet arrives on (interface-based local detection).
    iif: Option<String>,
}

/// `GET /debug/trace?from=IP&to=IP:PORT[/proto][&iif=NAME]`: the `trace` JSON for that connection.
pub async fn trace(
    State(live): State<Arc<Live>>,
    Query(query): Query<TraceQuery>,
) -> Result<Json<model::explain::Trace>, (StatusCode, String)> {
    let bad = |message: String| (StatusCode::BAD_REQUEST, message);
    let from: IpAddr = query
        .from
        .as_deref()
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| bad("from=IP is required".into()))?;
    let to = query
        .to
        .as_ref()
        .ok_or_else(|| bad("to=IP:PORT[/proto] is required".into()))?;
    let (destination, port, protocol) = parse_destination(to).map_err(bad)?;
    let interface = query
        .iif
        .as_deref()
        .map(|name| {
            IfName::new(name).ok_or_else(|| bad(format!("iif={name}: not an interface name")))
        })
        .transpose()?;
    let programmed = live.get().ok_or_else(|| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "nothing programmed yet".to_owned(),
        )
    })?;
    let packet = Packet {
        source: from,
        protocol,
        destination,
        port,
        interface,
    };
    let mut trace = model::explain::trace(
        &programmed.snapshot,
        &programmed.desired,
        &programmed.node,
        packet,
    );
    if trace.frontend.is_some() {
        let eligible = trace
            .endpoints
            .iter()
            .filter(|e| e.eligible)
            .map(|e| e.endpoint.clone())
            .collect();
        let frontend = model::FrontendKey {
            ip: destination,
            port,
            protocol,
        };
        let (dataplane, bpffs) = (live.dataplane, live.bpffs.clone());
        trace.flows = tokio::task::spawn_blocking(move || {
            crate::debug::flows::existing(dataplane, &bpffs, from, frontend, &eligible)
        })
        .await
        .unwrap_or_default();
    }
    Ok(Json(trace))
}

/// `GET /debug/frontends`: every programmed frontend with its Service port name, so
/// tools reading the kernel (which keeps only addresses) can name what they show.
pub async fn frontends(State(live): State<Arc<Live>>) -> Json<Vec<crate::debug::FrontendName>> {
    let list = live
        .get()
        .map(|p| {
            p.desired
                .frontends
                .iter()
                .map(|(key, f)| crate::debug::FrontendName {
                    frontend: key.to_string(),
                    service: f.service.to_string(),
                    kind: f.kind.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    Json(list)
}
