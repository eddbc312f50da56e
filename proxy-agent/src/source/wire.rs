//! API objects as the watchers decode them off the wire: the metadata the agent reads,
//! and the other top-level fields it reads kept apart, each decoded later on its own. So
//! `managedFields`, unread labels and annotations (`last-applied-configuration` is a
//! whole copy of the object) are skipped by the parser instead of built as JSON trees
//! and dropped, and one malformed field skips its object, never the page it came in. A
//! field of a listed object is kept as its JSON text (decoded once, straight into its
//! type); a watch event reaches the object through serde's buffered content, which
//! cannot give text back, so there it is a JSON value.
use std::{borrow::Cow, collections::BTreeMap, fmt};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::{
    api::ApiResource,
    core::{DynamicResourceScope, Resource},
};
use serde::{
    de::{IgnoredAny, MapAccess, Visitor},
    Deserialize, Deserializer,
};
use serde_json::Value;

use crate::model::{
    snapshot::ANNOTATION_TRIGGER_TIME, ANNOTATION_TOPOLOGY_HINTS, ANNOTATION_TOPOLOGY_MODE,
    LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME, LABEL_ZONE,
};

/// Every label and annotation key any reader of the snapshot looks at.
const KEPT_KEYS: [&str; 6] = [
    LABEL_SERVICE_NAME,
    LABEL_SERVICE_PROXY_NAME,
    LABEL_ZONE,
    ANNOTATION_TOPOLOGY_MODE,
    ANNOTATION_TOPOLOGY_HINTS,
    ANNOTATION_TRIGGER_TIME,
];

/// A Service, EndpointSlice or Node as listed or watched. The fields of all three kinds
/// are here; each kind fills its own.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireObject {
    #[serde(default, deserialize_with = "metadata")]
    pub metadata: ObjectMeta,
    pub spec: Option<Field>,
    pub status: Option<Field>,
    pub address_type: Option<Field>,
    pub endpoints: Option<Field>,
    pub ports: Option<Field>,
}

/// One top-level field, not yet decoded.
#[derive(Clone, Debug, PartialEq)]
pub enum Field {
    /// Its JSON text (a list page: the parser hands over the text it skipped).
    Text(Box<str>),
    /// Its JSON value (a watch event's object, which comes through buffered content).
    Value(Value),
}

/// `serde_json`'s name for "give me the raw text" (its `raw_value` feature): a parser
/// that honours it calls `visit_map` with this one key and the text; buffered content
/// calls `visit_newtype_struct` with itself.
const RAW_TEXT: &str = "$serde_json::private::RawValue";

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = Field;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
                match map.next_key::<Cow<'de, str>>()? {
                    Some(key) if key == RAW_TEXT => {
                        let text: String = map.next_value()?;
                        Ok(Field::Text(text.into_boxed_str()))
                    }
                    _ => Err(serde::de::Error::custom("expected raw JSON text")),
                }
            }

            fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
                Value::deserialize(d).map(Field::Value)
            }
        }
        d.deserialize_newtype_struct(RAW_TEXT, FieldVisitor)
    }
}

impl WireObject {
    /// `namespace/name`.
    #[must_use]
    pub fn key(&self) -> (String, String) {
        crate::model::object_key(&self.metadata)
    }
}

/// Decodes one field as its type (absent: JSON null); the error names the kind and the
/// field.
pub fn field<T: serde::de::DeserializeOwned>(
    kind: &str,
    name: &str,
    value: Option<Field>,
) -> Result<T, String> {
    match value {
        Some(Field::Text(text)) => serde_json::from_str(&text),
        Some(Field::Value(value)) => serde_json::from_value(value),
        None => serde_json::from_value(Value::Null),
    }
    .map_err(|e| format!("does not decode as {kind}: {name}: {e}"))
}

impl Resource for WireObject {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }

    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }

    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }

    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }

    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The metadata fields the agent and the watcher read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    deletion_timestamp: Option<Time>,
    #[serde(default, deserialize_with = "kept")]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "kept")]
    annotations: Option<BTreeMap<String, String>>,
}

fn metadata<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let meta = Option::<Meta>::deserialize(d)?;
    Ok(meta.map_or_else(ObjectMeta::default, |m| ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        resource_version: m.resource_version,
        deletion_timestamp: m.deletion_timestamp,
        labels: m.labels,
        annotations: m.annotations,
        ..ObjectMeta::default()
    }))
}

/// A string map with only the keys in `KEPT_KEYS`; other values are skipped unread.
fn kept<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Kept;
    impl<'de> Visitor<'de> for Kept {
        type Value = Option<BTreeMap<String, String>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of strings")
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if KEPT_KEYS.contains(&key.as_ref()) {
                    kept.insert(key.into_owned(), map.next_value::<String>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok((!kept.is_empty()).then_some(kept))
        }
    }
    d.deserialize_option(Kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_read_metadata_and_raw_fields_only() {
        let text = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web",
            "namespace":"default","resourceVersion":"42","uid":"u",
            "labels":{"app":"web","service.kubernetes.io/service-proxy-name":"x"},
            "annotations":{"kubectl.kubernetes.io/last-applied-configuration":"{\"big\":1}",
                "service.kubernetes.io/topology-mode":"Auto"},
            "managedFields":[{"manager":"kubectl","fieldsV1":{"f:spec":{}}}]},
            "spec":{"clusterIP":"10.96.0.1"},"status":{}}"#;
        let object: WireObject = serde_json::from_str(text).expect("decodes");
        let meta = &object.metadata;
        assert_eq!(object.key(), ("default".into(), "web".into()));
        assert_eq!(meta.resource_version.as_deref(), Some("42"));
        assert_eq!(meta.uid, None);
        assert!(meta.managed_fields.is_none());
        let labels = meta.labels.as_ref().expect("labels");
        assert_eq!(
            labels.keys().collect::<Vec<_>>(),
            [LABEL_SERVICE_PROXY_NAME]
        );
        let annotations = meta.annotations.as_ref().expect("annotations");
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            [ANNOTATION_TOPOLOGY_MODE]
        );
        // A listed object keeps its fields as text, decoded later straight to a type.
        assert_eq!(
            object.spec,
            Some(Field::Text(r#"{"clusterIP":"10.96.0.1"}"#.into()))
        );
        let spec: Value = field("Service", "spec", object.spec).expect("spec");
        assert_eq!(spec, serde_json::json!({"clusterIP": "10.96.0.1"}));
        assert!(object.endpoints.is_none());
    }

    #[test]
    fn decodes_inside_a_watch_event() {
        let text = r#"{"type":"MODIFIED","object":{"metadata":{"name":"s","resourceVersion":"7",
            "managedFields":[{"fieldsV1":{}}]},"addressType":"IPv4","endpoints":[]}}"#;
        let event: kube::api::WatchEvent<WireObject> = serde_json::from_str(text).expect("decodes");
        let kube::api::WatchEvent::Modified(object) = event else {
            panic!("{event:?}");
        };
        assert_eq!(object.metadata.resource_version.as_deref(), Some("7"));
        let endpoints: Value = field("EndpointSlice", "endpoints", object.endpoints).expect("[]");
        assert_eq!(endpoints, serde_json::json!([]));
    }

    #[test]
    fn a_bad_field_fails_alone() {
        let text = r#"{"metadata":{"name":"s","labels":null},"endpoints":[{"addresses":7}],
            "addressType":"IPv4"}"#;
        let event = format!(r#"{{"type":"ADDED","object":{text}}}"#);
        let kube::api::WatchEvent::Added(watched) =
            serde_json::from_str::<kube::api::WatchEvent<WireObject>>(&event).expect("decodes")
        else {
            panic!("not ADDED");
        };
        let listed: WireObject = serde_json::from_str(text).expect("the object still decodes");
        assert!(listed.metadata.labels.is_none());
        for object in [listed, watched] {
            let endpoints: Result<Vec<k8s_openapi::api::discovery::v1::Endpoint>, _> =
                field("EndpointSlice", "endpoints", object.endpoints);
            let error = endpoints.expect_err("bad addresses");
            assert!(
                error.starts_with("does not decode as EndpointSlice: endpoints:"),
                "{error}"
            );
        }
    }
}
