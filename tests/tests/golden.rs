//! Golden cases: a directory of manifests in, the desired state and the eBPF maps out.
//! `cargo xtask bless` rewrites the expected files.
use std::{fs, path::Path};

use proxy_agent::{
    dataplane::{ebpf::render, nftables::ruleset::render as render_nft},
    model,
    source::manifests::ManifestsDir,
};
use proxy_agent_tests::flows;

fn check(case: &Path, file: &str, actual: &str) -> Option<String> {
    let path = case.join(file);
    if std::env::var_os("BLESS").is_some() {
        fs::write(&path, actual).unwrap();
        return None;
    }
    let expected = fs::read_to_string(&path).unwrap_or_default();
    (expected != actual).then(|| {
        format!(
            "{}:\n--- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        )
    })
}

/// The real `nft` parser and kernel check the ruleset (`-c`: nothing is committed).
fn nft_accepts(case: &Path, ruleset: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-c", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ruleset.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}: nft rejects the ruleset: {}",
        case.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn golden_cases() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let mut cases: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 4, "golden cases missing");
    let mut failures = Vec::new();
    for case in &cases {
        let mut dir = ManifestsDir::new(&case.join("manifests"));
        dir.reload().unwrap();
        let snapshot = dir.snapshot();
        let desired = model::build(&snapshot, &flows::node(&snapshot, "node1"));
        failures.extend(check(case, "desired.txt", &desired.to_string()));
        failures.extend(check(
            case,
            "ebpf.json",
            &(render::render(&desired).unwrap() + "\n"),
        ));
        let node = flows::node(&snapshot, "node1");
        let ruleset = render_nft(&desired, &node.local());
        nft_accepts(case, &ruleset);
        failures.extend(check(case, "nftables.nft", &ruleset));
        println!(
            "golden case {} checked",
            case.file_name().unwrap().to_string_lossy()
        );
    }
    assert!(
        failures.is_empty(),
        "{} golden mismatches (bless with `cargo xtask bless`):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
