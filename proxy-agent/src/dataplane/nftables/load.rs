//! Running `nft -f -`: a text given whole, or written straight into nft's input as it
//! is made (a full load is 22 MiB at 10 000 Services, 70 at 30 000: never held whole).
use std::{
    fmt,
    io::{BufWriter, Write},
    path::Path,
    process::{Command, Stdio},
};

use super::NftError;

/// Runs `nft -f -` on `text` in the current network namespace.
///
/// # Errors
/// When `nft` cannot run or refuses the text.
pub fn load(text: &str) -> Result<(), NftError> {
    load_in(None, text)
}

/// Runs `nft -f -` on `text` in `netns` (a `/run/netns/NAME` path) or the current one.
///
/// # Errors
/// When `nft` cannot run or refuses the text.
pub fn load_in(netns: Option<&Path>, text: &str) -> Result<(), NftError> {
    load_streamed_in(netns, |out| out.write_str(text)).map(drop)
}

/// Runs `nft -f -` in `netns` on what `write` writes, streamed into its input; returns
/// the number of lines written.
///
/// # Errors
/// When `nft` cannot run, its input cannot be written, or it refuses the text.
pub fn load_streamed_in(
    netns: Option<&Path>,
    write: impl FnOnce(&mut dyn fmt::Write) -> fmt::Result,
) -> Result<usize, NftError> {
    NftError::fault()?;
    let mut child = nft_in(netns)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    let mut lines = 0;
    let mut failed = None;
    if let Some(stdin) = child.stdin.take() {
        let mut input = Input {
            out: BufWriter::with_capacity(1 << 16, stdin),
            lines: 0,
            error: None,
        };
        let _ = write(&mut input);
        let flushed = input.out.flush();
        lines = input.lines;
        failed = input.error.or(flushed.err());
        // Dropping the input here closes it: nft reads to its end.
    }
    let output = child.wait_with_output().map_err(NftError::Spawn)?;
    if !output.status.success() {
        return Err(NftError::Rejected(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    match failed {
        Some(error) => Err(NftError::Spawn(error)),
        None => Ok(lines),
    }
}

/// `nft` to run in `netns` (a `/run/netns/NAME` path) or the current namespace.
pub(super) fn nft_in(netns: Option<&Path>) -> Command {
    match netns {
        Some(netns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", netns.display())).arg("nft");
            c
        }
        None => Command::new("nft"),
    }
}

/// nft's input as a `fmt::Write`, counting lines; the first write error stops it.
struct Input<W: Write> {
    out: W,
    lines: usize,
    error: Option<std::io::Error>,
}

impl<W: Write> fmt::Write for Input<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.error.is_some() {
            return Err(fmt::Error);
        }
        self.lines += s.bytes().filter(|&b| b == b'\n').count();
        self.out.write_all(s.as_bytes()).map_err(|error| {
            self.error = Some(error);
            fmt::Error
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::Input;

    #[test]
    fn counts_lines_and_stops_at_the_first_error() {
        let mut input = Input {
            out: Vec::new(),
            lines: 0,
            error: None,
        };
        write!(input, "a\nb\n").unwrap();
        input.write_str("c").unwrap();
        assert_eq!(
            (input.lines, input.out.as_slice()),
            (2, b"a\nb\nc".as_slice())
        );
        let mut full = Input {
            out: &mut [0u8; 2][..],
            lines: 0,
            error: None,
        };
        assert!(full.write_str("abc").is_err());
        assert!(full.error.is_some() && full.write_str("d").is_err());
    }
}
