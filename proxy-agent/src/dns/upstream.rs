//! Asking upstream servers: over TCP for the cluster DNS (no UDP conntrack race), over
//! UDP with a TCP retry on truncation for the node's forwarders; each server in turn.
use std::{net::SocketAddr, time::Duration};

use hickory_proto::op::Message;
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::{timeout, timeout_at},
};

const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("no upstream server configured")]
    NoServers,
    #[error("{0}: {1}")]
    Io(SocketAddr, #[source] std::io::Error),
    #[error("{0}: timed out")]
    Timeout(SocketAddr),
    #[error("{0}: unreadable answer: {1}")]
    Malformed(SocketAddr, String),
}

/// How to reach a set of servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    UdpThenTcp,
}

/// Asks `servers` in order until one answers.
pub async fn ask(
    servers: &[SocketAddr],
    transport: Transport,
    query: &Message,
) -> Result<Message, UpstreamError> {
    let mut last = UpstreamError::NoServers;
    for &server in servers {
        let result = match transport {
            Transport::Tcp => tcp(server, query).await,
            Transport::UdpThenTcp => match udp(server, query).await {
                Ok(answer) if answer.truncated() => tcp(server, query).await,
                other => other,
            },
        };
        match result {
            Ok(answer) => return Ok(answer),
            Err(error) => last = error,
        }
    }
    Err(last)
}

fn encode(server: SocketAddr, query: &Message) -> Result<Vec<u8>, UpstreamError> {
    query
        .to_vec()
        .map_err(|e| UpstreamError::Malformed(server, e.to_string()))
}

fn decode(server: SocketAddr, query: &Message, bytes: &[u8]) -> Result<Message, UpstreamError> {
    let answer =
        Message::from_vec(bytes).map_err(|e| UpstreamError::Malformed(server, e.to_string()))?;
    if answer.id() != query.id() || answer.queries() != query.queries() {
        return Err(UpstreamError::Malformed(
            server,
            "answer does not match the question".into(),
        ));
    }
    Ok(answer)
}

async fn udp(server: SocketAddr, query: &Message) -> Result<Message, UpstreamError> {
    let io = |e| UpstreamError::Io(server, e);
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let socket = UdpSocket::bind(bind).await.map_err(io)?;
    socket.connect(server).await.map_err(io)?;
    socket.send(&encode(server, query)?).await.map_err(io)?;
    let mut buffer = vec![0u8; 4096];
    // One deadline for the whole exchange: a stream of datagrams that are not the answer
    // must not keep the question waiting.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let n = timeout_at(deadline, socket.recv(&mut buffer))
            .await
            .map_err(|_| UpstreamError::Timeout(server))?
            .map_err(io)?;
        // A datagram that is not the answer (spoofed, late) is skipped, not trusted.
        if let Ok(answer) = decode(server, query, &buffer[..n]) {
            return Ok(answer);
        }
    }
}

async fn tcp(server: SocketAddr, query: &Message) -> Result<Message, UpstreamError> {
    let io = |e| UpstreamError::Io(server, e);
    let exchange = async {
        let mut stream = TcpStream::connect(server).await.map_err(io)?;
        let bytes = encode(server, query)?;
        let len = u16::try_from(bytes.len())
            .map_err(|_| UpstreamError::Malformed(server, "query too long".into()))?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend(bytes);
        stream.write_all(&framed).await.map_err(io)?;
        let len = stream.read_u16().await.map_err(io)?;
        let mut buffer = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buffer).await.map_err(io)?;
        decode(server, query, &buffer)
    };
    timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| UpstreamError::Timeout(server))?
}
