//! The manifests under `deploy/` parse into the Kubernetes types they claim to be, the
//! RBAC grants exactly what the agent watches (read-only) plus Events, and the
//! `DaemonSet` has what a node agent needs without running privileged.
use std::{collections::BTreeSet, path::Path};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use proxy_agent::source::kube::{resource, KINDS};
use serde::Deserialize;

#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemonsets: Vec<DaemonSet>,
}

fn load() -> Manifests {
    load_dir("deploy")
}

/// `value` as the Kubernetes type `T`, refusing any field `T` does not have (the API
/// server of the `k8s-openapi` version would drop or refuse it): every key of the file
/// must come back when the typed object is written out again.
fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(
    value: serde_yaml::Value,
    what: &str,
) -> T {
    let given = serde_json::to_value(&value).expect("JSON");
    let typed: T = serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_json::to_value(&typed).expect("JSON");
    let mut unknown = Vec::new();
    unknown_fields(&given, &back, "", &mut unknown);
    assert!(unknown.is_empty(), "{what}: unknown fields {unknown:?}");
    typed
}

/// The paths of `given`'s keys that `back` lacks.
fn unknown_fields(
    given: &serde_json::Value,
    back: &serde_json::Value,
    path: &str,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (given, back) {
        (Value::Object(given), Value::Object(back)) => {
            for (key, value) in given {
                let at = format!("{path}.{key}");
                match back.get(key) {
                    Some(back) => unknown_fields(value, back, &at, out),
                    None => out.push(at),
                }
            }
        }
        (Value::Array(given), Value::Array(back)) => {
            for (i, (given, back)) in given.iter().zip(back).enumerate() {
                unknown_fields(given, back, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn an_unknown_field_is_caught() {
    let value: serde_yaml::Value = serde_yaml::from_str(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a, nmespace: b}\n",
    )
    .unwrap();
    let result = std::panic::catch_unwind(|| strict::<ServiceAccount>(value, "typo"));
    let message = result
        .err()
        .and_then(|e| e.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    assert!(message.contains(".metadata.nmespace"), "{message}");
}

/// The manifests of `deploy/<sub>` (its subdirectories are variants of their own).
fn load_dir(sub: &str) -> Manifests {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(sub);
    let mut m = Manifests::default();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("deploy/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            let what = format!("{kind} in {}", file.display());
            match kind.as_str() {
                "Namespace" => m.namespaces.push(strict(value, &what)),
                "ServiceAccount" => m.accounts.push(strict(value, &what)),
                "ClusterRole" => m.roles.push(strict(value, &what)),
                "ClusterRoleBinding" => m.bindings.push(strict(value, &what)),
                "DaemonSet" => m.daemonsets.push(strict(value, &what)),
                other => panic!("unexpected kind {other:?} in {}", file.display()),
            }
        }
    }
    m
}

#[test]
fn rbac_grants_what_the_agent_watches_and_nothing_more() {
    let m = load();
    assert_eq!(m.namespaces.len(), 1);
    let namespace = m.namespaces[0].metadata.name.clone().unwrap();
    let [role] = &m.roles[..] else {
        panic!("one ClusterRole")
    };
    let [binding] = &m.bindings[..] else {
        panic!("one ClusterRoleBinding")
    };
    let [account] = &m.accounts[..] else {
        panic!("one ServiceAccount")
    };
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
    assert_eq!(subject.namespace, Some(namespace.clone()));
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        for group in rule.api_groups.iter().flatten() {
            for res in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), res.clone(), verb.clone()));
                }
            }
        }
    }
    for kind in KINDS {
        let r = resource(kind);
        for verb in ["get", "list", "watch"] {
            assert!(
                granted.contains(&(r.group.clone(), r.plural.clone(), verb.to_owned())),
                "no {verb} on {}/{}",
                r.group,
                r.plural
            );
        }
    }
    for (group, res, verb) in &granted {
        let read = ["get", "list", "watch"].contains(&verb.as_str());
        assert!(
            read || res == "events",
            "{verb} on {group}/{res} is more than the agent needs"
        );
    }
    assert!(granted.contains(&(String::new(), "events".into(), "create".into())));
    assert!(granted.contains(&(String::new(), "events".into(), "patch".into())));
}

#[test]
fn the_daemonset_is_a_node_agent_without_privileged() {
    let m = load();
    let namespace = m.namespaces[0].metadata.name.clone().unwrap();
    let account = &m.accounts[0];
    let [ds] = &m.daemonsets[..] else {
        panic!("one DaemonSet")
    };
    assert_eq!(ds.metadata.namespace.as_ref(), Some(&namespace));
    let spec = ds.spec.as_ref().unwrap();
    let rolling = spec
        .update_strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    assert_eq!(
        rolling.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.service_account_name.as_ref(),
        account.metadata.name.as_ref()
    );
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "must tolerate every taint"
    );
    let c = &pod.containers[0];
    let security = c.security_context.as_ref().unwrap();
    assert_ne!(security.privileged, Some(true));
    let added: BTreeSet<&str> = security
        .capabilities
        .as_ref()
        .unwrap()
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    for cap in ["NET_ADMIN", "BPF", "SYS_ADMIN"] {
        assert!(added.contains(cap), "missing {cap}");
    }
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/livez"));
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/healthz"));
    assert!(c
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .is_some());
    let mounts: BTreeSet<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|v| v.mount_path.as_str())
        .collect();
    assert!(mounts.contains("/sys/fs/bpf"), "{mounts:?}");
    // Pods' network namespaces, where stale connected UDP sockets are destroyed.
    assert!(mounts.contains("/run/netns"), "{mounts:?}");
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    // Every flag the DaemonSet passes is one the agent accepts.
    let mut command_line = vec!["proxy-agent".to_owned()];
    command_line.extend(args);
    proxy_agent::cli::Cli::try_parse_from_args(&command_line).unwrap_or_else(|e| panic!("{e}"));
}

/// `deploy/kube-system/`: the same agent run from the cluster's `kube-proxy` `ConfigMap`,
/// in its namespace, with the main `DaemonSet`'s security context and role.
#[test]
fn the_kube_system_variant_runs_from_kube_proxys_config_map() {
    let main = load();
    let variant = load_dir("deploy/kube-system");
    let [ds] = &variant.daemonsets[..] else {
        panic!("one DaemonSet")
    };
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let [account] = &variant.accounts[..] else {
        panic!("one ServiceAccount")
    };
    assert_eq!(account.metadata.namespace.as_deref(), Some("kube-system"));
    let [binding] = &variant.bindings[..] else {
        panic!("one ClusterRoleBinding")
    };
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(subject.namespace.as_deref(), Some("kube-system"));
    assert_eq!(
        variant.roles, main.roles,
        "the role drifted from deploy/01-rbac.yaml"
    );
    let pod = |ds: &DaemonSet| ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let (pod, main_pod) = (pod(ds), pod(&main.daemonsets[0]));
    assert_eq!(pod.service_account_name, account.metadata.name);
    let (c, main_c) = (&pod.containers[0], &main_pod.containers[0]);
    assert_eq!(
        c.security_context, main_c.security_context,
        "security context drifted"
    );
    assert_eq!(c.resources, main_c.resources);
    // The ConfigMap kube-proxy reads, mounted where kubeadm's config.conf expects its
    // kubeconfig.conf, and handed to --config.
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.config_map
                .as_ref()
                .is_some_and(|c| c.name == "kube-proxy")
        })
        .expect("the kube-proxy ConfigMap as a volume");
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume.name)
        .expect("mounted");
    assert_eq!(mount.mount_path, "/var/lib/kube-proxy");
    let args = c.args.clone().unwrap_or_default();
    assert!(
        args.contains(&"--config=/var/lib/kube-proxy/config.conf".to_owned()),
        "{args:?}"
    );
    // Every other mount of the main DaemonSet is here too.
    let paths = |c: &k8s_openapi::api::core::v1::Container| -> BTreeSet<String> {
        c.volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.clone())
            .collect()
    };
    assert!(paths(main_c).is_subset(&paths(c)));
    let mut command_line = vec!["proxy-agent".to_owned()];
    command_line.extend(args);
    proxy_agent::cli::Cli::try_parse_from_args(&command_line).unwrap_or_else(|e| panic!("{e}"));
}
