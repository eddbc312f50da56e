//! nftables dataplane: the ruleset of `ruleset.rs` in our own `ip`/`ip6` tables (a main
//! table and Services spread over up to 16 tables of their own), loaded as one atomic
//! transaction per table and sync: whole at start and after any failure (`full.rs`: the
//! fixed parts through `nft -f`, each Service table as one netlink batch), otherwise
//! only what changed (`rendered.rs` re-renders the changed Service ports, `delta.rs`
//! writes what differs, `wire.rs` commits it without `nft` when it can); then stale UDP
//! conntrack goes.
pub mod delta;
pub mod full;
pub mod listing;
mod load;
pub mod names;
pub mod rendered;
pub mod ruleset;
pub mod table;
pub mod wire;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Stdio,
};

use thiserror::Error;

use tracing::{debug, warn};

pub use self::load::{load, load_in};
use self::{load::nft_in, rendered::Rendered, ruleset::Existing, table::TableKey};
use super::{conntrack, Applied};
use crate::model::{DesiredState, LocalTraffic, Plan};

#[derive(Debug, Error)]
pub enum NftError {
    #[error("cannot run nft: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft rejected the ruleset: {0}")]
    Rejected(String),
}

impl NftError {
    /// A commit refused as the kernel would refuse it, when a fault is armed
    /// (`fault.rs`; never in a build without `fault-hooks`).
    fn fault() -> Result<(), Self> {
        use crate::fault::{self, Point};
        if fault::fails(Point::Nft) {
            return Err(Self::Rejected(fault::injected(Point::Nft).to_string()));
        }
        Ok(())
    }

    /// A short, stable name for metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Spawn(_) => "nft_spawn",
            Self::Rejected(_) => "nft_rejected",
        }
    }
}

/// Removes our tables.
pub fn cleanup() -> Result<(), NftError> {
    load(&ruleset::removal())
}

/// Per table, chains flushed by a sync and deleted by the next.
type Stale = BTreeMap<TableKey, BTreeSet<String>>;

/// What the kernel holds, as far as this process knows.
struct Programmed {
    rendered: Rendered,
    /// The tables the kernel holds (`rendered`'s live ones).
    live: Vec<table::Table>,
    /// The desired state `rendered` was made from.
    from: DesiredState,
    /// Chains flushed by the last sync, deleted by the next.
    stale: Stale,
}

/// One sync's transaction.
pub struct Pending {
    /// Statements in it (a full load counts its lines once written).
    pub ops: usize,
    /// A full load, over what the kernel holds of our tables (written from the tables as
    /// it goes to the kernel).
    pub full: Option<BTreeMap<TableKey, Existing>>,
    /// The statements of a partial transaction (empty for a full load).
    pub partial: delta::Transaction,
}

impl Pending {
    /// Whether there is anything to commit (a full load always is).
    fn is_empty(&self) -> bool {
        self.full.is_none() && self.ops == 0
    }

    /// A full load over tables the kernel holds: when the kernel refuses it (a
    /// declaration changed by an upgrade), the same tables are loaded whole after
    /// deleting them, a text made only then.
    fn over_existing(&self) -> bool {
        self.full
            .as_ref()
            .is_some_and(|existing| !existing.is_empty())
    }
}

/// How the transactions so far went to the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Commits {
    /// Netlink batches: partial transactions, and a full load's Service tables.
    pub netlink: usize,
    /// Transactions loaded with `nft -f` (a full load's first step, and partial ones
    /// outside the netlink grammar).
    pub nft: usize,
}

pub struct NftablesDataplane {
    /// How the rules tell local pod traffic.
    local: LocalTraffic,
    kernel: Option<Programmed>,
    /// Another network namespace to program (tests and the bench); conntrack is then
    /// left alone.
    netns: Option<PathBuf>,
    /// The netlink path for partial transactions (`None`: `nft -f` only).
    wire: Option<wire::Wire>,
    commits: Commits,
}

impl NftablesDataplane {
    /// Checks that nftables works here (the `nft` tool and the kernel's `nf_tables`).
    ///
    /// # Errors
    /// When `nft` is missing or the kernel refuses the table.
    pub fn start(local: impl Into<LocalTraffic>) -> Result<Self, NftError> {
        Self::start_in(local, None)
    }

    /// [`Self::start`] for the network namespace at `netns` (`None`: this one).
    ///
    /// # Errors
    /// When `nft` is missing or the kernel refuses the table.
    pub fn start_in(
        local: impl Into<LocalTraffic>,
        netns: Option<PathBuf>,
    ) -> Result<Self, NftError> {
        let tables = format!("add table ip {0}\nadd table ip6 {0}\n", table::TABLE);
        load_in(netns.as_deref(), &tables)?;
        let wire = wire::Wire::open(netns.as_deref())
            .inspect_err(|error| warn!(%error, "no nf_tables netlink socket; every sync goes through nft -f"))
            .ok();
        Ok(Self {
            local: local.into(),
            kernel: None,
            netns,
            wire,
            commits: Commits::default(),
        })
    }

    /// How the transactions so far were committed.
    #[must_use]
    pub fn commits(&self) -> Commits {
        self.commits
    }

    /// Commits `pending`: a partial transaction as one netlink batch when every
    /// statement is in the wire grammar, else through `nft -f`; a full load in its two
    /// steps. A full load returns the chains it left stale, none when it fell back to
    /// replacing the tables.
    fn commit(
        &mut self,
        pending: &mut Pending,
        programmed: &Programmed,
    ) -> Result<Option<Stale>, NftError> {
        let tables = &programmed.live;
        if let (None, Some(wire)) = (&pending.full, self.wire.as_mut()) {
            if let Some(batch) = wire::encode(&pending.partial.statements) {
                wire.commit(&batch)?;
                self.commits.netlink += 1;
                return Ok(None);
            }
        }
        let loaded = match &pending.full {
            Some(existing) => full::load(
                self.netns.as_deref(),
                self.wire.as_mut(),
                tables,
                existing,
                &programmed.rendered,
                &programmed.from,
            )
            .map(|loaded| {
                pending.ops = loaded.statements;
                self.commits.netlink += loaded.batches;
                Some(loaded.stale)
            }),
            None => load_in(self.netns.as_deref(), &pending.partial.text()).map(|()| None),
        };
        self.commits.nft += 1;
        match (loaded, pending.over_existing()) {
            (Err(error), true) => {
                warn!(%error, "cannot load over the tables there; replacing them (affinity is forgotten)");
                let write = |table: &table::Table, out: &mut dyn std::fmt::Write| {
                    programmed
                        .rendered
                        .write_table(table, &programmed.from, out)
                };
                load_in(self.netns.as_deref(), &ruleset::full_text(tables, &write))?;
                Ok(Some(Stale::new()))
            }
            (loaded, _) => loaded,
        }
    }

    /// The names our tables hold in the kernel (none for a table that is not there or
    /// cannot be read). Names only, no rules: ~1 s at 10 000 Services, where listing the
    /// tables takes ten.
    fn existing(&self) -> BTreeMap<TableKey, Existing> {
        let mut tables = BTreeMap::new();
        for family in ["ip", "ip6"] {
            let mut listing = String::new();
            for what in ["chains", "sets", "maps"] {
                let Some(output) = nft_in(self.netns.as_deref())
                    .args(["-t", "list", what, family])
                    .stderr(Stdio::null())
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                else {
                    continue;
                };
                listing.push_str(&String::from_utf8_lossy(&output.stdout));
            }
            // A table with no chain of ours is not one to keep.
            tables.extend(
                Existing::parse(family, &listing)
                    .into_iter()
                    .filter(|(_, existing)| !existing.chains.is_empty()),
            );
        }
        tables
    }

    /// The transaction from what the kernel holds to `desired`: whole tables when
    /// nothing is known, else a partial one; what the kernel then holds, for `commit`.
    fn transaction(&mut self, desired: &DesiredState) -> (Pending, Programmed) {
        let Some(kernel) = self.kernel.take() else {
            let rendered = Rendered::full(desired, &self.local);
            let live = rendered.live();
            let existing = self.existing();
            let pending = Pending {
                ops: 0,
                full: Some(existing),
                partial: delta::Transaction::default(),
            };
            let programmed = Programmed {
                rendered,
                live,
                from: desired.clone(),
                // Known once the load has compared the tables there with these.
                stale: Stale::new(),
            };
            return (pending, programmed);
        };
        let mut rendered = kernel.rendered;
        rendered.update(&kernel.from, desired);
        let live = rendered.live();
        // The changed Service ports' chains, before and after, by table: the tables keep
        // the fixed chains only, so each side is compared with these added.
        let mut changed: BTreeMap<TableKey, (Vec<_>, Vec<_>)> = BTreeMap::new();
        for change in rendered.take_changes() {
            let sides = changed.entry(change.table).or_default();
            sides.0.extend(change.before);
            sides.1.extend(change.after);
        }
        // The kernel holds the tables last programmed plus their stale chains, empty.
        let mut held: BTreeMap<TableKey, table::Table> = BTreeMap::new();
        for mut table in kernel.live {
            for name in kernel.stale.get(&table.key()).into_iter().flatten() {
                table.chains.insert(name.clone(), table::Chain::default());
            }
            if let Some((before, _)) = changed.get(&table.key()) {
                table.chains.extend(before.iter().cloned());
            }
            held.insert(table.key(), table);
        }
        let mut statements = Vec::new();
        let mut stale = BTreeMap::new();
        let no_stale = BTreeSet::new();
        for table in &live {
            let key = table.key();
            let Some(before) = held.remove(&key) else {
                // A Service table that was empty: created whole (through `nft -f`).
                let mut whole = String::new();
                let _ = rendered.write_table(table, desired, &mut whole);
                statements.push(whole);
                continue;
            };
            let was_stale = kernel.stale.get(&key).unwrap_or(&no_stale);
            let mut wanted = table.clone();
            if let Some((_, after)) = changed.get(&key) {
                wanted.chains.extend(after.iter().cloned());
            }
            let (tx, flushed) = delta::delta(&before, &wanted, was_stale);
            statements.extend(tx.statements);
            if !flushed.is_empty() {
                stale.insert(key, flushed);
            }
        }
        // A Service table left with no Service goes whole.
        for (family, name) in held.into_keys() {
            statements.push(format!("delete table {family} {name}"));
        }
        let pending = Pending {
            ops: statements.len(),
            full: None,
            partial: delta::Transaction { statements },
        };
        let programmed = Programmed {
            rendered,
            live,
            from: desired.clone(),
            stale,
        };
        (pending, programmed)
    }
}

impl super::Dataplane for NftablesDataplane {
    fn name(&self) -> &'static str {
        "nftables"
    }

    /// Every Service's rules match local traffic, so a change rewrites the tables whole.
    fn set_local(&mut self, local: &LocalTraffic) -> Result<(), super::DataplaneError> {
        if *local != self.local {
            self.local = local.clone();
            self.kernel = None;
        }
        Ok(())
    }

    /// Nothing is read back: the first sync replaces our tables whole.
    fn programmed(&mut self) -> Result<DesiredState, super::DataplaneError> {
        self.kernel = None;
        Ok(DesiredState::default())
    }

    fn apply(
        &mut self,
        _plan: &Plan,
        desired: &DesiredState,
    ) -> Result<Applied, super::DataplaneError> {
        // Names count here (they name the chains), so the tables follow their own diff
        // from the state they were rendered from rather than the plan's.
        let old = self.kernel.as_ref().map(|k| k.from.clone());
        let (mut pending, mut programmed) = self.transaction(desired);
        if !pending.is_empty() {
            match self.commit(&mut pending, &programmed) {
                Ok(Some(stale)) => programmed.stale = stale,
                Ok(None) => {}
                Err(error) => {
                    // Whatever happened, the next sync rewrites everything.
                    self.kernel = None;
                    return Err(error.into());
                }
            }
        }
        let tidy_later = programmed.stale.values().any(|chains| !chains.is_empty());
        self.kernel = Some(programmed);
        let old = old.unwrap_or_default();
        let udp = conntrack::UdpServices::changed(&old, desired);
        if self.netns.is_none() && !udp.is_empty() {
            match conntrack::clean_udp(&udp) {
                Ok(0) => {}
                Ok(deleted) => debug!(deleted, "stale UDP conntrack entries deleted"),
                Err(error) => warn!(%error, "cannot clean stale UDP conntrack entries"),
            }
        }
        Ok(Applied {
            writes: pending.ops,
            full: pending.full.is_some(),
            failed: Vec::new(),
            failure_reasons: BTreeMap::new(),
            tidy_later,
        })
    }
}
