//! The subcommands: `run` wires source → sync → dataplane; `render` and `cleanup` are
//! one-shot.
use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::{
    cli::{CleanupArgs, DataplaneKind, DnsArgs, NodeArgs, RenderArgs, RunArgs, TraceArgs},
    dataplane::{ebpf, nftables, system, Applied, Dataplane, DataplaneError},
    dns,
    health::{self, Health},
    introspect::{self, Live},
    metrics::{self, Metrics},
    model::{self, DesiredState, LocalTraffic, NodeInfo, Plan, Snapshot},
    source::{self, manifests::ManifestsDir, SourceUpdate},
    sync,
};

/// A dataplane that programs nothing (`--dataplane none`: DNS only).
struct NoDataplane;

impl Dataplane for NoDataplane {
    fn name(&self) -> &'static str {
        "none"
    }
    fn programmed(&mut self) -> Result<DesiredState, DataplaneError> {
        Ok(DesiredState::default())
    }
    fn apply(&mut self, _plan: &Plan, _desired: &DesiredState) -> Result<Applied, DataplaneError> {
        Ok(Applied::default())
    }
}

fn node_name(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    })
}

fn start_ebpf(args: &RunArgs, local: &LocalTraffic) -> Result<ebpf::EbpfDataplane> {
    system::ensure_bpffs(&args.paths.bpffs)?;
    let cgroup = match &args.paths.cgroup_root {
        Some(path) => path.clone(),
        None => system::default_cgroup_root()?,
    };
    Ok(ebpf::EbpfDataplane::start(
        &args.paths.bpffs,
        &cgroup,
        Some(local),
        ebpf::Sizing {
            maglev_table_size: args.maglev_table_size,
            lb_map_max: args.bpf_lb_map_max,
        },
    )?)
}

fn start_nftables(
    args: &RunArgs,
    local: &LocalTraffic,
    reason: &str,
) -> Result<Box<dyn Dataplane>> {
    let dataplane = nftables::NftablesDataplane::start(local.clone())
        .context("starting the nftables dataplane")?;
    // A previous eBPF agent's socket programs would translate before our rules see a packet.
    if let Err(error) = ebpf::loader::cleanup(&args.paths.bpffs) {
        warn!(%error, "could not remove a previous eBPF dataplane's pins");
    }
    if let Err(error) = ebpf::nodeport::remove_netfilter_table() {
        debug!(%error, "no eBPF netfilter table to remove");
    }
    info!(dataplane = "nftables", reason, "dataplane chosen");
    Ok(Box::new(dataplane))
}

fn start_dataplane(args: &RunArgs, local: &LocalTraffic) -> Result<Box<dyn Dataplane>> {
    let ebpf = match args.dataplane {
        DataplaneKind::None => return Ok(Box::new(NoDataplane)),
        DataplaneKind::Nftables => return start_nftables(args, local, "requested"),
        DataplaneKind::Ebpf => start_ebpf(args, local).context("starting the eBPF dataplane")?,
        DataplaneKind::Auto => match start_ebpf(args, local) {
            Ok(dataplane) => dataplane,
            Err(error) => {
                let reason = format!("auto: the eBPF programs could not load ({error:#})");
                warn!(%reason, "falling back to nftables");
                return start_nftables(args, local, &reason);
            }
        },
    };
    // A previous nftables agent's rules would translate what the socket LB leaves alone.
    if let Err(error) = nftables::cleanup() {
        debug!(%error, "no nftables tables to remove");
    }
    let reason = if args.dataplane == DataplaneKind::Auto {
        "auto: eBPF programs loaded"
    } else {
        "requested"
    };
    info!(dataplane = "ebpf", reason, "dataplane chosen");
    Ok(Box::new(ebpf))
}

fn dns_config(args: &DnsArgs) -> dns::DnsConfig {
    let forward = if args.dns_forward.is_empty() {
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        dns::resolv_conf_servers(&conf, &args.dns_listen)
    } else {
        args.dns_forward.clone()
    };
    dns::DnsConfig {
        listen: args.dns_listen.clone(),
        upstreams: dns::resolver::Upstreams {
            cluster: args.dns_upstream.clone(),
            forward,
        },
        domain: args.cluster_domain.clone(),
        ttl: args.dns_ttl,
        redirect: None,
        notrack: false,
    }
}

/// Runs a server for good. A failure (most often its address taken) ends the agent with
/// `--bind-address-hard-fail`; otherwise it is logged and tried again every 5 s, and the
/// agent goes on programming (kube-proxy's behaviour).
async fn keep_serving<F, Fut>(name: &'static str, hard_fail: bool, serve: F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>>,
{
    loop {
        let result = serve().await;
        if hard_fail {
            return result;
        }
        if let Err(error) = result {
            error!(server = name, %error, "cannot serve; trying again in 5 s (--bind-address-hard-fail would exit)");
        } else {
            warn!(server = name, "server stopped; starting it again in 5 s");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

type ServerTask = tokio::task::JoinHandle<std::io::Result<()>>;

/// The health and the metrics servers, each kept serving (see [`keep_serving`]).
fn spawn_servers(
    args: &RunArgs,
    health: &Arc<Health>,
    metrics: &Arc<Metrics>,
    live: &Arc<Live>,
) -> (ServerTask, ServerTask) {
    let hard_fail = args.bind_address_hard_fail;
    let (healthz_at, health) = (args.healthz_bind_address, Arc::clone(health));
    let healthz = tokio::spawn(keep_serving("healthz", hard_fail, move || {
        health::serve(healthz_at, Arc::clone(&health))
    }));
    let (metrics_at, metrics, live) = (
        args.metrics_bind_address,
        Arc::clone(metrics),
        Arc::clone(live),
    );
    let metrics = tokio::spawn(keep_serving("metrics", hard_fail, move || {
        metrics::serve(metrics_at, Arc::clone(&metrics), Arc::clone(&live))
    }));
    (healthz, metrics)
}

pub async fn run(args: RunArgs) -> Result<()> {
    let node = args
        .node
        .node_info(&node_name(args.node_name.clone()))
        .map_err(anyhow::Error::msg)?;
    // The source reads the cluster on a thread of its own while the dataplane loads (at
    // 30 000 Services the first lists take most of a second).
    let (tx, rx) = watch::channel(SourceUpdate::default());
    let source = if let Some(dir) = args.manifests.clone() {
        tokio::spawn(source::manifests::run(dir, tx))
    } else {
        let rate = source::rate::ApiRate {
            qps: args.kube_api_qps,
            burst: args.kube_api_burst,
        };
        let watching =
            source::kube::spawn(args.kubeconfig.clone(), rate, node.name.clone(), tx).await?;
        info!(node = %node.name, "watching the Kubernetes API");
        tokio::spawn(watching)
    };
    let dataplane = start_dataplane(&args, &node.local())?;
    let dataplane_name = dataplane.name();
    let health = Arc::new(Health::new(
        dataplane.name(),
        Duration::from_secs(args.healthz_stale_after),
    ));
    let live = Arc::new(Live::new(dataplane.name(), args.paths.bpffs.clone()));
    let mut collectors: Vec<Box<dyn prometheus_client::collector::Collector>> =
        vec![Box::new(metrics::datapath::ConntrackSize)];
    if dataplane.name() == "nftables" {
        collectors.push(Box::new(metrics::datapath::NftablesVerdicts));
    }
    if let Some(index) = dataplane.ebpf_index() {
        collectors.push(Box::new(metrics::datapath::EbpfCounters {
            bpffs: args.paths.bpffs.clone(),
            index,
            live: live.clone(),
            sockets_destroyed: dataplane.sockets_destroyed().unwrap_or_default(),
        }));
    }
    let metrics = Arc::new(Metrics::new(dataplane.name(), &health.answers, collectors));
    let (server, metrics_server) = spawn_servers(&args, &health, &metrics, &live);
    let redirecting_dns = !args.dns.dns_listen.is_empty() && dataplane_name == "ebpf";
    let notrack_dns = !args.dns.dns_listen.is_empty() && dataplane_name == "nftables";
    let dns = if args.dns.dns_listen.is_empty() {
        None
    } else {
        let mut config = dns_config(&args.dns);
        if redirecting_dns {
            config.redirect = Some(args.paths.bpffs.clone());
        }
        config.notrack = notrack_dns;
        info!(listen = ?config.listen, cluster = ?config.upstreams.cluster, forward = ?config.upstreams.forward, "NodeLocal DNS on");
        Some(
            dns::start(config, rx.clone(), metrics.dns.clone())
                .await
                .context("starting the DNS responder")?,
        )
    };
    let dns = async move {
        match dns {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    let addresses = source::addresses::follow().await.unwrap_or_else(|error| {
        warn!(%error, "cannot follow the node's addresses; NodePorts use the Node object's");
        watch::channel(Vec::new()).1
    });
    let sync = sync::spawn(sync::Inputs {
        updates: rx,
        addresses,
        dataplane,
        node: node.clone(),
        health,
        metrics,
        live,
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        runtime: tokio::runtime::Handle::current(),
    });
    info!(node = %node.name, "agent running");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: exiting, programmed state left in place"),
        _ = tokio::signal::ctrl_c() => info!("interrupted: exiting, programmed state left in place"),
        result = source => bail!("source stopped: {:?}", result?),
        result = server => bail!("health server stopped: {:?}", result?),
        result = metrics_server => bail!("metrics server stopped: {:?}", result?),
        result = sync => bail!("sync loop stopped: {:?}", result),
        result = dns => bail!("DNS responder stopped: {:?}", result),
    }
    if redirecting_dns {
        // The listener goes away with us: kube-dns takes the queries at once.
        dns::redirect::clear(&args.paths.bpffs);
    }
    if notrack_dns {
        // Without the listener, kube-dns's ClusterIP must go through the DNAT again.
        if let Err(error) = dns::notrack::remove() {
            warn!(%error, "cannot remove the DNS NOTRACK rules");
        }
    }
    Ok(())
}

/// A manifests directory as `node` would program it: the offline input of `render`
/// and `trace`.
fn offline_state(
    dir: &Path,
    node: &NodeArgs,
    node_name: &str,
) -> Result<(Snapshot, NodeInfo, DesiredState)> {
    let mut manifests = ManifestsDir::new(dir);
    manifests.reload()?;
    let snapshot = manifests.snapshot();
    let node = node
        .node_info(node_name)
        .map_err(anyhow::Error::msg)?
        .with_node_object(&snapshot);
    let desired = model::build(&snapshot, &node);
    Ok((snapshot, node, desired))
}

pub fn render(args: &RenderArgs) -> Result<()> {
    let (_, node, desired) = offline_state(&args.manifests, &args.node, &args.node_name)?;
    match args.dataplane {
        DataplaneKind::Ebpf | DataplaneKind::Auto => {
            println!("{}", ebpf::render::render(&desired)?);
        }
        DataplaneKind::None => print!("{desired}"),
        DataplaneKind::Nftables => print!("{}", nftables::ruleset::render(&desired, &node.local())),
    }
    Ok(())
}

pub fn trace(args: &TraceArgs) -> Result<()> {
    let trace = match (&args.manifests, &args.node_name) {
        (Some(dir), Some(node_name)) => trace_offline(args, dir, node_name)?,
        _ => trace_live(args)?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&trace)?);
    } else {
        print!("{trace}");
    }
    Ok(())
}

fn trace_offline(args: &TraceArgs, dir: &Path, node_name: &str) -> Result<model::explain::Trace> {
    let (destination, port, protocol) =
        introspect::parse_destination(&args.to).map_err(anyhow::Error::msg)?;
    let (snapshot, node, state) = offline_state(dir, &args.node, node_name)?;
    let packet = model::flow::Packet {
        source: args.from,
        protocol,
        destination,
        port,
        interface: in_interface(args)?,
    };
    Ok(model::explain::trace(&snapshot, &state, &node, packet))
}

/// `--in-interface`, checked.
fn in_interface(args: &TraceArgs) -> Result<Option<model::flow::IfName>> {
    args.in_interface
        .as_deref()
        .map(|name| {
            model::flow::IfName::new(name)
                .with_context(|| format!("--in-interface {name}: not an interface name"))
        })
        .transpose()
}

/// Asks the running agent's `/debug/trace` (plain HTTP/1.0 on its metrics address).
fn trace_live(args: &TraceArgs) -> Result<model::explain::Trace> {
    let encode = |s: &str| {
        s.replace('[', "%5B")
            .replace(']', "%5D")
            .replace('/', "%2F")
            .replace(':', "%3A")
    };
    let mut path = format!(
        "/debug/trace?from={}&to={}",
        encode(&args.from.to_string()),
        encode(&args.to)
    );
    if let Some(name) = in_interface(args)? {
        path = path + "&iif=" + &encode(name.as_str());
    }
    let body = crate::debug::agent_get(args.agent, &path)
        .context("asking the running agent (or pass --manifests DIR --node-name N)")?;
    Ok(serde_json::from_str(&body)?)
}

pub fn cleanup(args: &CleanupArgs) -> Result<()> {
    if matches!(args.dataplane, DataplaneKind::Auto | DataplaneKind::Ebpf) {
        let bpffs: &Path = &args.paths.bpffs;
        let removed = ebpf::loader::cleanup(bpffs)
            .with_context(|| format!("cleaning {}", bpffs.display()))?;
        info!(bpffs = %bpffs.display(), removed, "eBPF programs detached and maps removed");
        if let Err(error) = ebpf::nodeport::remove_netfilter_table() {
            warn!(%error, "cannot remove the eBPF dataplane's netfilter table");
        }
    }
    if matches!(
        args.dataplane,
        DataplaneKind::Auto | DataplaneKind::Nftables
    ) {
        match nftables::cleanup() {
            Ok(()) => info!(table = nftables::table::TABLE, "nftables tables removed"),
            Err(error) if args.dataplane == DataplaneKind::Auto => {
                warn!(%error, "nftables cleanup skipped");
            }
            Err(error) => return Err(error.into()),
        }
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(dns::iface::remove())
        .context("removing the DNS interface")?;
    if let Err(error) = dns::notrack::remove() {
        debug!(%error, "no DNS NOTRACK table to remove");
    }
    info!(interface = dns::iface::INTERFACE, "DNS interface removed");
    Ok(())
}
