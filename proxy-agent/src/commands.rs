//! The subcommands: `run` wires source → sync → dataplane; `render` and `cleanup` are
//! one-shot.
use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    cli::{CleanupArgs, DataplaneKind, RenderArgs, RunArgs, TraceArgs},
    dataplane::{ebpf, system, Dataplane, DataplaneError},
    health::{self, Health},
    metrics::{self, Metrics},
    model::{self, DesiredState, Plan},
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
    fn apply(&mut self, _plan: &Plan) -> Result<usize, DataplaneError> {
        Ok(0)
    }
}

fn node_name(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    })
}

fn start_dataplane(args: &RunArgs) -> Result<Box<dyn Dataplane>> {
    match args.dataplane {
        DataplaneKind::None => Ok(Box::new(NoDataplane)),
        DataplaneKind::Nftables => {
            bail!("the nftables dataplane is not built yet; use --dataplane ebpf")
        }
        DataplaneKind::Ebpf | DataplaneKind::Auto => {
            system::ensure_bpffs(&args.paths.bpffs)?;
            let cgroup = match &args.paths.cgroup_root {
                Some(path) => path.clone(),
                None => system::default_cgroup_root()?,
            };
            let dataplane = ebpf::EbpfDataplane::start(&args.paths.bpffs, &cgroup)
                .context("starting the eBPF dataplane")?;
            info!(
                dataplane = "ebpf",
                reason = if args.dataplane == DataplaneKind::Auto {
                    "auto: eBPF programs loaded"
                } else {
                    "requested"
                },
                "dataplane chosen"
            );
            Ok(Box::new(dataplane))
        }
    }
}

pub async fn run(args: RunArgs) -> Result<()> {
    let node = args.node.node_info(&node_name(args.node_name.clone()));
    let dataplane = start_dataplane(&args)?;
    let health = Arc::new(Health::new(
        dataplane.name(),
        Duration::from_secs(args.healthz_stale_after),
    ));
    let metrics = Arc::new(Metrics::new(dataplane.name()));
    let server = tokio::spawn(health::serve(args.healthz_bind_address, health.clone()));
    let metrics_server = tokio::spawn(metrics::serve(args.metrics_bind_address, metrics.clone()));
    let (tx, rx) = watch::channel(SourceUpdate::default());
    let source = if let Some(dir) = args.manifests.clone() {
        tokio::spawn(source::manifests::run(dir, tx))
    } else {
        let client = source::kube::client(args.kubeconfig.as_deref()).await?;
        info!(node = %node.name, "watching the Kubernetes API");
        tokio::spawn(source::kube::run(
            client,
            node.name.clone(),
            tx,
            args.min_sync_period,
        ))
    };
    let sync = tokio::spawn(sync::run(rx, dataplane, node.clone(), health, metrics));
    info!(node = %node.name, "agent running");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: exiting, programmed state left in place"),
        _ = tokio::signal::ctrl_c() => info!("interrupted: exiting, programmed state left in place"),
        result = source => bail!("source stopped: {:?}", result?),
        result = server => bail!("health server stopped: {:?}", result?),
        result = metrics_server => bail!("metrics server stopped: {:?}", result?),
        result = sync => bail!("sync loop stopped: {:?}", result),
    }
    Ok(())
}

pub fn render(args: &RenderArgs) -> Result<()> {
    let mut dir = ManifestsDir::new(&args.manifests);
    dir.reload()?;
    let snapshot = dir.snapshot();
    let node = args
        .node
        .node_info(&args.node_name)
        .with_node_object(&snapshot);
    let desired = model::build(&snapshot, &node);
    match args.dataplane {
        DataplaneKind::Ebpf | DataplaneKind::Auto => {
            println!("{}", ebpf::render::render(&desired)?);
        }
        DataplaneKind::None => print!("{desired}"),
        DataplaneKind::Nftables => bail!("the nftables dataplane is not built yet"),
    }
    Ok(())
}

pub fn trace(args: &TraceArgs) -> Result<()> {
    let (address, protocol) = match args.to.rsplit_once('/') {
        Some((address, proto)) => (address, proto.to_uppercase()),
        None => (args.to.as_str(), "TCP".to_owned()),
    };
    let destination: std::net::SocketAddr = address
        .parse()
        .with_context(|| format!("--to {address}: want IP:PORT or [IP]:PORT"))?;
    let protocol = model::Protocol::from_k8s(Some(&protocol))
        .with_context(|| format!("--to protocol {protocol}: want tcp, udp or sctp"))?;
    let mut dir = ManifestsDir::new(&args.manifests);
    dir.reload()?;
    let snapshot = dir.snapshot();
    let node = args
        .node
        .node_info(&args.node_name)
        .with_node_object(&snapshot);
    let state = model::build(&snapshot, &node);
    let packet = model::flow::Packet {
        source: args.from,
        protocol,
        destination: destination.ip(),
        port: destination.port(),
    };
    let trace = model::explain::trace(&snapshot, &state, &node, packet);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&trace)?);
    } else {
        print!("{trace}");
    }
    Ok(())
}

pub fn cleanup(args: &CleanupArgs) -> Result<()> {
    if matches!(args.dataplane, DataplaneKind::Auto | DataplaneKind::Ebpf) {
        let bpffs: &Path = &args.paths.bpffs;
        let removed = ebpf::loader::cleanup(bpffs)
            .with_context(|| format!("cleaning {}", bpffs.display()))?;
        info!(bpffs = %bpffs.display(), removed, "eBPF programs detached and maps removed");
    }
    if args.dataplane == DataplaneKind::Nftables {
        warn!("nothing to clean for nftables yet");
    }
    Ok(())
}
