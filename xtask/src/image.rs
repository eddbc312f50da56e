//! `cargo xtask image`: the agent's OCI image, made with no registry. Its root filesystem
//! is the agent and what it runs (`nft`, and `ip` to look around a node) with the
//! shared libraries they load, taken from Debian's own packages (downloaded from the
//! package archive and unpacked, nothing installed); buildah makes that one layer an
//! image and writes an OCI archive that `ctr -n k8s.io images import`, `podman load`
//! and `docker load` take on an air-gapped node. `Containerfile` describes the same
//! image for Docker builds.
use std::{
    collections::{BTreeSet, VecDeque},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{root, run};

/// The image's name; its tag is the agent's version.
pub const NAME: &str = "proxy-agent";
/// The programs of the image besides the agent, by the package holding them.
const PROGRAMS: &[(&str, &str)] = &[("nftables", "usr/sbin/nft"), ("iproute2", "bin/ip")];
/// Data files the programs read.
const DATA: &[&str] = &["etc/iproute2"];
/// Where Debian keeps shared libraries.
const LIBRARY_DIRS: &[&str] = &["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64"];
/// Tools the image is made and run with (podman over runc for the container test).
const BUILD_PACKAGES: &[&str] = &["buildah", "binutils", "podman", "runc"];
/// Packages that only configure others at install time (none is installed here).
const NOT_NEEDED: &[&str] = &[
    "debconf",
    "cdebconf",
    "dpkg",
    "install-info",
    "tar",
    "perl-base",
];

fn image_dir() -> PathBuf {
    root().join("target/image")
}

/// The OCI archive the image is written to.
pub fn archive() -> PathBuf {
    image_dir().join("proxy-agent.oci.tar")
}

/// Builds the image from the release binary `cargo xtask build` made.
pub fn build() -> Result<()> {
    crate::toolchain::ensure_packages(BUILD_PACKAGES)?;
    let version = agent_version()?;
    let dir = image_dir();
    let debs = dir.join("debs");
    let staged = dir.join("staged");
    let rootfs = dir.join("rootfs");
    for path in [&staged, &rootfs] {
        if path.exists() {
            fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    fs::create_dir_all(&debs)?;
    let packages = closure(PROGRAMS.iter().map(|(p, _)| *p))?;
    download(&packages, &debs)?;
    for entry in fs::read_dir(&debs)? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&staged))?;
        }
    }
    fs::create_dir_all(rootfs.join("usr/local/bin"))?;
    let agent = rootfs.join("usr/local/bin/proxy-agent");
    fs::copy(root().join("target/release/proxy-agent"), &agent)?;
    run(Command::new("strip").arg("--strip-debug").arg(&agent))?;
    let mut binaries = vec![agent];
    for (_, program) in PROGRAMS {
        binaries.push(place(&staged, &rootfs, Path::new(program))?);
    }
    for data in DATA {
        run(Command::new("cp")
            .args(["-a", "--parents", data])
            .arg(&rootfs)
            .current_dir(&staged))?;
    }
    libraries(&staged, &rootfs, &binaries)?;
    // The agent writes under /run (its pins directory's parent) and nft under /tmp only
    // when asked to; both are mounts in the DaemonSet, empty here.
    for empty in ["run", "tmp", "sys/fs/bpf", "etc"] {
        fs::create_dir_all(rootfs.join(empty))?;
    }
    let tag = format!("{NAME}:{version}");
    commit(&rootfs, &tag)?;
    // The tag's earlier builds, left untagged in local storage.
    let _ = Command::new("buildah").args(["rmi", "--prune"]).output();
    let _ = fs::remove_file(archive());
    run(Command::new("buildah")
        .args(["push", &tag])
        .arg(format!("oci-archive:{}:{tag}", archive().display())))?;
    let size = fs::metadata(archive())?.len();
    println!("image {tag}");
    println!("digest {}", manifest_digest()?);
    println!("root filesystem {}", mib(du(&rootfs)?));
    println!("archive {} ({})", archive().display(), mib(size));
    Ok(())
}

/// The digest of the archive's manifest: what a node's runtime knows the image by.
fn manifest_digest() -> Result<String> {
    let index = output(
        Command::new("tar")
            .arg("-xOf")
            .arg(archive())
            .arg("index.json"),
    )?;
    let start = index.find("sha256:").context("no digest in index.json")?;
    Ok(index[start..start + 71].to_owned())
}

/// Bytes as MiB with one decimal.
fn mib(bytes: u64) -> String {
    let tenths = bytes * 10 / (1024 * 1024);
    format!("{}.{} MiB", tenths / 10, tenths % 10)
}

/// Bytes of the regular files under `dir`.
fn du(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += du(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// The agent's version, as the image's tag.
fn agent_version() -> Result<String> {
    let out = output(Command::new(root().join("target/release/proxy-agent")).arg("--version"))
        .context("target/release/proxy-agent: run `cargo xtask build` first")?;
    out.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .context("proxy-agent --version printed no version")
}

/// The packages `roots` need, with what they depend on (the first of alternatives),
/// leaving out those that only configure at install time.
fn closure<'a>(roots: impl Iterator<Item = &'a str>) -> Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<String> = roots.map(str::to_owned).collect();
    while let Some(package) = queue.pop_front() {
        if NOT_NEEDED.contains(&package.as_str()) || !seen.insert(package.clone()) {
            continue;
        }
        let text = output(Command::new("apt-cache").args([
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            &package,
        ]))?;
        // ` |Depends: a` is or-ed with the next line: the first of such a group is taken.
        // Indented lines under a `<virtual>` name its providers, not dependencies.
        let mut in_group = false;
        for line in text.lines().skip(1) {
            let line = line.trim_start();
            let or_next = line.starts_with('|');
            let body = line.trim_start_matches('|');
            let Some(name) = body
                .strip_prefix("Depends: ")
                .or_else(|| body.strip_prefix("PreDepends: "))
            else {
                continue;
            };
            let first = !in_group;
            in_group = or_next;
            if first && !name.starts_with('<') {
                queue.push_back(name.to_owned());
            }
        }
    }
    Ok(seen)
}

/// Downloads the packages' `.deb` files (from the configured archive) into `dir`.
fn download(packages: &BTreeSet<String>, dir: &Path) -> Result<()> {
    let missing: Vec<&String> = packages
        .iter()
        .filter(|p| {
            !fs::read_dir(dir).is_ok_and(|mut entries| {
                entries.any(|e| {
                    e.is_ok_and(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("{p}_"))
                    })
                })
            })
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("apt-get")
        .arg("download")
        .args(missing)
        .current_dir(dir))
}

/// Copies `path` from the unpacked packages to the image, following symlinks within
/// the unpacked tree (never into the host's); returns where it landed.
fn place(staged: &Path, rootfs: &Path, path: &Path) -> Result<PathBuf> {
    let from = resolve(staged, path)?;
    let to = rootfs.join(path);
    fs::create_dir_all(to.parent().expect("a parent"))?;
    fs::copy(&from, &to).with_context(|| format!("copying {}", path.display()))?;
    Ok(to)
}

/// `path` in the unpacked tree with its symlinks followed inside the tree.
fn resolve(staged: &Path, path: &Path) -> Result<PathBuf> {
    let mut at = path.to_owned();
    for _ in 0..16 {
        let full = staged.join(&at);
        let Ok(target) = fs::read_link(&full) else {
            if full.is_file() {
                return Ok(full);
            }
            bail!("{} is in none of the packages", path.display());
        };
        at = match target.strip_prefix("/") {
            Ok(absolute) => absolute.to_owned(),
            Err(_) => at.parent().unwrap_or(Path::new("")).join(target),
        };
    }
    bail!("{}: too many symlinks", path.display())
}

/// Copies every shared library `binaries` load, and what those load, from the
/// unpacked packages (the dynamic loader included).
fn libraries(staged: &Path, rootfs: &Path, binaries: &[PathBuf]) -> Result<()> {
    let mut queue: VecDeque<PathBuf> = binaries.iter().cloned().collect();
    let mut done = BTreeSet::new();
    queue.push_back(place_library(staged, rootfs, "ld-linux-x86-64.so.2")?);
    while let Some(file) = queue.pop_front() {
        let dynamic = output(Command::new("readelf").arg("-d").arg(&file))?;
        for line in dynamic.lines().filter(|l| l.contains("(NEEDED)")) {
            let Some(name) = line.split('[').nth(1).and_then(|s| s.split(']').next()) else {
                continue;
            };
            if done.insert(name.to_owned()) {
                queue.push_back(place_library(staged, rootfs, name)?);
            }
        }
    }
    Ok(())
}

/// One library by its soname, copied to the same directory in the image.
fn place_library(staged: &Path, rootfs: &Path, name: &str) -> Result<PathBuf> {
    for dir in LIBRARY_DIRS {
        let candidate = Path::new(dir).join(name);
        if resolve(staged, &candidate).is_ok() {
            let to = place(staged, rootfs, &candidate)?;
            // The loader is found at its standard path whichever directory holds it.
            if name.starts_with("ld-linux") && *dir != "lib64" {
                let link = rootfs.join("lib64").join(name);
                fs::create_dir_all(rootfs.join("lib64"))?;
                if !link.exists() {
                    fs::copy(&to, &link)?;
                }
            }
            return Ok(to);
        }
    }
    bail!("shared library {name} is in none of the packages")
}

/// One layer holding `rootfs`, the agent as entry point, committed as `tag`.
fn commit(rootfs: &Path, tag: &str) -> Result<()> {
    let container = output(Command::new("buildah").args(["from", "scratch"]))?;
    let container = container.trim();
    let result = (|| {
        run(Command::new("buildah")
            .args(["copy", container])
            .arg(format!("{}/", rootfs.display()))
            .arg("/"))?;
        run(Command::new("buildah").args([
            "config",
            "--entrypoint",
            r#"["/usr/local/bin/proxy-agent"]"#,
            "--cmd",
            "run",
            "--env",
            "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--label",
            "org.opencontainers.image.title=proxy-agent",
            "--label",
            "org.opencontainers.image.description=Kubernetes Service dataplane (kube-proxy replacement)",
            container,
        ]))?;
        run(Command::new("buildah").args(["commit", "--rm", container, tag]))
    })();
    if result.is_err() {
        let _ = Command::new("buildah").args(["rm", container]).status();
    }
    result
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
