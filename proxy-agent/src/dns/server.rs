//! The listeners: UDP and TCP on every `--dns-listen` address, bounded so a flood or
//! idle TCP clients cannot starve others (in-flight cap, connection cap, idle timeout).
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    time::timeout,
};
use tracing::{debug, info};

use super::resolver::{Outcome, Resolver, Via};

/// UDP queries being answered at once; more are dropped (the client retries).
const MAX_IN_FLIGHT: usize = 1024;
/// Open TCP connections; more are closed at once.
const MAX_TCP: usize = 256;
/// A TCP connection idle this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// Bound sockets, not serving yet: per address, one UDP socket per core (`SO_REUSEPORT`
/// spreads queries over them) and a TCP listener.
pub struct Listeners(Vec<(Vec<Arc<UdpSocket>>, TcpListener)>);

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Binds UDP and TCP on every address.
///
/// # Errors
/// When an address cannot be bound.
pub async fn bind(listen: &[SocketAddr]) -> std::io::Result<Listeners> {
    let mut bound = Vec::new();
    for &addr in listen {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let udp = (0..cores)
            .map(|_| udp_socket(addr).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        let tcp = TcpListener::bind(addr).await?;
        info!(%addr, "DNS listening (UDP and TCP)");
        bound.push((udp, tcp));
    }
    Ok(Listeners(bound))
}

impl Listeners {
    /// Serves until the process exits.
    ///
    /// # Errors
    /// When a socket fails.
    pub async fn serve(self, resolver: Arc<Resolver>) -> std::io::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let connections = Arc::new(Semaphore::new(MAX_TCP));
        for (sockets, tcp) in self.0 {
            for udp in sockets {
                tasks.spawn(udp_loop(udp, Arc::clone(&resolver), Arc::clone(&in_flight)));
            }
            tasks.spawn(tcp_loop(
                tcp,
                Arc::clone(&resolver),
                Arc::clone(&connections),
            ));
        }
        while let Some(result) = tasks.join_next().await {
            result.map_err(std::io::Error::other)??;
        }
        Ok(())
    }
}

async fn udp_loop(
    socket: Arc<UdpSocket>,
    resolver: Arc<Resolver>,
    in_flight: Arc<Semaphore>,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 65535];
    loop {
        let (n, client) = socket.recv_from(&mut buffer).await?;
        // Answers that need no upstream go out from this loop; only forwards get a task.
        let pending = match resolver.try_now(&buffer[..n], Via::Udp, client) {
            Outcome::Reply(Some(answer)) => {
                let _ = socket.send_to(&answer, client).await;
                continue;
            }
            Outcome::Reply(None) => continue,
            Outcome::Later(pending) => pending,
        };
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            resolver.dropped();
            continue;
        };
        let (socket, resolver) = (Arc::clone(&socket), Arc::clone(&resolver));
        tokio::spawn(async move {
            if let Some(answer) = resolver.finish(pending).await {
                let _ = socket.send_to(&answer, client).await;
            }
            drop(permit);
        });
    }
}

async fn tcp_loop(
    listener: TcpListener,
    resolver: Arc<Resolver>,
    connections: Arc<Semaphore>,
) -> std::io::Result<()> {
    loop {
        let (stream, client) = listener.accept().await?;
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            debug!(%client, "too many DNS TCP connections; closing");
            continue;
        };
        let resolver = Arc::clone(&resolver);
        tokio::spawn(async move {
            let _ = connection(stream, client, &resolver).await;
            drop(permit);
        });
    }
}

/// Length-prefixed queries in sequence until the client closes, idles, or sends garbage.
async fn connection(
    mut stream: TcpStream,
    client: SocketAddr,
    resolver: &Arc<Resolver>,
) -> std::io::Result<()> {
    let idle = |e| std::io::Error::new(std::io::ErrorKind::TimedOut, e);
    loop {
        let len = timeout(TCP_IDLE, stream.read_u16()).await.map_err(idle)??;
        let mut packet = vec![0u8; usize::from(len)];
        timeout(TCP_IDLE, stream.read_exact(&mut packet))
            .await
            .map_err(idle)??;
        let Some(answer) = resolver.handle(&packet, Via::Tcp, client).await else {
            return Ok(());
        };
        let len = u16::try_from(answer.len()).unwrap_or(u16::MAX);
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend(answer);
        stream.write_all(&framed).await?;
    }
}
