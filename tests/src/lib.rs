//! Test bed for proxy-agent: simulated clusters in network namespaces, the real agent
//! binary, and manifest writers. Used by the end-to-end tests and `cargo xtask demo`.
pub mod agent;
pub mod api_echo;
pub mod benchcompare;
pub mod benchtargets;
pub mod changebench;
pub mod cluster;
pub mod connbench;
pub mod container;
pub mod dns_upstream;
pub mod dnsbench;
pub mod dnschurn;
pub mod fake_api;
pub mod flowbed;
pub mod flows;
pub mod kpbench;
pub mod kube_proxy;
pub mod manifests;
pub mod nodeportbench;
pub mod plots;
pub mod progbench;
pub mod progtest;
pub mod progtest6;
pub mod rssbench;
pub mod scale;
pub mod scenarios;

/// The `q` quantile of an ascending sample (nearest rank); `None` when it is empty.
#[must_use]
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short sample"
    )]
    let index = (sorted.len().checked_sub(1)? as f64 * q).round() as usize;
    sorted.get(index).copied()
}
