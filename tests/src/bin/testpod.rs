//! Runs inside a simulated pod: `serve` answers every TCP connection and UDP datagram
//! with the pod's name and the peer address it saw (and `echo:PORT` echoes lines on a
//! connection kept open); `request` is the client, printing one line per attempt;
//! `hold` keeps one connection busy; `http-get` reads the agent's health endpoint, `http` sends it any method.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

fn usage() -> ! {
    eprintln!(
        "usage: testpod serve NAME [tcp:PORT|udp:PORT|echo:PORT]...\n       testpod hold IP:PORT MILLISECONDS\n       testpod request tcp|udp|udp-connected IP:PORT COUNT\n       testpod request-for tcp|udp IP:PORT MILLISECONDS\n       testpod http-get IP:PORT PATH\n       testpod http METHOD IP:PORT PATH\n       testpod serve-each tcp:IP:PORT|udp:IP:PORT...\n       testpod probe tcp|udp SOURCE IP:PORT COUNT TIMEOUT_MS\n       testpod udp-from SOURCE_PORT IP:PORT COUNT\n       testpod udp-hold IP:PORT MILLISECONDS\n       testpod serve-rate PORT\n       testpod rate IP:PORT MILLISECONDS\n       testpod rate-blocks IP:PORT START_UNIX_MS BLOCK_MS BLOCKS PHASE\n       testpod udp-rate IP:PORT MILLISECONDS\n       testpod udp-flood IP:PORT MILLISECONDS\n       testpod first-from IP:PORT NAME MILLISECONDS"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") if args.len() >= 3 => serve(&args[1], &args[2..]),
        Some("request") if args.len() == 4 => {
            let to: SocketAddr = args[2].parse().unwrap_or_else(|_| usage());
            let count: usize = args[3].parse().unwrap_or_else(|_| usage());
            for _ in 0..count {
                println!("{}", request(&args[1], to));
            }
        }
        Some("request-for") if args.len() == 4 => {
            let to: SocketAddr = args[2].parse().unwrap_or_else(|_| usage());
            let millis: u64 = args[3].parse().unwrap_or_else(|_| usage());
            request_for(&args[1], to, Duration::from_millis(millis));
        }
        Some("udp-from") if args.len() == 4 => {
            // Every datagram from one fixed source port: one flow for conntrack.
            let sport: u16 = args[1].parse().unwrap_or_else(|_| usage());
            let to: SocketAddr = args[2].parse().unwrap_or_else(|_| usage());
            let count: usize = args[3].parse().unwrap_or_else(|_| usage());
            let started = Instant::now();
            let socket = UdpSocket::bind(("0.0.0.0", sport)).expect("bind source port");
            socket
                .set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            let mut buf = [0u8; 1500];
            for _ in 0..count {
                let reply = socket
                    .send_to(b"hi", to)
                    .and_then(|_| socket.recv_from(&mut buf));
                match reply {
                    Ok((n, from)) => {
                        println!("ok {} {from}", String::from_utf8_lossy(&buf[..n]).trim());
                    }
                    Err(e) => println!("err {:?} {}", e.kind(), started.elapsed().as_millis()),
                }
            }
        }
        Some("udp-hold") if args.len() == 3 => {
            let to: SocketAddr = args[1].parse().unwrap_or_else(|_| usage());
            let millis: u64 = args[2].parse().unwrap_or_else(|_| usage());
            udp_hold(to, Duration::from_millis(millis));
        }
        Some("http-get") if args.len() == 3 => http("GET", &args[1], &args[2]),
        Some("http") if args.len() == 4 => http(&args[1], &args[2], &args[3]),
        Some("hold") if args.len() == 3 => {
            let to: SocketAddr = args[1].parse().unwrap_or_else(|_| usage());
            let millis: u64 = args[2].parse().unwrap_or_else(|_| usage());
            hold(to, Duration::from_millis(millis));
        }
        Some("serve-rate") if args.len() == 2 => {
            serve_rate(args[1].parse().unwrap_or_else(|_| usage()));
        }
        Some("rate") if args.len() == 3 => {
            let to: SocketAddr = args[1].parse().unwrap_or_else(|_| usage());
            let millis: u64 = args[2].parse().unwrap_or_else(|_| usage());
            rate(to, Duration::from_millis(millis));
        }
        Some("rate-blocks") if args.len() == 6 => {
            let to: SocketAddr = args[1].parse().unwrap_or_else(|_| usage());
            let numbers: Vec<u64> = args[2..]
                .iter()
                .map(|a| a.parse().unwrap_or_else(|_| usage()))
                .collect();
            rate_blocks(
                to,
                numbers[0],
                Duration::from_millis(numbers[1]),
                numbers[2],
                numbers[3],
            );
        }
        Some("udp-rate") if args.len() == 3 => {
            let to: SocketAddr = args[1].parse().unwrap_or_else(|_| usage());
            let millis: u64 = args[2].parse().unwrap_or_else(|_| usage());
            udp_rate(to, Duration::from_millis(millis));
        }
        Some("udp-flood") if args.len() == 3 => {
            let to: SocketAddr = args[1].parse().unwrap_or_else(|_| usage());
            let millis: u64 = args[2].parse().unwrap_or_else(|_| usage());
            udp_flood(to, Duration::from_millis(millis));
        }
        Some("serve-each") if args.len() >= 2 => serve_each(&args[1..]),
        Some("first-from") if args.len() == 4 => {
            let to: SocketAddr = args[1].parse().unwrap_or_else(|_| usage());
            let millis: u64 = args[3].parse().unwrap_or_else(|_| usage());
            first_from(to, &args[2], Duration::from_millis(millis));
        }
        Some("probe") if args.len() == 6 => {
            let source: std::net::IpAddr = args[2].parse().unwrap_or_else(|_| usage());
            let to: SocketAddr = args[3].parse().unwrap_or_else(|_| usage());
            let count: usize = args[4].parse().unwrap_or_else(|_| usage());
            let timeout = Duration::from_millis(args[5].parse().unwrap_or_else(|_| usage()));
            for _ in 0..count {
                println!("{}", probe(&args[1], source, to, timeout));
            }
        }
        _ => usage(),
    }
}

/// A socket bound to `addr`; an IPv6 one takes IPv6 only, so IPv4 peers keep showing
/// as IPv4 addresses on the IPv4 twin.
fn bound(addr: SocketAddr, kind: socket2::Type) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), kind, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if kind == socket2::Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = bound(addr, socket2::Type::STREAM)?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Serves each listener on IPv4 and, where the pod has IPv6, on IPv6 too.
fn serve(name: &str, listeners: &[String]) {
    let mut threads = Vec::new();
    for spec in listeners {
        let (proto, port) = spec.split_once(':').unwrap_or_else(|| usage());
        let port: u16 = port.parse().unwrap_or_else(|_| usage());
        let v4 = SocketAddr::from(([0, 0, 0, 0], port));
        let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
        for addr in [v4, v6] {
            let required = addr.is_ipv4();
            if let Some(thread) = serve_one(name, proto, addr, required) {
                threads.push(thread);
            }
        }
    }
    println!("ready");
    for t in threads {
        let _ = t.join();
    }
}

/// One listener's thread; `None` where an optional (IPv6) address cannot be bound.
fn serve_one(
    name: &str,
    proto: &str,
    addr: SocketAddr,
    required: bool,
) -> Option<thread::JoinHandle<()>> {
    let unbound = |e: std::io::Error| {
        assert!(!required, "bind {proto} {addr}: {e}");
    };
    let name = name.to_owned();
    match proto {
        "tcp" | "echo" => {
            let listener = tcp_listener(addr).map_err(unbound).ok()?;
            let echo = proto == "echo";
            Some(thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    if echo {
                        let name = name.clone();
                        thread::spawn(move || echo_lines(&name, stream));
                        continue;
                    }
                    let peer = stream
                        .peer_addr()
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    let mut stream = stream;
                    let _ = stream.write_all(format!("{name} {peer}\n").as_bytes());
                }
            }))
        }
        "udp" => {
            let socket: UdpSocket = bound(addr, socket2::Type::DGRAM)
                .map_err(unbound)
                .ok()?
                .into();
            Some(thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(format!("{name} {peer}\n").as_bytes(), peer);
                }
            }))
        }
        _ => usage(),
    }
}

/// Answers each line of one connection with `<name> <line>` until the peer closes.
fn echo_lines(name: &str, stream: TcpStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let reader = std::io::BufReader::new(stream);
    for line in std::io::BufRead::lines(reader) {
        let Ok(line) = line else { return };
        if writer
            .write_all(format!("{name} {line}\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
}

/// One connection for a while, a line sent and its echo read every 10 ms; prints
/// `exchanges=N err=0` or, at the first failure, `exchanges=N err=1 <kind>`.
fn hold(to: SocketAddr, duration: Duration) {
    let started = Instant::now();
    let mut exchanges = 0u64;
    let result = (|| -> std::io::Result<()> {
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut writer = stream.try_clone()?;
        let mut reader = std::io::BufReader::new(stream);
        while started.elapsed() < duration {
            writer.write_all(format!("ping {exchanges}\n").as_bytes())?;
            let mut line = String::new();
            if std::io::BufRead::read_line(&mut reader, &mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if !line.trim_end().ends_with(&format!("ping {exchanges}")) {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
            exchanges += 1;
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    })();
    match result {
        Ok(()) => println!("exchanges={exchanges} err=0"),
        Err(e) => println!("exchanges={exchanges} err=1 {:?}", e.kind()),
    }
}

/// Requests back to back for a while; prints `ok=N err=M p50_us=X p99_us=Y` (latency
/// of the whole connect, request, response and close) and the first errors, each with
/// when it started.
fn request_for(proto: &str, to: SocketAddr, duration: Duration) {
    let started = Instant::now();
    let (mut ok, mut errors) = (0u64, Vec::new());
    let mut micros = Vec::new();
    while started.elapsed() < duration {
        let one = Instant::now();
        let line = request(proto, to);
        if line.starts_with("ok ") {
            ok += 1;
            micros.push(one.elapsed().as_micros());
        } else {
            let at = one.duration_since(started).as_millis();
            errors.push(format!("{line} (started at {at} ms)"));
        }
    }
    micros.sort_unstable();
    let quantile = |q: usize| micros.get(micros.len() * q / 100).copied().unwrap_or(0);
    println!(
        "ok={ok} err={} p50_us={} p99_us={}",
        errors.len(),
        quantile(50),
        quantile(99)
    );
    for line in errors.iter().take(5) {
        println!("{line}");
    }
}

/// One attempt: `ok <pod> <peer the server saw> <address the client saw>` or
/// `err <error kind> <milliseconds>`.
fn request(proto: &str, to: SocketAddr) -> String {
    let started = Instant::now();
    let result = match proto {
        "tcp" => tcp_request(to),
        "udp" => udp_request(to, false),
        "udp-connected" => udp_request(to, true),
        _ => usage(),
    };
    match result {
        Ok((reply, seen)) => format!("ok {} {seen}", reply.trim()),
        Err(e) => format!("err {:?} {}", e.kind(), started.elapsed().as_millis()),
    }
}

/// Connects to `to` again and again until the pod `name` answers; prints when that was
/// (microseconds since the Unix epoch), the attempts made, and how many failed.
fn first_from(to: SocketAddr, name: &str, duration: Duration) {
    let started = Instant::now();
    let (mut attempts, mut failed) = (0u64, 0u64);
    let mut last_error = String::from("-");
    while started.elapsed() < duration {
        attempts += 1;
        let reply = TcpStream::connect_timeout(&to, Duration::from_millis(50)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(reply)
        });
        match reply {
            Ok(reply) if reply.split_whitespace().next() == Some(name) => {
                let at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros());
                println!("first {at} attempts {attempts} failed {failed} last-error {last_error}");
                return;
            }
            Ok(_) => {}
            Err(error) => {
                failed += 1;
                last_error = format!("{:?}@{}", error.kind(), started.elapsed().as_millis());
            }
        }
    }
    println!("never attempts {attempts} failed {failed} last-error {last_error}");
}

fn tcp_request(to: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let seen = stream.peer_addr()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    // Closed with a reset once the server has closed: its socket then keeps no
    // TIME_WAIT, which a later connection's SYN could meet through the fully random
    // source ports of kube-proxy-style masquerade (about 1 in 10 000 then times out).
    socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    Ok((reply, seen))
}

fn udp_request(to: SocketAddr, connected: bool) -> std::io::Result<(String, SocketAddr)> {
    let socket = if to.is_ipv6() {
        UdpSocket::bind("[::]:0")?
    } else {
        UdpSocket::bind("0.0.0.0:0")?
    };
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    if connected {
        socket.connect(to)?;
        socket.send(b"hi")?;
    } else {
        socket.send_to(b"hi", to)?;
    }
    let mut buf = [0u8; 1500];
    let (n, from) = socket.recv_from(&mut buf)?;
    let seen = if connected { socket.peer_addr()? } else { from };
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), seen))
}

/// One connected UDP socket exchanging a datagram every 50 ms for a while, as a
/// long-lived client would: prints `ok POD` per answer, and on an error
/// `err KIND ERRNO` and `reconnect` before replacing the socket with a new one.
fn udp_hold(to: SocketAddr, duration: Duration) {
    let started = Instant::now();
    let connect = || -> std::io::Result<UdpSocket> {
        let socket = UdpSocket::bind(if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        socket.connect(to)?;
        Ok(socket)
    };
    let mut socket = connect().expect("connect");
    let mut buf = [0u8; 1500];
    while started.elapsed() < duration {
        match socket.send(b"hi").and_then(|_| socket.recv(&mut buf)) {
            Ok(n) => {
                let reply = String::from_utf8_lossy(&buf[..n]);
                println!("ok {}", reply.split_whitespace().next().unwrap_or_default());
            }
            Err(e) => {
                println!("err {:?} {}", e.kind(), e.raw_os_error().unwrap_or(0));
                println!("reconnect");
                socket = connect().expect("reconnect");
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn http(method: &str, addr: &str, path: &str) {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        println!("000");
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ =
        stream.write_all(format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes());
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response.split_whitespace().nth(1).unwrap_or("000");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    println!("{status} {body}");
}

/// One listener per endpoint address, each answering `<its own address> <peer>`: a
/// probe then sees which endpoint a translated connection reached and from where.
fn serve_each(listeners: &[String]) {
    let mut threads = Vec::new();
    for spec in listeners {
        let (proto, addr) = spec.split_once(':').unwrap_or_else(|| usage());
        let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
        if proto == "tcp" {
            let listener = TcpListener::bind(addr).expect("bind tcp");
            threads.push(thread::spawn(move || {
                for mut stream in listener.incoming().flatten() {
                    let peer = stream
                        .peer_addr()
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    let _ = stream.write_all(format!("{addr} {peer}\n").as_bytes());
                }
            }));
        } else {
            let socket = UdpSocket::bind(addr).expect("bind udp");
            threads.push(thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(format!("{addr} {peer}\n").as_bytes(), peer);
                }
            }));
        }
    }
    println!("ready");
    for t in threads {
        let _ = t.join();
    }
}

/// One connection from `source` (a fresh port each time): `ok <endpoint> <peer it saw>`
/// or `err <kind>`.
fn probe(proto: &str, source: std::net::IpAddr, to: SocketAddr, timeout: Duration) -> String {
    let result = match proto {
        "tcp" => probe_tcp(source, to, timeout),
        "udp" => probe_udp(source, to, timeout),
        _ => usage(),
    };
    match result {
        Ok(reply) => format!("ok {}", reply.trim()),
        Err(e) => format!("err {:?}", e.kind()),
    }
}

fn probe_tcp(
    source: std::net::IpAddr,
    to: SocketAddr,
    timeout: Duration,
) -> std::io::Result<String> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&to.into(), timeout)?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout))?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

fn probe_udp(
    source: std::net::IpAddr,
    to: SocketAddr,
    timeout: Duration,
) -> std::io::Result<String> {
    let socket = UdpSocket::bind(SocketAddr::new(source, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(to)?;
    socket.send(b"probe")?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The connection-rate server: per connection, read the request byte, answer one line,
/// then wait for the client's close. Two accepting threads.
fn serve_rate(port: u16) {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    let udp = UdpSocket::bind(("0.0.0.0", port)).expect("bind udp");
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], peer);
        }
    });
    println!("ready");
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let listener = listener.try_clone().expect("clone listener");
            thread::spawn(move || {
                for mut stream in listener.incoming().flatten() {
                    let _ = stream.set_nodelay(true);
                    let mut byte = [0u8; 1];
                    if stream.read_exact(&mut byte).is_ok() {
                        let _ = stream.write_all(b"ok\n");
                        // The client closes with a reset; this read ends there.
                        let _ = stream.read(&mut byte);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// The UDP client: one flow, a datagram out and its echo back, for a while (each
/// exchange is two packets through the path); prints `ok=N err=M p50_us=X p99_us=Y`.
fn udp_rate(to: SocketAddr, duration: Duration) {
    let started = Instant::now();
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut micros = Vec::with_capacity(1 << 16);
    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
    socket.connect(to).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    while started.elapsed() < duration {
        let one = Instant::now();
        match socket.send(b"x").and_then(|_| socket.recv(&mut buf)) {
            Ok(_) => {
                ok += 1;
                micros.push(one.elapsed().as_micros());
            }
            Err(_) => errors += 1,
        }
    }
    print_rate(ok, errors, &mut micros);
}

/// A bounded UDP flood: one flow keeping 32 datagrams in flight, for a while; prints
/// `ok=N err=M` (echoes received; a 100 ms silence counts the window as lost).
fn udp_flood(to: SocketAddr, duration: Duration) {
    const WINDOW: u32 = 32;
    let started = Instant::now();
    let (mut ok, mut errors, mut in_flight) = (0u64, 0u64, 0u32);
    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
    socket.connect(to).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    while started.elapsed() < duration {
        while in_flight < WINDOW {
            if socket.send(b"x").is_err() {
                break;
            }
            in_flight += 1;
        }
        if socket.recv(&mut buf).is_ok() {
            ok += 1;
            in_flight = in_flight.saturating_sub(1);
        } else {
            errors += u64::from(in_flight);
            in_flight = 0;
        }
    }
    println!("ok={ok} err={errors} p50_us=0 p99_us=0");
}

/// The connection-rate client: connect, send a byte, read the answer, close with a
/// reset (`SO_LINGER` 0, so no side keeps `TIME_WAIT` and reused ports never collide),
/// for a while; prints `ok=N err=M p50_us=X p99_us=Y` and the first errors.
/// One exchange of the connection-rate bench: connect, one byte each way, close with a
/// reset (no `TIME_WAIT`).
fn exchange(to: SocketAddr, answer: &mut [u8; 3]) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"x")?;
    s.read_exact(answer)?;
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))
}

fn rate(to: SocketAddr, duration: Duration) {
    let started = Instant::now();
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut micros = Vec::with_capacity(1 << 16);
    let mut answer = [0u8; 3];
    let mut first_errors = Vec::new();
    while started.elapsed() < duration {
        let one = Instant::now();
        match exchange(to, &mut answer) {
            Ok(()) => {
                ok += 1;
                micros.push(one.elapsed().as_micros());
            }
            Err(e) => {
                errors += 1;
                if first_errors.len() < 5 {
                    let at = one.duration_since(started).as_millis();
                    first_errors.push(format!("err {:?} (started at {at} ms)", e.kind()));
                }
            }
        }
    }
    print_rate(ok, errors, &mut micros);
    for line in first_errors {
        println!("{line}");
    }
}

/// `rate`'s exchanges in the blocks of wall-clock time (`block` long from the Unix
/// millisecond `start`) whose index has the parity `phase`; a twin client takes the
/// others, so the two paths share the machine's drift block by block. Prints
/// `block=I ok=N err=M` per own block, then the summary line.
fn rate_blocks(to: SocketAddr, start: u64, block: Duration, blocks: u64, phase: u64) {
    let at = |i: u64| {
        std::time::UNIX_EPOCH
            + Duration::from_millis(start)
            + block * u32::try_from(i).unwrap_or(u32::MAX)
    };
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut micros = Vec::with_capacity(1 << 16);
    let mut answer = [0u8; 3];
    for i in (0..blocks).filter(|i| i % 2 == phase) {
        if let Ok(wait) = at(i).duration_since(std::time::SystemTime::now()) {
            thread::sleep(wait);
        }
        let (mut block_ok, mut block_errors) = (0u64, 0u64);
        while std::time::SystemTime::now() < at(i + 1) {
            let one = Instant::now();
            if exchange(to, &mut answer).is_ok() {
                block_ok += 1;
                micros.push(one.elapsed().as_micros());
            } else {
                block_errors += 1;
            }
        }
        println!("block={i} ok={block_ok} err={block_errors}");
        ok += block_ok;
        errors += block_errors;
    }
    print_rate(ok, errors, &mut micros);
}

/// Prints `ok=N err=M p50_us=X p99_us=Y` from per-exchange microseconds.
fn print_rate(ok: u64, errors: u64, micros: &mut [u128]) {
    micros.sort_unstable();
    let quantile = |q: usize| micros.get(micros.len() * q / 100).copied().unwrap_or(0);
    println!(
        "ok={ok} err={errors} p50_us={} p99_us={}",
        quantile(50),
        quantile(99)
    );
}
