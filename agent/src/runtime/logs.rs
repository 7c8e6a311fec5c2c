//! Container output as JSON lines (`{"time":…,"stream":"stdout","log":"…\n"}`, Docker's
//! json-file format), written by the monitor, rotated by size: `container.log` is renamed to
//! `.1`, `.1` to `.2`, … up to `max_files`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Longest line kept whole; longer output is split (as Docker does at 16 KiB).
const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub time: String,
    pub stream: String,
    pub log: String,
}

/// A size-rotated JSON-lines file shared by the stdout and stderr copiers.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: File,
    written: u64,
    max_bytes: u64,
    max_files: u32,
}

impl LogWriter {
    pub fn open(path: &Path, max_bytes: u64, max_files: u32) -> std::io::Result<LogWriter> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(LogWriter {
            path: path.into(),
            file,
            written,
            max_bytes: max_bytes.max(4096),
            max_files: max_files.max(1),
        })
    }

    pub fn write_line(&mut self, stream: &str, text: &[u8]) -> std::io::Result<()> {
        let line = LogLine {
            time: rfc3339(SystemTime::now()),
            stream: stream.into(),
            log: String::from_utf8_lossy(text).into_owned(),
        };
        let mut raw = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
        raw.push(b'\n');
        if self.written > 0 && self.written + raw.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(&raw)?;
        self.written += raw.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
        if self.max_files <= 1 {
            self.file.set_len(0)?;
        } else {
            for n in (1..self.max_files - 1).rev() {
                if numbered(n).exists() {
                    fs::rename(numbered(n), numbered(n + 1))?;
                }
            }
            fs::rename(&self.path, numbered(1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        self.written = 0;
        Ok(())
    }
}

/// Copy `input` (a pipe from the container) into `writer` line by line until EOF.
pub fn copy_lines(mut input: impl Read, stream: &str, writer: &Arc<Mutex<LogWriter>>) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let emit = |line: &[u8]| {
        if let Ok(mut w) = writer.lock()
            && let Err(e) = w.write_line(stream, line)
        {
            tracing::warn!(error = %e, "cannot write container log");
        }
    };
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            emit(&line);
        }
        while pending.len() >= MAX_LINE {
            let part: Vec<u8> = pending.drain(..MAX_LINE).collect();
            emit(&part);
        }
    }
    if !pending.is_empty() {
        emit(&pending);
    }
}

/// RFC 3339 with nanoseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// Every line of the log, oldest rotated file first.
pub fn read_all(path: &Path, max_files: u32) -> std::io::Result<Vec<LogLine>> {
    let mut out = Vec::new();
    for n in (1..max_files.max(1)).rev() {
        let p = PathBuf::from(format!("{}.{n}", path.display()));
        if p.exists() {
            out.extend(parse(&fs::read_to_string(p)?));
        }
    }
    if path.exists() {
        out.extend(parse(&fs::read_to_string(path)?));
    }
    Ok(out)
}

fn parse(text: &str) -> Vec<LogLine> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_timestamped_and_rotated() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("container.log");
        let writer = Arc::new(Mutex::new(LogWriter::open(&path, 4096, 3)?));
        let mut input = Vec::new();
        for i in 0..200 {
            input.extend_from_slice(format!("line {i:03}\n").as_bytes());
        }
        input.extend_from_slice(b"no newline at the end");
        copy_lines(input.as_slice(), "stdout", &writer);
        let lines = read_all(&path, 3)?;
        // Rotation keeps 3 files of about 4 KiB: the oldest lines are gone, the newest kept.
        assert!(lines.len() < 201 && lines.len() > 50, "{}", lines.len());
        assert_eq!(
            lines.last().map(|l| l.log.as_str()),
            Some("no newline at the end")
        );
        assert_eq!(lines[lines.len() - 2].log, "line 199\n");
        assert!(
            lines
                .iter()
                .all(|l| l.stream == "stdout" && l.time.ends_with('Z'))
        );
        assert!(
            dir.path().join("container.log.1").exists()
                && dir.path().join("container.log.2").exists()
        );
        assert!(!dir.path().join("container.log.3").exists());
        for f in ["container.log", "container.log.1", "container.log.2"] {
            assert!(fs::metadata(dir.path().join(f))?.len() <= 4096 + 200);
        }
        Ok(())
    }

    #[test]
    fn long_lines_are_cut_at_16k() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("c.log");
        let writer = Arc::new(Mutex::new(LogWriter::open(&path, 1 << 30, 2)?));
        let input = vec![b'x'; 40 * 1024];
        copy_lines(input.as_slice(), "stderr", &writer);
        let lines = read_all(&path, 2)?;
        assert_eq!(
            lines.iter().map(|l| l.log.len()).collect::<Vec<_>>(),
            [16384, 16384, 8192]
        );
        Ok(())
    }
}
