//! An object as the API server's watch delivers it (JSON), decoded and checked as the
//! watcher checks it, for each kind the agent watches.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proxy_agent::source::{kube::checked, parse::Kind, wire::WireObject};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, json)) = data.split_first() else {
        return;
    };
    let kind = match selector % 3 {
        0 => Kind::Service,
        1 => Kind::EndpointSlice,
        _ => Kind::Node,
    };
    if let Ok(object) = serde_json::from_slice::<WireObject>(json) {
        if let Err(error) = checked(kind, object) {
            assert!(!error.is_empty(), "a rejection without a reason");
        }
    }
});
