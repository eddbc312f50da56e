//! Manifest text → typed objects. A file either parses as YAML/JSON or is rejected
//! whole; within it, each object decodes and validates on its own.
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use std::sync::Arc;

use serde::Deserialize;
use serde_yaml::Value;
use thiserror::Error;

use crate::model::{
    self,
    service::ServiceInfo,
    slice::Slice,
    snapshot::{slim_node, slim_service, slim_slice},
    validate::ValidationError,
    ObjectKey,
};

/// An object the agent reads, slimmed to what it reads (see `model::snapshot`).
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Arc<ServiceInfo>),
    EndpointSlice(Arc<Slice>),
    Node(Arc<Node>),
}

/// Which map of the snapshot an object belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Object {
    #[must_use]
    pub fn id(&self) -> (Kind, ObjectKey) {
        match self {
            Self::Service(o) => (Kind::Service, (o.namespace.clone(), o.name.clone())),
            Self::EndpointSlice(o) => (Kind::EndpointSlice, (o.namespace.clone(), o.name.clone())),
            Self::Node(o) => (Kind::Node, model::object_key(&o.metadata)),
        }
    }
}

#[derive(Debug, Error)]
#[error("not valid YAML or JSON: {0}")]
pub struct FileError(#[source] pub serde_yaml::Error);

/// Why one object of a valid file was skipped.
#[derive(Debug, Error)]
pub enum ObjectError {
    #[error("does not decode as {kind}: {source}")]
    Decode {
        kind: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("invalid: {0}")]
    Invalid(#[from] ValidationError),
}

/// A rejected object, named as far as its text allows.
#[derive(Debug)]
pub struct Rejected {
    pub id: Option<(Kind, ObjectKey)>,
    pub display: String,
    pub error: ObjectError,
}

/// Parses one file: every document, `kind: List` expanded, unknown kinds ignored. Each
/// document is decoded as soon as it is read, so only one is ever held untyped; a
/// syntax error anywhere still rejects the whole file.
pub fn parse_file(text: &str) -> Result<Vec<Result<Object, Rejected>>, FileError> {
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        expand(Value::deserialize(document).map_err(FileError)?, &mut out);
    }
    Ok(out)
}

fn expand(doc: Value, out: &mut Vec<Result<Object, Rejected>>) {
    if doc.is_null() {
        return;
    }
    if str_at(&doc, &["kind"]).is_some_and(|k| k.ends_with("List")) {
        if let Value::Mapping(mut doc) = doc {
            if let Some(Value::Sequence(items)) = doc.remove("items") {
                for item in items {
                    expand(item, out);
                }
            }
        }
        return;
    }
    if let Some(result) = decode(doc) {
        out.push(result);
    }
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |v, key| v.get(*key))
        .and_then(Value::as_str)
}

fn decode(doc: Value) -> Option<Result<Object, Rejected>> {
    let api = str_at(&doc, &["apiVersion"]).unwrap_or_default();
    let kind = match (api, str_at(&doc, &["kind"]).unwrap_or_default()) {
        ("v1", "Service") => Kind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("v1", "Node") => Kind::Node,
        _ => return None,
    };
    let namespace = str_at(&doc, &["metadata", "namespace"]);
    let name = str_at(&doc, &["metadata", "name"]);
    let key = (
        if kind == Kind::Node {
            ""
        } else {
            namespace.unwrap_or("default")
        }
        .to_owned(),
        name.unwrap_or_default().to_owned(),
    );
    let display = format!("{kind:?} {}/{}", key.0, key.1);
    let id = name.map(|_| (kind, key.clone()));
    let reject = |error| Rejected {
        id: id.clone(),
        display: display.clone(),
        error,
    };
    let decode_error = |source| {
        reject(ObjectError::Decode {
            kind: format!("{kind:?}"),
            source,
        })
    };
    // Decoded, validated in the API's form, then slimmed.
    let checked = match kind {
        Kind::Service => serde_yaml::from_value::<Service>(doc).map(|mut o| {
            o.metadata.namespace = Some(key.0.clone());
            model::validate::service(&o).map(|()| Object::Service(Arc::new(slim_service(o))))
        }),
        Kind::EndpointSlice => serde_yaml::from_value::<EndpointSlice>(doc).map(|mut o| {
            o.metadata.namespace = Some(key.0.clone());
            model::validate::endpoint_slice(&o)
                .map(|()| Object::EndpointSlice(Arc::new(slim_slice(o))))
        }),
        Kind::Node => {
            serde_yaml::from_value::<Node>(doc).map(|o| Ok(Object::Node(Arc::new(slim_node(o)))))
        }
    };
    match checked {
        Ok(valid) => Some(valid.map_err(|e| reject(e.into()))),
        Err(e) => Some(Err(decode_error(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_documents_expand_and_unknown_kinds_are_ignored() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: c}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: x}\n";
        let objects = parse_file(text).unwrap();
        let ids: Vec<_> = objects.iter().map(|o| o.as_ref().unwrap().id()).collect();
        assert_eq!(
            ids,
            vec![
                (Kind::Service, ("default".into(), "a".into())),
                (Kind::Service, ("x".into(), "b".into()))
            ]
        );
    }

    #[test]
    fn an_invalid_object_is_rejected_with_its_name_and_reason() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec:\n  clusterIP: 10.0.0.999\n  ports: [{port: 80}]\n";
        let objects = parse_file(text).unwrap();
        let rejected = objects.into_iter().next().unwrap().unwrap_err();
        assert_eq!(rejected.display, "Service default/bad");
        assert!(rejected.error.to_string().contains("10.0.0.999"));
    }

    #[test]
    fn broken_yaml_rejects_the_file() {
        assert!(parse_file("apiVersion: v1\nkind: [unclosed\n").is_err());
    }
}
