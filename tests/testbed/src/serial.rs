//! Following a guest's serial output that QEMU writes to a file.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Reads what has been appended to a file since the last call.
#[derive(Debug)]
pub struct SerialLog {
    file: Option<File>,
    path: std::path::PathBuf,
    text: Vec<u8>,
    /// Complete lines decoded so far (without line ends), and where the
    /// first not-yet-complete line starts in `text`.
    lines: Vec<String>,
    complete_up_to: usize,
}

impl SerialLog {
    /// Follows `path`, which may not exist yet.
    pub fn new(path: &Path) -> Self {
        Self {
            file: None,
            path: path.to_owned(),
            text: Vec::new(),
            lines: Vec::new(),
            complete_up_to: 0,
        }
    }

    /// Returns the bytes appended since the previous call.
    pub fn poll(&mut self) -> io::Result<&[u8]> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(&[]),
                Err(e) => return Err(e),
            }
        }
        let start = self.text.len();
        if let Some(file) = self.file.as_mut() {
            file.read_to_end(&mut self.text)?;
        }
        // Decode each line once, when its newline arrives.
        if let Some(end) = self.text[start..].iter().rposition(|&b| b == b'\n') {
            let end = start + end + 1;
            let fresh = String::from_utf8_lossy(&self.text[self.complete_up_to..end]);
            self.lines
                .extend(fresh.lines().map(|l| l.trim_end_matches('\r').to_owned()));
            self.complete_up_to = end;
        }
        Ok(&self.text[start..])
    }

    /// Everything read so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.text).into_owned()
    }

    /// The first complete (newline-terminated) line containing `marker`.
    /// A line still being written is not returned, so callers never act on
    /// half a line.
    pub fn line_with(&self, marker: &str) -> Option<String> {
        self.lines.iter().find(|l| l.contains(marker)).cloned()
    }

    /// The last `n` lines read so far, for error reports.
    pub fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_counts_only_once_it_is_complete() {
        let dir = crate::ScratchDir::new("capsid-testbed-unit").unwrap();
        let path = dir.join("serial");
        let mut log = SerialLog::new(&path);
        assert!(
            log.poll().unwrap().is_empty(),
            "a missing file reads as empty"
        );
        std::fs::write(&path, b"boot\nMARK: half").unwrap();
        assert_eq!(log.poll().unwrap(), b"boot\nMARK: half");
        assert_eq!(log.line_with("MARK"), None);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, b" done\r\nmore").unwrap();
        assert_eq!(log.poll().unwrap(), b" done\r\nmore");
        assert_eq!(log.line_with("MARK").as_deref(), Some("MARK: half done"));
    }
}
