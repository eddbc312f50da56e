//! Faults injected on demand into the agent's kernel calls (rtnetlink, nft, eBPF map
//! writes), so the fault suite can show that each failure stays small. Only a build with
//! the `fault-hooks` feature can arm them (`PUT /debug/faults/{point}` on the metrics
//! address); in any other build every check is a constant `false`.
use std::{fmt, net::IpAddr};

/// Where a fault can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// Reading the node's addresses and interfaces over rtnetlink.
    Rtnetlink,
    /// Committing an nftables transaction (`nft -f` or a netlink batch), on either
    /// dataplane.
    Nft,
    /// Writing eBPF service-map entries (all, or those of one address), as the kernel
    /// refuses a batch holding them.
    BpfMap,
}

impl Point {
    pub const ALL: [Self; 3] = [Self::Rtnetlink, Self::Nft, Self::BpfMap];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Rtnetlink => "rtnetlink",
            Self::Nft => "nft",
            Self::BpfMap => "bpf-map",
        }
    }

    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error an injected fault stands for.
#[must_use]
pub fn injected(point: Point) -> std::io::Error {
    std::io::Error::other(format!("injected {point} fault"))
}

/// Whether this call at `point` fails (consuming one of its armed failures).
#[must_use]
pub fn fails(point: Point) -> bool {
    armed::fails(point, None)
}

/// Whether a call at `point` touching `address` fails: a fault armed for one address
/// hits only calls about it.
#[must_use]
pub fn fails_for(point: Point, address: IpAddr) -> bool {
    armed::fails(point, Some(address))
}

#[cfg(feature = "fault-hooks")]
pub use self::armed::{arm, disarm, report};

/// `GET /debug/faults` (each point, armed or not, and its hits so far),
/// `PUT /debug/faults/{point}?times=N&address=IP` (arm; every call until disarmed
/// without `times`) and `DELETE /debug/faults/{point}` (disarm).
#[cfg(feature = "fault-hooks")]
pub fn routes() -> axum::Router {
    use axum::{
        extract::{Path, Query},
        http::StatusCode,
        routing::get,
    };

    #[derive(serde::Deserialize)]
    struct Arming {
        times: Option<u64>,
        address: Option<IpAddr>,
    }

    fn point(name: &str) -> Result<Point, (StatusCode, String)> {
        Point::parse(name).ok_or((StatusCode::NOT_FOUND, format!("no fault point {name}\n")))
    }

    axum::Router::new()
        .route("/debug/faults", get(|| async { report() }))
        .route(
            "/debug/faults/{point}",
            axum::routing::put(
                |Path(name): Path<String>, Query(arming): Query<Arming>| async move {
                    let point = point(&name)?;
                    arm(point, arming.times, arming.address);
                    Ok::<_, (StatusCode, String)>(report())
                },
            )
            .delete(|Path(name): Path<String>| async move {
                disarm(point(&name)?);
                Ok::<_, (StatusCode, String)>(report())
            }),
        )
}

#[cfg(not(feature = "fault-hooks"))]
mod armed {
    use std::net::IpAddr;

    #[inline]
    pub fn fails(_: super::Point, _: Option<IpAddr>) -> bool {
        false
    }
}

#[cfg(feature = "fault-hooks")]
mod armed {
    use std::{
        net::IpAddr,
        sync::{
            atomic::{AtomicBool, Ordering},
            Mutex, PoisonError,
        },
    };

    use super::Point;

    /// One point's fault: failures left (`None`: until disarmed), the address it is
    /// limited to, and how many calls it failed so far.
    #[derive(Clone, Copy, Default)]
    struct Armed {
        on: bool,
        left: Option<u64>,
        address: Option<IpAddr>,
        hits: u64,
    }

    static ANY: AtomicBool = AtomicBool::new(false);
    static POINTS: Mutex<[Armed; 3]> = Mutex::new(
        [Armed {
            on: false,
            left: None,
            address: None,
            hits: 0,
        }; 3],
    );

    fn index(point: Point) -> usize {
        match point {
            Point::Rtnetlink => 0,
            Point::Nft => 1,
            Point::BpfMap => 2,
        }
    }

    pub fn fails(point: Point, address: Option<IpAddr>) -> bool {
        if !ANY.load(Ordering::Relaxed) {
            return false;
        }
        let mut points = POINTS.lock().unwrap_or_else(PoisonError::into_inner);
        let armed = &mut points[index(point)];
        let hit = armed.on
            && armed.left != Some(0)
            && (armed.address.is_none() || armed.address == address);
        if hit {
            armed.hits += 1;
            armed.left = armed.left.map(|n| n - 1);
            tracing::warn!(%point, ?address, "fault injected");
        }
        hit
    }

    /// Arms `point` for `times` failures (all until disarmed when `None`), limited to
    /// calls about `address` if given.
    pub fn arm(point: Point, times: Option<u64>, address: Option<IpAddr>) {
        let mut points = POINTS.lock().unwrap_or_else(PoisonError::into_inner);
        let armed = &mut points[index(point)];
        armed.on = true;
        armed.left = times;
        armed.address = address;
        ANY.store(true, Ordering::Relaxed);
        tracing::warn!(%point, ?times, ?address, "fault armed");
    }

    pub fn disarm(point: Point) {
        let mut points = POINTS.lock().unwrap_or_else(PoisonError::into_inner);
        points[index(point)].on = false;
        tracing::warn!(%point, "fault disarmed");
    }

    /// `point armed|off hits=N` per point, one a line.
    pub fn report() -> String {
        use std::fmt::Write as _;
        let points = POINTS.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        for point in Point::ALL {
            let armed = points[index(point)];
            let state = if armed.on { "armed" } else { "off" };
            let _ = writeln!(out, "{point} {state} hits={}", armed.hits);
        }
        out
    }
}
