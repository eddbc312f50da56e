//! One nftables table as data (chains with their rules, sets and maps with their
//! elements), so a sync can print it whole or compare it with the last one programmed.
//! The maps are persistent: a copy is O(1), and comparing a table with one derived from
//! it costs what differs.
use std::fmt::Write;

use imbl::OrdMap;

/// The main table's name, in the `ip` and `ip6` families: the filter and postrouting
/// hooks, which act on the marks the Service tables set.
pub const TABLE: &str = "proxy-agent";

/// Services are spread over this many tables of their own (`proxy-agent-svc-00` …),
/// each with its own nat hooks: the kernel validates a whole table on every commit that
/// adds a jump or a DNAT (`nf_tables_validate`), so a change costs the validation of one
/// sixteenth of the Services. A table with no Service in it is not loaded.
pub const SHARDS: usize = 16;

/// The name of Service table `shard`.
#[must_use]
pub fn shard_name(shard: usize) -> String {
    format!("{TABLE}-svc-{shard:02}")
}

/// Whether a table of that name is one of ours (the main table or a Service table).
#[must_use]
pub fn is_ours(name: &str) -> bool {
    name == TABLE
        || name
            .strip_prefix(TABLE)
            .and_then(|rest| rest.strip_prefix("-svc-"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Every table name of ours, main first.
#[must_use]
pub fn all_names() -> Vec<String> {
    std::iter::once(TABLE.to_owned())
        .chain((0..SHARDS).map(shard_name))
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Chain {
    /// `type nat hook prerouting priority dstnat; policy accept;` for base chains.
    pub hook: Option<String>,
    pub comment: Option<Box<str>>,
    pub rules: Rules,
}

/// A chain's rules, one a line, in one allocation of exactly their size: compared,
/// written and replaced as a chain's whole, never one by one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rules(Box<str>);

impl Rules {
    pub fn iter(&self) -> std::str::Lines<'_> {
        self.0.lines()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a Rules {
    type Item = &'a str;
    type IntoIter = std::str::Lines<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<S: AsRef<str>> FromIterator<S> for Rules {
    fn from_iter<I: IntoIterator<Item = S>>(rules: I) -> Self {
        let mut text = String::new();
        for rule in rules {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(rule.as_ref());
        }
        Self(text.into_boxed_str())
    }
}

/// One chain in `nft -f` block syntax.
///
/// # Errors
/// When `t` refuses the text.
pub fn write_chain(t: &mut dyn Write, name: &str, chain: &Chain) -> std::fmt::Result {
    writeln!(t, "\tchain {name} {{")?;
    if let Some(hook) = &chain.hook {
        writeln!(t, "\t\t{hook}")?;
    }
    if let Some(comment) = &chain.comment {
        writeln!(t, "\t\tcomment \"{comment}\"")?;
    }
    for rule in &chain.rules {
        writeln!(t, "\t\t{rule}")?;
    }
    writeln!(t, "\t}}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// `set` or `map`.
    pub kind: &'static str,
    /// Declaration lines: `type …`, `flags …`, `timeout …`.
    pub decl: Vec<String>,
    /// Key → value (maps) or key → empty (sets).
    pub elements: OrdMap<String, String>,
    /// Elements are the kernel's (affinity), never written by a sync.
    pub dynamic: bool,
}

impl Set {
    #[must_use]
    pub fn new(kind: &'static str, decl: &[&str]) -> Self {
        Self {
            kind,
            decl: decl.iter().map(|&d| d.to_owned()).collect(),
            elements: OrdMap::new(),
            dynamic: false,
        }
    }

    /// `key` or `key : value`, as written inside `elements = { … }`.
    #[must_use]
    pub fn element(key: &str, value: &str) -> String {
        if value.is_empty() {
            key.to_owned()
        } else {
            format!("{key} : {value}")
        }
    }
}

/// A table by family and name.
pub type TableKey = (&'static str, String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// `ip` or `ip6`.
    pub family: &'static str,
    /// [`TABLE`] or a [`shard_name`].
    pub name: String,
    pub comment: String,
    pub sets: OrdMap<String, Set>,
    pub chains: OrdMap<String, Chain>,
    /// Named counters (fixed: declared with the table, never changed by a sync).
    pub counters: Vec<&'static str>,
}

/// The named counters of verdicts the rules take, by reason (read for metrics).
pub const COUNTER_REJECT_NO_ENDPOINTS: &str = "reject-no-endpoints";
pub const COUNTER_DROP_NO_LOCAL_ENDPOINTS: &str = "drop-no-local-endpoints";
pub const COUNTER_DROP_SOURCE_RANGE: &str = "drop-source-range";

impl Table {
    /// An empty table with no counters.
    #[must_use]
    pub fn new(family: &'static str, name: String, comment: &str) -> Self {
        Self {
            family,
            name,
            comment: comment.to_owned(),
            sets: OrdMap::new(),
            chains: OrdMap::new(),
            counters: Vec::new(),
        }
    }

    #[must_use]
    pub fn key(&self) -> TableKey {
        (self.family, self.name.clone())
    }

    /// The verdict counters a Service table declares.
    #[must_use]
    pub fn with_counters(mut self) -> Self {
        self.counters = vec![
            COUNTER_DROP_NO_LOCAL_ENDPOINTS,
            COUNTER_DROP_SOURCE_RANGE,
            COUNTER_REJECT_NO_ENDPOINTS,
        ];
        self
    }

    /// The table in `nft -f` block syntax (sets first, so rules can name them), appended
    /// to `t` (a full load is tens of MiB at 10 000 Services: written once, not built and
    /// then copied).
    ///
    /// # Errors
    /// When `t` refuses the text.
    pub fn write_text(&self, t: &mut dyn Write) -> std::fmt::Result {
        self.write_open(t)?;
        for (name, chain) in &self.chains {
            write_chain(t, name, chain)?;
        }
        t.write_str("}\n")
    }

    /// The table's opening line, counters and sets: chains follow, then `}`.
    ///
    /// # Errors
    /// When `t` refuses the text.
    pub fn write_open(&self, t: &mut dyn Write) -> std::fmt::Result {
        writeln!(t, "table {} {} {{", self.family, self.name)?;
        writeln!(t, "\tcomment \"{}\"", self.comment)?;
        for name in &self.counters {
            writeln!(t, "\tcounter {name} {{\n\t}}")?;
        }
        for (name, set) in &self.sets {
            writeln!(t, "\t{} {name} {{", set.kind)?;
            for line in &set.decl {
                writeln!(t, "\t\t{line}")?;
            }
            if !set.elements.is_empty() {
                let elements: Vec<String> = set
                    .elements
                    .iter()
                    .map(|(k, v)| Set::element(k, v))
                    .collect();
                writeln!(
                    t,
                    "\t\telements = {{\n\t\t\t{}\n\t\t}}",
                    elements.join(",\n\t\t\t")
                )?;
            }
            writeln!(t, "\t}}")?;
        }
        Ok(())
    }

    /// The `add chain` statement that declares `name` (hook and comment included).
    #[must_use]
    pub fn add_chain(&self, name: &str, chain: &Chain) -> String {
        let mut spec = String::new();
        if let Some(hook) = &chain.hook {
            let _ = write!(spec, " {hook}");
        }
        if let Some(comment) = &chain.comment {
            let _ = write!(spec, " comment \"{comment}\";");
        }
        if spec.is_empty() {
            format!("add chain {} {} {name}", self.family, self.name)
        } else {
            format!("add chain {} {} {name} {{{spec} }}", self.family, self.name)
        }
    }

    /// The `add set`/`add map` statement that declares `name` (no elements).
    #[must_use]
    pub fn add_set(&self, name: &str, set: &Set) -> String {
        format!(
            "add {} {} {} {name} {{ {}; }}",
            set.kind,
            self.family,
            self.name,
            set.decl.join("; ")
        )
    }
}
