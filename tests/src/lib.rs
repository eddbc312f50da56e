//! Test bed for proxy-agent: simulated clusters in network namespaces, the real agent
//! binary, and manifest writers. Used by the end-to-end tests and `cargo xtask demo`.
pub mod agent;
pub mod benchtargets;
pub mod changebench;
pub mod cluster;
pub mod connbench;
pub mod dns_upstream;
pub mod dnsbench;
pub mod fake_api;
pub mod flowbed;
pub mod flows;
pub mod kube_proxy_iptables;
pub mod manifests;
pub mod nodeportbench;
pub mod plots;
pub mod progbench;
pub mod progtest;
pub mod progtest6;
pub mod rssbench;
pub mod scale;
pub mod scenarios;
