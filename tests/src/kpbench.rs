//! The bench's kube-proxy baselines run as kube-proxy runs them, each in a namespace of
//! its own: iptables mode on iptables-legacy and on iptables-nft (`iptables-restore
//! --noflush`, reading the nat table back where it would), and nftables mode (`nft -f`
//! of its transactions plus the chain and set listings each of its syncs makes).
use std::time::Instant;

use proxy_agent::model::DesiredState;
use serde_json::{json, Value};

use crate::{
    cluster::{sh_in, try_sh_in_with_stdin, Cluster},
    kube_proxy::{iptables, nftables},
};

/// The largest scale run on iptables-nft (its restores grow worse than linearly: a
/// 10 000-Service full restore takes over a minute here).
pub const IPTABLES_NFT_UP_TO: usize = 10_000;
/// A restore still running after this many seconds is stopped and reported so.
pub const RESTORE_LIMIT_S: u64 = 120;

/// One baseline: which kube-proxy, and its proxier with the namespace it writes into.
enum Proxier {
    Iptables {
        backend: &'static str,
        proxier: iptables::Proxier,
    },
    Nftables(nftables::Proxier),
}

/// A kube-proxy baseline in a namespace of its own.
pub struct Baseline {
    pub name: &'static str,
    netns: String,
    proxier: Proxier,
    /// Of the last sync's time, what reading the table back took (`iptables-save`, or
    /// nft's chain and set listings).
    pub last_read_back_s: f64,
    /// Why a sync failed: the baseline's later syncs would start from an unknown state.
    pub failed: Option<String>,
}

fn nft_config(cluster_cidr: &str) -> nftables::Config {
    nftables::Config {
        cluster_cidr: cluster_cidr.to_owned(),
        service_cidrs: "10.96.0.0/12".to_owned(),
        nodeport_ips: Vec::new(),
        node_ip: std::net::Ipv4Addr::new(10, 100, 0, 1).into(),
    }
}

impl Baseline {
    /// The baselines measured at `services` Services, each in a new namespace of
    /// `cluster` named after `tag`.
    #[must_use]
    pub fn all(cluster: &Cluster, tag: &str, services: usize, cluster_cidr: &str) -> Vec<Self> {
        let mut all = vec![
            Self {
                name: "kube-proxy iptables (legacy)",
                netns: cluster.add_netns(&format!("kpl{tag}")),
                proxier: Proxier::Iptables {
                    backend: "legacy",
                    proxier: iptables::Proxier::new(iptables::Config::for_cluster(cluster_cidr)),
                },
                last_read_back_s: 0.0,
                failed: None,
            },
            Self {
                name: "kube-proxy nftables",
                netns: cluster.add_netns(&format!("kpn{tag}")),
                proxier: Proxier::Nftables(nftables::Proxier::new(nft_config(cluster_cidr))),
                last_read_back_s: 0.0,
                failed: None,
            },
        ];
        if services <= IPTABLES_NFT_UP_TO {
            all.insert(
                1,
                Self {
                    name: "kube-proxy iptables (nft)",
                    netns: cluster.add_netns(&format!("kpt{tag}")),
                    proxier: Proxier::Iptables {
                        backend: "nft",
                        proxier: iptables::Proxier::new(iptables::Config::for_cluster(
                            cluster_cidr,
                        )),
                    },
                    last_read_back_s: 0.0,
                    failed: None,
                },
            );
        }
        all
    }

    /// The JSON key of this baseline's results.
    #[must_use]
    pub fn key(&self) -> &'static str {
        match &self.proxier {
            Proxier::Iptables {
                backend: "legacy", ..
            } => "kube_proxy_iptables_legacy",
            Proxier::Iptables { .. } => "kube_proxy_iptables_nft",
            Proxier::Nftables(_) => "kube_proxy_nftables",
        }
    }

    /// One sync to `desired` (a full one when `full`), timed from the start of its
    /// writing to the kernel's answer; the restore or transaction text it wrote is
    /// counted in lines. A restore the kernel refuses is the error.
    ///
    /// # Errors
    /// When `iptables-restore` or `nft` refuses the input.
    pub fn sync(&mut self, desired: &DesiredState, full: bool) -> Result<(f64, usize), String> {
        if let Some(failed) = &self.failed {
            return Err(format!("not measured: {failed}"));
        }
        let result = self.sync_once(desired, full);
        if let Err(error) = &result {
            self.failed = Some(error.clone());
        }
        result
    }

    fn sync_once(&mut self, desired: &DesiredState, full: bool) -> Result<(f64, usize), String> {
        let netns = self.netns.clone();
        match &mut self.proxier {
            Proxier::Iptables { backend, proxier } => {
                let input = if full {
                    proxier.full(desired)
                } else {
                    proxier.partial(desired)
                };
                let started = Instant::now();
                if proxier.saves_nat() {
                    sh_in(&netns, &[&format!("iptables-{backend}-save"), "-t", "nat"]);
                }
                self.last_read_back_s = started.elapsed().as_secs_f64();
                let limit = RESTORE_LIMIT_S.to_string();
                let restore = format!("iptables-{backend}-restore");
                let args = ["timeout", "-s", "KILL", &limit, &restore, "--noflush"];
                try_sh_in_with_stdin(&netns, &args, &input).map_err(|error| {
                    if started.elapsed().as_secs() >= RESTORE_LIMIT_S {
                        format!("stopped after {RESTORE_LIMIT_S} s")
                    } else {
                        error
                    }
                })?;
                Ok((started.elapsed().as_secs_f64(), input.lines().count()))
            }
            Proxier::Nftables(proxier) => {
                let transactions = if full {
                    proxier.full(desired)
                } else {
                    proxier.partial(desired)
                };
                let started = Instant::now();
                // Each sync lists the table's chains and sets to find stale ones.
                // (The first finds no table yet: nft's failure is the answer.)
                for what in ["chains", "sets"] {
                    let _ = std::process::Command::new("nsenter")
                        .arg(format!("--net=/run/netns/{netns}"))
                        .args(["nft", "--json", "list", what, "ip", "kube-proxy"])
                        .output();
                }
                self.last_read_back_s = started.elapsed().as_secs_f64();
                for tx in &transactions {
                    try_sh_in_with_stdin(&netns, &["nft", "-f", "-"], tx)?;
                }
                let lines = transactions.iter().map(|t| t.lines().count()).sum();
                Ok((started.elapsed().as_secs_f64(), lines))
            }
        }
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
    }
}

/// A full sync's row for each baseline: seconds (or the error) and lines written.
#[must_use]
pub fn full_syncs(baselines: &mut [Baseline], desired: &DesiredState) -> Value {
    let mut row = serde_json::Map::new();
    for baseline in baselines {
        let result = baseline.sync(desired, true);
        eprintln!("  {}: {:?}", baseline.name, result.as_ref().map(|r| r.0));
        row.insert(
            baseline.key().to_owned(),
            match result {
                Ok((seconds, lines)) => {
                    json!({"s": seconds, "lines": lines, "read_back_s": baseline.last_read_back_s})
                }
                Err(error) => json!({"error": error}),
            },
        );
    }
    Value::Object(row)
}
