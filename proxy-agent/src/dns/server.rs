//! The listeners: UDP and TCP on every `--dns-listen` address, bounded so a flood or
//! idle TCP clients cannot starve others (in-flight cap, connection cap, idle timeout).
//! UDP is served by threads of their own, one per socket: a query wakes the thread
//! blocked on it, which answers from memory in place, with no runtime hop between the
//! packet and the answer; only queries that need an upstream go to the runtime.
use std::{
    net::{SocketAddr, UdpSocket},
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use socket2::{SockRef, Socket};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
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

/// A blocking UDP socket in the address's `SO_REUSEPORT` group.
fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
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
    /// Serves until the process exits, or until the returned future is dropped (the UDP
    /// threads then stop too).
    ///
    /// # Errors
    /// When a socket fails.
    pub async fn serve(self, resolver: Arc<Resolver>) -> std::io::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let connections = Arc::new(Semaphore::new(MAX_TCP));
        let (failed_tx, mut failed) = tokio::sync::mpsc::unbounded_channel();
        let mut threads = UdpThreads {
            stop: Arc::new(AtomicBool::new(false)),
            sockets: Vec::new(),
        };
        for (sockets, tcp) in self.0 {
            for udp in sockets {
                let serving = UdpServing {
                    socket: Arc::clone(&udp),
                    resolver: Arc::clone(&resolver),
                    in_flight: Arc::clone(&in_flight),
                    runtime: tokio::runtime::Handle::current(),
                    stop: Arc::clone(&threads.stop),
                };
                let failed_tx = failed_tx.clone();
                std::thread::Builder::new()
                    .name("dns-udp".to_owned())
                    .spawn(move || {
                        crate::background::answer_promptly();
                        // A panic ends the serving as an error does, never silently.
                        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| serving.run()))
                            .unwrap_or_else(|_| {
                                Err(std::io::Error::other("a DNS UDP thread panicked"))
                            });
                        if let Err(error) = outcome {
                            let _ = failed_tx.send(error);
                        }
                    })?;
                threads.sockets.push(udp);
            }
            tasks.spawn(tcp_loop(
                tcp,
                Arc::clone(&resolver),
                Arc::clone(&connections),
            ));
        }
        drop(failed_tx);
        loop {
            tokio::select! {
                Some(error) = failed.recv() => return Err(error),
                joined = tasks.join_next() => match joined {
                    Some(result) => result.map_err(std::io::Error::other)??,
                    None => return Ok(()),
                },
            }
        }
    }
}

/// Stops the UDP threads when dropped: the flag, then a shutdown of each socket, which
/// wakes a thread blocked in a receive.
struct UdpThreads {
    stop: Arc<AtomicBool>,
    sockets: Vec<Arc<UdpSocket>>,
}

impl Drop for UdpThreads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for socket in &self.sockets {
            // An unconnected UDP socket says ENOTCONN, but its blocked readers wake.
            let _ = SockRef::from(socket.as_ref()).shutdown(std::net::Shutdown::Read);
        }
    }
}

/// One UDP socket's thread.
struct UdpServing {
    socket: Arc<UdpSocket>,
    resolver: Arc<Resolver>,
    in_flight: Arc<Semaphore>,
    runtime: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
}

impl UdpServing {
    fn run(self) -> std::io::Result<()> {
        let mut buffer = vec![0u8; 65535];
        loop {
            let received = self.socket.recv_from(&mut buffer);
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            match received {
                Ok((n, client)) => self.answer(&buffer[..n], client),
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Answers from memory at once, or hands a query that needs an upstream to the
    /// runtime.
    fn answer(&self, packet: &[u8], client: SocketAddr) {
        let pending = match self.resolver.try_now(packet, Via::Udp, client) {
            Outcome::Reply(Some(answer)) => {
                let _ = self.socket.send_to(&answer, client);
                return;
            }
            Outcome::Reply(None) => return,
            Outcome::Later(pending) => pending,
        };
        let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
            self.resolver.dropped();
            return;
        };
        let (socket, resolver) = (Arc::clone(&self.socket), Arc::clone(&self.resolver));
        self.runtime.spawn(async move {
            if let Some(answer) = resolver.finish(pending).await {
                // Never blocks the runtime: with the send buffer full, the answer is
                // dropped and the client retries.
                let _ = SockRef::from(socket.as_ref()).send_to_with_flags(
                    &answer,
                    &client.into(),
                    libc::MSG_DONTWAIT,
                );
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

#[cfg(test)]
mod tests {
    use std::{net::UdpSocket, sync::Arc, time::Duration};

    use super::bind;
    use crate::dns::{
        metrics::DnsMetrics,
        resolver::{Resolver, Upstreams},
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn udp_threads_answer_and_stop_with_the_serving() {
        let port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free port")
            .port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let listeners = bind(&[addr]).await.expect("bind");
        let (_zone, zone_rx) = tokio::sync::watch::channel(None);
        let mut registry = prometheus_client::registry::Registry::default();
        let upstreams = Upstreams {
            cluster: Vec::new(),
            forward: Vec::new(),
        };
        let metrics = DnsMetrics::register(&mut registry);
        let resolver = Resolver::new(
            zone_rx,
            upstreams,
            metrics,
            tokio::runtime::Handle::current(),
        );
        let serving = tokio::spawn(listeners.serve(Arc::clone(&resolver)));
        // A query with an id and nothing else is answered (FORMERR), by a UDP thread.
        let answered = tokio::task::spawn_blocking(move || {
            let client = UdpSocket::bind("127.0.0.1:0").expect("client");
            client
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let query = [0x12, 0x34, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff];
            client.send_to(&query, addr).expect("send");
            let mut answer = [0u8; 512];
            let n = client.recv(&mut answer).expect("an answer");
            answer[..n].to_vec()
        })
        .await
        .expect("client");
        assert_eq!(&answered[..2], &[0x12, 0x34], "the answer carries the id");
        assert_ne!(answered[2] & 0x80, 0, "it is a response");
        // Dropping the serving stops the threads and closes their sockets: the address
        // can then be bound without SO_REUSEPORT.
        serving.abort();
        let _ = serving.await;
        let mut rebound = false;
        for _ in 0..100 {
            if UdpSocket::bind(addr).is_ok() {
                rebound = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            rebound,
            "the UDP threads kept their sockets after the serving ended"
        );
    }
}
