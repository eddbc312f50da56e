//! Reading our tables back (`dump`, the verdict counters, the tests) as the nftables
//! crate's typed schema over `nft -j list`. Only our tables' objects are typed: another
//! program's rules, in a syntax the schema may not know, never break a read. Where the
//! schema (0.6) cannot hold what nft prints, a small type of ours stands in, named as such:
//! verdict maps (its `SetType` has no `verdict`) and counters (`u32` packets and bytes).
use nftables::{
    expr::{Expression, NamedExpression, SetItem, Verdict},
    helper::{get_current_ruleset_raw, NftablesError},
    schema::{NfListObject, SetTypeValue},
    stmt::Statement,
    types::NfFamily,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

use super::table::is_ours;

#[derive(Debug, Error)]
pub enum ListingError {
    #[error("nft -j list: {0}")]
    Nft(#[source] NftablesError),
    #[error("nft -j printed what is not its JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("an object of table {table} does not read as nftables JSON: {error}")]
    Object {
        table: String,
        #[source]
        error: serde_json::Error,
    },
}

/// One of our objects as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// Anything the crate's schema holds.
    Listed(NfListObject<'static>),
    /// A verdict map (`service-ips`, `service-nodeports`, ...).
    VerdictMap(VerdictMap),
    /// A named counter.
    Counter(NamedCounter),
}

impl Object {
    /// The object as `nft -j` reads it back in (`{"map": {...}}`), serialized by the
    /// crate for what its schema holds.
    ///
    /// # Errors
    /// When serde cannot serialize it (it always can).
    pub fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            Self::Listed(object) => serde_json::to_value(object),
            Self::VerdictMap(map) => Ok(serde_json::json!({ "map": map })),
            Self::Counter(counter) => Ok(serde_json::json!({ "counter": counter })),
        }
    }
}

/// A named counter, as the schema's `Counter` would hold it with 64-bit counts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct NamedCounter {
    pub family: NfFamily,
    pub table: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<u32>,
    pub packets: u64,
    pub bytes: u64,
}

/// A map to verdicts, as the schema's `Map` would hold it if its `SetType` had `verdict`;
/// keys and verdicts are the schema's expressions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct VerdictMap {
    pub family: NfFamily,
    pub table: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<u32>,
    #[serde(rename = "type")]
    pub key: SetTypeValue<'static>,
    /// `verdict`.
    pub map: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flags: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elem: Option<Vec<Expression<'static>>>,
}

/// `nft -j list ARGS…` in this thread's network namespace, our tables' objects only.
///
/// # Errors
/// When `nft` fails or one of our objects does not read.
pub fn list(args: &[&str]) -> Result<Vec<Object>, ListingError> {
    let text =
        get_current_ruleset_raw(None::<&str>, args.iter().copied()).map_err(ListingError::Nft)?;
    ours(&text)
}

/// Our tables' objects in the output of `nft -j list …`.
///
/// # Errors
/// When the output is not nft's JSON, or one of our objects does not read.
pub fn ours(text: &str) -> Result<Vec<Object>, ListingError> {
    #[derive(Deserialize)]
    struct Document<'a> {
        #[serde(borrow)]
        nftables: Vec<&'a RawValue>,
    }
    /// The fields that say which table an object belongs to.
    #[derive(Deserialize)]
    struct Owner {
        table: Option<String>,
        name: Option<String>,
    }
    let document: Document = serde_json::from_str(text).map_err(ListingError::Json)?;
    let mut out = Vec::new();
    for raw in document.nftables {
        let Ok(peek) = serde_json::from_str::<std::collections::HashMap<String, Owner>>(raw.get())
        else {
            // Not an object of objects with names (metainfo has other fields): not ours.
            continue;
        };
        let Some((kind, owner)) = peek.into_iter().next() else {
            continue;
        };
        let table = if kind == "table" {
            owner.name
        } else {
            owner.table
        };
        let Some(table) = table.filter(|t| is_ours(t)) else {
            continue;
        };
        let object = serde_json::from_str::<serde_json::Value>(raw.get())
            .and_then(|mut value| {
                let verdicts = value
                    .pointer("/map/map")
                    .and_then(serde_json::Value::as_str)
                    == Some("verdict");
                if verdicts {
                    return VerdictMap::deserialize(value["map"].take()).map(Object::VerdictMap);
                }
                if kind == "counter" {
                    return NamedCounter::deserialize(value["counter"].take()).map(Object::Counter);
                }
                single_flags_as_lists(&mut value);
                NfListObject::deserialize(value).map(Object::Listed)
            })
            .map_err(|error| ListingError::Object { table, error })?;
        out.push(object);
    }
    Ok(out)
}

/// nft prints a single flag as a string (`"flags": "fully-random"`), a list only for
/// several; the schema reads NAT flags as a list only (libnftables-json allows both).
fn single_flags_as_lists(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                if key == "flags" && inner.is_string() {
                    *inner = Value::Array(vec![inner.take()]);
                } else {
                    single_flags_as_lists(inner);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(single_flags_as_lists),
        _ => {}
    }
}

/// `objects` as one `nft -j -f` document that adds them, serialized by the crate for
/// what its schema holds, declarations first (JSON input is applied in order: every table,
/// counter and chain before the sets, maps and rules that name them; rules keep their
/// order). Table and chain comments are lost: the schema has no field for them.
///
/// # Errors
/// When serde cannot serialize an object (it always can).
pub fn batch(mut objects: Vec<Object>) -> Result<String, serde_json::Error> {
    let rank = |object: &Object| match object {
        Object::Listed(NfListObject::Table(_)) => 0,
        Object::Counter(_) => 1,
        Object::Listed(NfListObject::Chain(_)) => 2,
        Object::Listed(NfListObject::Set(_) | NfListObject::Map(_)) | Object::VerdictMap(_) => 3,
        Object::Listed(_) => 4,
    };
    objects.sort_by_key(rank);
    let commands = objects
        .iter()
        .map(|o| Ok(serde_json::json!({ "add": o.to_json()? })))
        .collect::<Result<Vec<_>, serde_json::Error>>()?;
    Ok(serde_json::json!({ "nftables": commands }).to_string())
}

/// Our named counters' packets in `nft -j list counters FAMILY`: (counter name, packets).
///
/// # Errors
/// When `nft` fails or prints something that is not its JSON.
pub fn counters(family: &str) -> Result<Vec<(String, u64)>, ListingError> {
    Ok(list(&["list", "counters", family])?
        .into_iter()
        .filter_map(|object| match object {
            Object::Counter(counter) => Some((counter.name, counter.packets)),
            _ => None,
        })
        .collect())
}

/// Every chain a statement jumps or goes to, directly or through a verdict map.
pub fn targets<'a>(statement: &'a Statement<'a>, found: &mut impl FnMut(&'a str)) {
    match statement {
        Statement::Jump(target) | Statement::Goto(target) => found(&target.target),
        Statement::VerdictMap(map) => expression_targets(&map.data, found),
        _ => {}
    }
}

/// Every chain an expression (a verdict, an anonymous verdict map) jumps or goes to.
pub fn expression_targets<'a>(expression: &'a Expression<'a>, found: &mut impl FnMut(&'a str)) {
    match expression {
        Expression::Verdict(Verdict::Jump(target) | Verdict::Goto(target)) => {
            found(&target.target);
        }
        Expression::List(items) => items.iter().for_each(|e| expression_targets(e, found)),
        Expression::Named(NamedExpression::Set(items)) => {
            for item in items {
                match item {
                    SetItem::Mapping(_, value) => expression_targets(value, found),
                    SetItem::MappingStatement(_, statement) => targets(statement, found),
                    SetItem::Element(element) => expression_targets(element, found),
                }
            }
        }
        _ => {}
    }
}

/// An immediate as text (`"10.0.0.1"`, `80`, `"tcp"`); `None` for anything else.
#[must_use]
pub fn immediate(expression: &Expression<'_>) -> Option<String> {
    match expression {
        Expression::String(s) => Some(s.to_string()),
        Expression::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use nftables::schema::NfListObject;

    use super::{expression_targets, ours, targets, Object};

    #[test]
    fn only_our_tables_are_read_and_verdict_maps_are_followed() {
        let text = r#"{"nftables": [
            {"metainfo": {"version": "1.1.3", "json_schema_version": 1}},
            {"table": {"family": "ip", "name": "someone-else", "handle": 1}},
            {"rule": {"family": "ip", "table": "someone-else", "chain": "x", "handle": 2,
                      "expr": [{"future-statement": {"whatever": 1}}]}},
            {"table": {"family": "ip", "name": "proxy-agent", "handle": 3}},
            {"map": {"family": "ip", "name": "service-ips", "table": "proxy-agent", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 5, "map": "verdict",
                     "elem": [[{"concat": ["10.96.0.50", "udp", 53]}, {"goto": {"target": "KUBE-SVC-A"}}]]}},
            {"rule": {"family": "ip", "table": "proxy-agent", "chain": "KUBE-SVC-A", "handle": 4,
                      "expr": [{"vmap": {"key": {"numgen": {"mode": "random", "mod": 2, "offset": 0}},
                                         "data": {"set": [[0, {"goto": {"target": "KUBE-SEP-1"}}],
                                                          [1, {"goto": {"target": "KUBE-SEP-2"}}]]}}}]}}
        ]}"#;
        let objects = ours(text).unwrap();
        assert_eq!(objects.len(), 3, "{objects:?}");
        let Object::VerdictMap(map) = &objects[1] else {
            panic!("{objects:?}");
        };
        let mut found = Vec::new();
        for element in map.elem.iter().flatten() {
            expression_targets(element, &mut |t| found.push(t.to_owned()));
        }
        assert_eq!(found, ["KUBE-SVC-A"]);
        let Object::Listed(NfListObject::Rule(rule)) = &objects[2] else {
            panic!("{objects:?}");
        };
        let mut found = Vec::new();
        for statement in rule.expr.iter() {
            targets(statement, &mut |t| found.push(t.to_owned()));
        }
        assert_eq!(found, ["KUBE-SEP-1", "KUBE-SEP-2"]);
    }
}
