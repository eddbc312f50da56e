//! The rows `dump` prints, as a table or as JSON.
use serde::Serialize;

/// A row of a `dump` table.
pub trait Row: Serialize {
    const HEADERS: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// One frontend the dataplane serves.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceRow {
    pub service: String,
    pub frontend: String,
    /// Endpoints it balances over (slots in the eBPF map, KUBE-SEP chains in nftables).
    pub backends: usize,
    /// What happens with no endpoints, or where it goes instead (nftables).
    pub target: String,
    /// Connections/datagrams sent to its backends (eBPF counters).
    pub decisions: Option<u64>,
    /// Connections/datagrams refused (eBPF counters).
    pub rejects: Option<u64>,
}

impl Row for ServiceRow {
    const HEADERS: &'static [&'static str] = &[
        "SERVICE",
        "FRONTEND",
        "BACKENDS",
        "TARGET",
        "DECISIONS",
        "REJECTS",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.service.clone(),
            self.frontend.clone(),
            self.backends.to_string(),
            self.target.clone(),
            or_dash(self.decisions),
            or_dash(self.rejects),
        ]
    }
}

/// One backend (pod address and port) and the Services using it.
#[derive(Debug, Clone, Serialize)]
pub struct BackendRow {
    pub backend: String,
    /// The eBPF backend id, or the KUBE-SEP chain.
    pub id: String,
    pub services: Vec<String>,
    pub decisions: Option<u64>,
}

impl Row for BackendRow {
    const HEADERS: &'static [&'static str] = &["BACKEND", "ID", "SERVICES", "DECISIONS"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.backend.clone(),
            self.id.clone(),
            self.services.join(","),
            or_dash(self.decisions),
        ]
    }
}

/// One flow pinned to a backend.
#[derive(Debug, Clone, Serialize)]
pub struct FlowRow {
    /// `conntrack`, `socket` (the socket LB's per-socket memory) or `packet` (the eBPF
    /// per-packet programs' flow maps).
    pub table: &'static str,
    pub protocol: String,
    pub client: Option<String>,
    pub frontend: String,
    pub service: String,
    pub backend: String,
    pub state: Option<String>,
    pub expires_in: Option<u32>,
    pub socket_cookie: Option<u64>,
}

impl Row for FlowRow {
    const HEADERS: &'static [&'static str] = &[
        "TABLE", "PROTO", "CLIENT", "FRONTEND", "SERVICE", "BACKEND", "STATE", "EXPIRES", "COOKIE",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.table.to_owned(),
            self.protocol.clone(),
            or_dash(self.client.as_ref()),
            self.frontend.clone(),
            self.service.clone(),
            self.backend.clone(),
            or_dash(self.state.as_ref()),
            or_dash(self.expires_in),
            or_dash(self.socket_cookie),
        ]
    }
}

/// One client remembered by `sessionAffinity: ClientIP`.
#[derive(Debug, Clone, Serialize)]
pub struct AffinityRow {
    pub service: String,
    pub client: String,
    pub backend: String,
    pub expires_in: Option<u64>,
}

impl Row for AffinityRow {
    const HEADERS: &'static [&'static str] = &["SERVICE", "CLIENT", "BACKEND", "EXPIRES"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.service.clone(),
            self.client.clone(),
            self.backend.clone(),
            or_dash(self.expires_in),
        ]
    }
}

/// The rows as aligned columns (or pretty JSON).
#[must_use]
pub fn render<R: Row>(rows: &[R], json: bool) -> String {
    if json {
        return serde_json::to_string_pretty(rows).unwrap_or_default() + "\n";
    }
    let cells: Vec<Vec<String>> = rows.iter().map(Row::cells).collect();
    let mut widths: Vec<usize> = R::HEADERS.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |row: &[String]| {
        let padded: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let headers: Vec<String> = R::HEADERS.iter().map(|h| (*h).to_owned()).collect();
    let mut out = line(&headers);
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}
