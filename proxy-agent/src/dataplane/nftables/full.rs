//! A full load in two steps: the fixed part of every table (hooks, sets, dispatch and
//! mark chains: a few dozen lines) through `nft -f`, then each Service table's chains,
//! rules and dispatch elements as netlink batches, encoded on a thread of their own
//! while the kernel takes the previous one (`nft` took ten seconds to parse the 70 MiB
//! text of 30 000 Services). What is outside the netlink grammar goes through `nft -f`.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::Path,
    sync::mpsc,
};

use super::{
    load::load_in,
    rendered::Rendered,
    ruleset::{removal_of, Existing, DISPATCH},
    table::{Set, Table, TableKey, TABLE},
    wire::{Batch, BatchWriter, Wire},
    NftError,
};
use crate::model::DesiredState;

/// A table not there before is written in batches of about this size (it serves no
/// traffic until its dispatch maps are filled, last); one that is there, in one. Every
/// commit walks every chain of the network namespace, so fewer, larger batches load
/// faster (10 000 Services: 2.7 s in 4 MiB batches, 2.1 s in one per table), while two
/// batches are alive at once (one committed, the next encoded): at 30 000 Services a
/// table is 18 MiB, here written in two.
const CHUNK: usize = 12 << 20;

/// What a full load wrote.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Statements (lines of the first step, then each table's).
    pub statements: usize,
    /// Netlink batches committed.
    pub batches: usize,
    /// Per table, the chains that were there, are flushed now and are no longer wanted
    /// (deleted by the next sync, once nothing refers to them).
    pub stale: BTreeMap<TableKey, BTreeSet<String>>,
}

/// One piece of a Service table's second step, in the order they are committed.
enum Piece {
    Batch(Batch, usize),
    /// Statements for `nft -f`, and how many.
    Text(String, usize),
    /// The table is written; over a table that was there, the Service chains wanted.
    Done(HashSet<String>),
}

/// Loads `tables` (the live ones of `rendered`, made from `desired`) over what the kernel
/// holds of ours (`existing`) without deleting a table that stays: a table that was
/// there is written in one transaction that flushes its Service chains and dispatch maps
/// and fills them again, so traffic sees the old table or the new one, and the clients
/// affinity sets remember are kept (a table deleted and loaded again would forget them).
/// Our tables that are no longer wanted are deleted.
///
/// # Errors
/// When `nft` or the kernel refuses a step; the steps before it stay committed.
pub fn load(
    netns: Option<&Path>,
    mut wire: Option<&mut Wire>,
    tables: &[Table],
    existing: &BTreeMap<TableKey, Existing>,
    rendered: &Rendered,
    desired: &DesiredState,
) -> Result<Loaded, NftError> {
    let mut fixed = String::new();
    let _ = write_fixed(tables, existing, &mut fixed);
    load_in(netns, &fixed)?;
    let mut loaded = Loaded {
        statements: fixed.lines().count(),
        ..Loaded::default()
    };
    let services: Vec<&Table> = tables.iter().filter(|t| t.name != TABLE).collect();
    let netlink = wire.is_some();
    std::thread::scope(|scope| {
        // One piece ahead: the next is encoded while the kernel takes this one.
        let (send, receive) = mpsc::sync_channel::<(usize, Piece)>(1);
        let tables = &services;
        std::thread::Builder::new()
            .name("nft-encode".to_owned())
            .spawn_scoped(scope, move || {
                for (at, table) in tables.iter().enumerate() {
                    let held = existing.get(&table.key());
                    let ports = || rendered.service_ports(&table.key(), desired);
                    let mut give = |piece| send.send((at, piece)).is_ok();
                    if !prepare(table, held, netlink, ports, &mut give) {
                        // The load stopped at an error.
                        return;
                    }
                }
            })
            .map_err(NftError::Spawn)?;
        for (at, piece) in receive {
            let table = services[at];
            match piece {
                Piece::Batch(batch, statements) => {
                    if let Some(wire) = wire.as_deref_mut() {
                        wire.commit(&batch)?;
                    }
                    loaded.statements += statements;
                    loaded.batches += 1;
                }
                Piece::Text(text, statements) => {
                    load_in(netns, &text)?;
                    loaded.statements += statements;
                }
                Piece::Done(wanted) => {
                    let Some(held) = existing.get(&table.key()) else {
                        continue;
                    };
                    let gone: BTreeSet<String> = held
                        .chains
                        .iter()
                        .filter(|name| !table.chains.contains_key(*name) && !wanted.contains(*name))
                        .cloned()
                        .collect();
                    if !gone.is_empty() {
                        loaded.stale.insert(table.key(), gone);
                    }
                }
            }
        }
        tracing::debug!(
            statements = loaded.statements,
            batches = loaded.batches,
            "full load committed"
        );
        Ok(loaded)
    })
}

/// Makes one Service table's pieces and gives them to `give` (false: nobody takes them
/// any more, and so is the return). A table that was there is one batch (or one text,
/// when a statement is outside the grammar); one that was not is batches of ports, a
/// text of the ports outside the grammar, then its dispatch elements.
fn prepare<I: Iterator<Item = Table>>(
    table: &Table,
    held: Option<&Existing>,
    netlink: bool,
    ports: impl Fn() -> I,
    give: &mut dyn FnMut(Piece) -> bool,
) -> bool {
    let mut wanted = HashSet::new();
    if held.is_some() || !netlink {
        let mut batch = BatchWriter::default();
        let mut encoded = netlink && batch.push_all(&prefix(table, held));
        if encoded {
            for port in ports() {
                wanted.extend(port.chains.keys().cloned());
                if !batch.push_all(&port_statements(table, held, &port)) {
                    encoded = false;
                    break;
                }
            }
        }
        encoded = encoded && batch.push_all(&elements(table));
        let piece = if encoded {
            let n = batch.len();
            batch.finish().map(|b| Piece::Batch(b, n))
        } else {
            let mut statements = prefix(table, held);
            wanted.clear();
            for port in ports() {
                wanted.extend(port.chains.keys().cloned());
                statements.extend(port_statements(table, held, &port));
            }
            statements.extend(elements(table));
            Some(Piece::Text(joined(&statements), statements.len()))
        };
        return piece.is_none_or(&mut *give) && give(Piece::Done(wanted));
    }
    let mut batch = BatchWriter::default();
    let mut text = Vec::new();
    for port in ports() {
        let statements = port_statements(table, None, &port);
        if !batch.push_all(&statements) {
            text.extend(statements);
        }
        if batch.size() >= CHUNK {
            let n = batch.len();
            let full = std::mem::take(&mut batch);
            if !full.finish().is_none_or(|b| give(Piece::Batch(b, n))) {
                return false;
            }
        }
    }
    let elements = elements(table);
    // With every port encoded, the elements end the last batch (each commit costs a
    // walk over every chain of the network namespace).
    if text.is_empty() && batch.push_all(&elements) {
        let n = batch.len();
        return batch.finish().is_none_or(|b| give(Piece::Batch(b, n)))
            && give(Piece::Done(wanted));
    }
    let n = batch.len();
    if !batch.finish().is_none_or(|b| give(Piece::Batch(b, n))) {
        return false;
    }
    if !text.is_empty() && !give(Piece::Text(joined(&text), text.len())) {
        return false;
    }
    let mut batch = BatchWriter::default();
    let piece = if batch.push_all(&elements) {
        let n = batch.len();
        batch.finish().map(|b| Piece::Batch(b, n))
    } else {
        Some(Piece::Text(joined(&elements), elements.len()))
    };
    piece.is_none_or(&mut *give) && give(Piece::Done(wanted))
}

fn joined(statements: &[String]) -> String {
    let mut text = statements.join("\n");
    text.push('\n');
    text
}

/// The first step: our tables no longer wanted are deleted; each wanted one is made (or
/// over one that is there, its fixed chains and the cluster CIDRs are flushed and written
/// again) with its hooks, counters, sets, fixed chains and empty dispatch maps. The main
/// tables, fixed only, are flushed and written whole.
///
/// # Errors
/// When `out` refuses the text.
pub fn write_fixed(
    tables: &[Table],
    existing: &BTreeMap<TableKey, Existing>,
    out: &mut dyn std::fmt::Write,
) -> std::fmt::Result {
    let wanted: BTreeSet<TableKey> = tables.iter().map(Table::key).collect();
    for (family, name) in existing.keys().filter(|key| !wanted.contains(*key)) {
        writeln!(out, "delete table {family} {name}")?;
    }
    for table in tables {
        let (family, name) = (table.family, &table.name);
        let mut fixed = table.clone();
        for set in DISPATCH {
            if let Some(set) = fixed.sets.get_mut(set) {
                set.elements.clear();
            }
        }
        match existing.get(&table.key()) {
            None => out.write_str(&removal_of(family, name))?,
            Some(held) if name == TABLE => {
                writeln!(
                    out,
                    "add table {family} {name}\nflush table {family} {name}"
                )?;
                for (set, kind) in held
                    .sets
                    .iter()
                    .filter(|(s, _)| !table.sets.contains_key(*s))
                {
                    writeln!(out, "delete {kind} {family} {name} {set}")?;
                }
            }
            Some(held) => {
                for chain in table.chains.keys().filter(|c| held.chains.contains(*c)) {
                    writeln!(out, "flush chain {family} {name} {chain}")?;
                }
                for (set, kind) in &held.sets {
                    let refilled = fixed
                        .sets
                        .get(set)
                        .is_some_and(|s| !s.dynamic && !s.elements.is_empty());
                    if refilled {
                        writeln!(out, "flush {kind} {family} {name} {set}")?;
                    }
                }
            }
        }
        fixed.write_text(out)?;
    }
    Ok(())
}

/// Over a table that is there: its Service chains flushed, its dispatch maps emptied,
/// and the sets no Service names any more deleted (after the chains naming them).
fn prefix(table: &Table, held: Option<&Existing>) -> Vec<String> {
    let (family, name) = (table.family, &table.name);
    let Some(held) = held else {
        return Vec::new();
    };
    let mut out: Vec<String> = held
        .chains
        .iter()
        .filter(|c| !table.chains.contains_key(*c))
        .map(|chain| format!("flush chain {family} {name} {chain}"))
        .collect();
    for set in DISPATCH {
        if let Some(kind) = held.sets.get(set) {
            out.push(format!("flush {kind} {family} {name} {set}"));
        }
    }
    for (set, kind) in held
        .sets
        .iter()
        .filter(|(s, _)| !table.sets.contains_key(*s))
    {
        out.push(format!("delete {kind} {family} {name} {set}"));
    }
    out
}

/// One Service port's chains (those not there yet declared first), then their rules.
fn port_statements(table: &Table, held: Option<&Existing>, port: &Table) -> Vec<String> {
    let (family, name) = (table.family, &table.name);
    let mut out = Vec::new();
    for (chain, spec) in &port.chains {
        if !held.is_some_and(|h| h.chains.contains(chain)) {
            out.push(table.add_chain(chain, spec));
        }
    }
    for (chain, spec) in &port.chains {
        for rule in &spec.rules {
            out.push(format!("add rule {family} {name} {chain} {rule}"));
        }
    }
    out
}

/// The dispatch elements, which name the Service chains.
fn elements(table: &Table) -> Vec<String> {
    let (family, name) = (table.family, &table.name);
    let mut out = Vec::new();
    for set in DISPATCH {
        for (key, value) in table.sets.get(set).into_iter().flat_map(|s| &s.elements) {
            out.push(format!(
                "add element {family} {name} {set} {{ {} }}",
                Set::element(key, value)
            ));
        }
    }
    out
}
